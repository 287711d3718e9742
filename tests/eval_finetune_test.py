"""Fine-tuning all layers on a label subset, end to end on a tiny pretraining
run: results schema, zero-initialised classifier, every kept layer trained,
exact resume, layout invariance (global BN), label subsets, user errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclr import cli, config as config_lib
from jaxclr.jobs import finetune, pretrain
from jaxclr.parallel import sharding
from jaxclr.training import metrics, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, PER_CLASS, BATCH = 4, 4, 8
# 16 labelled examples x 2 epochs // B=8 + 1 (the reference's step count).
STEPS = PER_CLASS * NUM_CLASSES * 2 // BATCH + 1


def load_config_file(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py"), arg)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """The 2-step synthetic pretraining run of eval_job_test (same programs, so
  the persistent compilation cache serves both): 4 classes, 2-layer head."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  pretrain.run(load_config_file("synthetic_tiny", "steps=2,every=1"), workdir)
  return workdir


def ft_config(pretrained_workdir, **overrides):
  c = load_config_file("finetune")
  c.pretrained_workdir = pretrained_workdir
  c.labels_per_class = PER_CLASS
  c.batch_size, c.num_epochs, c.eval_batch_size = BATCH, 2.0, 64
  # A large rate so that a few steps move every trained parameter visibly.
  c.learning_rate = 2.0
  c.log_every_steps, c.checkpoint_every_steps = 1, 2
  c.max_checkpoints_to_keep = 5
  c.update(overrides)
  return c


def interrupted_copy(workdir, dst, *, after_step):
  """A copy of a finished job's workdir as if it had stopped after
  `after_step`: later checkpoints and results.json gone."""
  shutil.copytree(workdir, dst)
  checkpoints = os.path.join(dst, "checkpoints")
  for name in os.listdir(checkpoints):
    if name.isdigit() and int(name) > after_step:
      shutil.rmtree(os.path.join(checkpoints, name))
  os.remove(os.path.join(dst, "results.json"))
  return dst


def saved_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ft8"))
  finetune.run(ft_config(pretrained), out)
  with open(os.path.join(out, "results.json")) as f:
    return out, json.load(f)


@pytest.mark.slow
def test_results_schema(finetuned):
  _, r = finetuned
  assert r["protocol"] == "finetune" and r["checkpoint_step"] == 2
  assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
  assert r["knn_top1"] is None
  assert r["few_label_top1"] == {} and r["few_label_top1_std"] == {}
  assert r["label_subset"] == {"kind": "labels_per_class",
                               "labels_per_class": PER_CLASS, "seed": 0}
  assert r["num_labelled_examples"] == NUM_CLASSES * PER_CLASS
  assert r["labelled_per_class"] == [PER_CLASS] * NUM_CLASSES
  assert r["steps"] == STEPS and r["batch_size"] == BATCH
  assert r["ft_proj_selector"] == 1 and r["optimizer"] == "momentum"
  assert r["peak_learning_rate"] == pytest.approx(2.0 * BATCH / 256)
  assert r["num_eval_examples"] == 64 and r["num_devices"] == 8
  assert (r["train_split"], r["eval_split"], r["eval_on_train"]) == (
      "train", "train", True)  # synthetic: allowed, and recorded.
  assert r["feature_dim"] == 64  # The head's first layer keeps h's width.
  assert set(r["wall_times"]) == {"setup_s", "train_s", "eval_s", "total_s"}


@pytest.mark.slow
def test_classifier_starts_at_zero(finetuned):
  """Zero logits at step 1: the loss is ln(C) exactly; then it moves."""
  out, _ = finetuned
  losses = {r["step"]: r["loss"] for r in metrics.read_records(out)}
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses[1], np.log(NUM_CLASSES), rtol=1e-6)
  assert losses[STEPS] != losses[1]


@pytest.mark.slow
def test_every_kept_layer_is_trained(pretrained, finetuned):
  out, _ = finetuned
  before = saved_state(pretrained, 2)
  after = saved_state(out, STEPS)
  changed = lambda a, b: not np.array_equal(a, b)
  flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  for col in ("params", "batch_stats"):  # Moving statistics update too.
    new = after[col]["backbone"]
    for path, leaf in flat(new["encoder"]):
      old = before[col]["encoder"]
      for k in path:
        old = old[k.key]
      assert changed(leaf, old), (col, jax.tree_util.keystr(path))
  head_new = after["params"]["backbone"]["projection_head"]
  head_old = before["params"]["projection_head"]
  # ft_proj_selector=1 keeps (and trains) head layer 0; layer 1 is unused.
  for name in ("dense0", "bn0"):
    for a, b in zip(jax.tree.leaves(head_new[name]),
                    jax.tree.leaves(head_old[name])):
      assert changed(a, b), name
  for a, b in zip(jax.tree.leaves(head_new["dense1"]),
                  jax.tree.leaves(head_old["dense1"])):
    np.testing.assert_array_equal(a, b)
  assert np.abs(after["params"]["linear_head"]["Dense_0"]["kernel"]).max() > 0


@pytest.mark.slow
def test_resume_is_exact(pretrained, finetuned, tmp_path):
  """Stopped after step 2 (later checkpoints gone), re-run to the end: the
  same final state as the uninterrupted run."""
  out, results = finetuned
  resumed = interrupted_copy(out, str(tmp_path / "resumed"), after_step=2)
  r = finetune.run(ft_config(pretrained), resumed)
  assert r["resumed_from_step"] == 2
  jax.tree.map(np.testing.assert_array_equal, saved_state(resumed, STEPS),
               saved_state(out, STEPS))
  assert (r["top1"], r["top5"]) == (results["top1"], results["top5"])
  # A changed config is refused on a workdir that holds checkpoints.
  with pytest.raises(workdir_lib.WorkdirError,
                     match="learning_rate: 2.0 -> 1.0"):
    finetune.run(ft_config(pretrained, learning_rate=1.0), resumed)


def relative_difference(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.slow
def test_one_device_matches_eight(pretrained, finetuned, tmp_path):
  """Global BN and gradient reductions: 1 device = 8 devices to round-off.

  With BatchNorm local to each device (one example each) the statistics, and
  so every parameter, would differ by O(1).
  """
  out, results = finetuned
  mesh1 = sharding.make_mesh("auto", jax.devices()[:1])
  r1 = finetune.run(ft_config(pretrained), str(tmp_path), mesh=mesh1)
  assert r1["num_devices"] == 1
  one, eight = saved_state(str(tmp_path), STEPS), saved_state(out, STEPS)
  for col in ("params", "batch_stats"):
    flat1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(one[col])])
    flat8 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(eight[col])])
    assert relative_difference(flat1, flat8) < 1e-5, col
  assert abs(r1["top1"] - results["top1"]) <= 1 / 64 + 1e-9


def subset_config(**kw):
  return ml_collections.ConfigDict(dict(
      dict(label_fraction=None, labels_per_class=None, dataset=None, seed=0),
      **kw))


def test_label_subsets_are_balanced_and_deterministic():
  labels = np.repeat(np.arange(5), [30, 12, 50, 7, 21])
  labels[[3, 40]] = -1  # Unlabelled examples are never picked.
  idx, spec = finetune.labelled_subset(subset_config(labels_per_class=5),
                                       labels)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [5] * 5)
  assert spec["labels_per_class"] == 5 and len(np.unique(idx)) == len(idx)
  same, _ = finetune.labelled_subset(subset_config(labels_per_class=5), labels)
  other, _ = finetune.labelled_subset(
      subset_config(labels_per_class=5, seed=1), labels)
  np.testing.assert_array_equal(idx, same)
  assert not np.array_equal(idx, other)
  frac, spec = finetune.labelled_subset(subset_config(label_fraction=0.1),
                                        labels)
  np.testing.assert_array_equal(np.bincount(labels[frac]), [3, 1, 5, 1, 2])
  assert spec == {"kind": "label_fraction", "label_fraction": 0.1, "seed": 0}
  whole, spec = finetune.labelled_subset(
      subset_config(dataset="imagenet2012_subset/1pct"), labels)
  assert len(whole) == len(labels) - 2 and spec["kind"] == "dataset"


def test_config_errors(pretrained, tmp_path):
  with pytest.raises(config_lib.ConfigError,
                     match=r"ft_proj_selector=3 is invalid for a 2-layer .* "
                     r"valid: 0 \(h, head discarded\) to 2"):
    finetune.run(ft_config(pretrained, ft_proj_selector=3), str(tmp_path))
  with pytest.raises(config_lib.ConfigError,
                     match=r"exactly one label subset, got 2 \(label_fraction"
                     r"=0.1, labels_per_class=4\)"):
    finetune.run(ft_config(pretrained, label_fraction=0.1), str(tmp_path))
  with pytest.raises(config_lib.ConfigError,
                     match=r"batch_size=8 exceeds the 4 labelled examples "
                     r"\(labels_per_class=1\); use batch_size <= 4"):
    finetune.run(ft_config(pretrained, labels_per_class=1), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"label_fraction=1.5"):
    config_lib.validate(ft_config(pretrained, labels_per_class=None,
                                  label_fraction=1.5), job="finetune")
  with pytest.raises(config_lib.ConfigError, match="model.depth"):
    finetune.run(ft_config("none"), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))


def test_cli_reports_one_line_and_exit_2(pretrained, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "jaxclr.finetune", "--config",
       "configs/finetune.py:fraction=0.1", "--workdir", str(tmp_path / "w"),
       f"--config.pretrained_workdir={pretrained}",
       "--config.labels_per_class=5"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxclr: error: set exactly one label subset, got 2 "
                         "(label_fraction=0.1, labels_per_class=5)"), last
  assert not (tmp_path / "w").exists()
