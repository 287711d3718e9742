"""Evaluation job end to end on a tiny pretraining run: restore, results
schema, layout invariance, user errors, label subsets, export round trip."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxclr
from jaxclr import config as config_lib, cpu
from jaxclr.evaluation import encoder as encoder_lib, linear
from jaxclr.jobs import export, finetune, linear_eval as job, pretrain
from jaxclr.models import simclr
from jaxclr.parallel import sharding
from jaxclr.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py"), arg)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 2-step synthetic pretraining run (labelled, 4 classes)."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  config = load_config_file("synthetic_tiny", "steps=2,every=1")
  pretrain.run(config, workdir)
  return workdir


def eval_config(pretrained_workdir, **overrides):
  c = load_config_file("linear_eval")
  c.pretrained_workdir = pretrained_workdir
  c.labels_per_class = (1, 3)
  c.num_label_draws = 2
  c.knn_k = 10
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def results_8dev(pretrained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval8"))
  job.run(eval_config(pretrained), out)
  with open(os.path.join(out, job.RESULTS_FILE)) as f:
    return json.load(f)


@pytest.mark.slow
def test_restore_reads_exactly_the_checkpoint(pretrained):
  """Encoder + head params and BN stats equal the raw Orbax arrays."""
  mesh = sharding.make_mesh("auto")
  enc = encoder_lib.restore_encoder(pretrained, mesh)
  steps = workdir_lib.checkpoint_steps(pretrained)
  assert enc.checkpoint_step == max(steps) == 2
  raw = ocp.StandardCheckpointer().restore(
      os.path.join(pretrained, "checkpoints", "2", "state"))
  for col in ("params", "batch_stats"):
    want = {k: raw[col][k] for k in encoder_lib.VARIABLE_PARTS}
    got = jax.device_get(enc.variables[col])
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # An earlier step is a different, also exact, restore.
  enc1 = encoder_lib.restore_encoder(pretrained, mesh, step=1)
  assert enc1.checkpoint_step == 1
  a = jax.tree.leaves(jax.device_get(enc1.variables["params"]))
  b = jax.tree.leaves(jax.device_get(enc.variables["params"]))
  assert any(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_results_schema(results_8dev):
  r = results_8dev
  for key in ("top1", "top5", "knn_top1"):
    assert 0.0 <= r[key] <= 1.0, key
  assert r["top5"] >= r["top1"]
  assert set(r["few_label_top1"]) == {"1", "3"}
  assert set(r["few_label_top1_std"]) == {"1", "3"}
  assert all(0.0 <= v <= 1.0 for v in r["few_label_top1"].values())
  assert r["checkpoint_step"] == 2 and r["protocol"] == "fast"
  assert r["random_init"] is False and r["num_devices"] == 8
  assert r["num_train_examples"] == 64 and r["num_eval_examples"] == 64
  # synthetic (random labels) is evaluated on its training split, and says so.
  assert (r["train_split"], r["eval_split"], r["eval_on_train"]) == (
      "train", "train", True)
  assert r["feature_dim"] == 64  # ResNet-18 x 1/8: 512 / 8.


@pytest.mark.slow
def test_layout_invariance(pretrained, results_8dev, tmp_path):
  """1 device gives the same accuracies as 8 (features, probes, kNN)."""
  mesh1 = sharding.make_mesh("auto", jax.devices()[:1])
  r1 = job.run(eval_config(pretrained), str(tmp_path), mesh=mesh1)
  assert r1["num_devices"] == 1
  for key in ("top1", "top5", "knn_top1", "few_label_top1",
              "few_label_top1_std"):
    assert r1[key] == results_8dev[key], key


@pytest.mark.slow
def test_knn_protocol_runs_the_knn_alone(pretrained, results_8dev, tmp_path):
  """protocol='knn': the same kNN accuracy as the full job, no linear or
  few-label probe (null / empty in results.json), even with knn=False."""
  r = job.run(eval_config(pretrained, protocol="knn", knn=False),
              str(tmp_path))
  with open(tmp_path / job.RESULTS_FILE) as f:
    assert json.load(f) == json.loads(json.dumps(r))
  assert r["knn_top1"] == results_8dev["knn_top1"]
  assert r["top1"] is None and r["top5"] is None
  assert r["few_label_top1"] == {} and r["few_label_top1_std"] == {}
  assert r["protocol"] == "knn" and r["knn"]["k"] == 10
  assert "linear_s" not in r["wall_times"] and "knn_s" in r["wall_times"]


def paper_state(out):
  path = os.path.join(out, "checkpoints", str(max(
      workdir_lib.checkpoint_steps(out))), "state")
  return ocp.StandardCheckpointer().restore(path)


@pytest.mark.slow
def test_paper_protocol_schedule_resume_and_no_unused_features(
    pretrained, monkeypatch, tmp_path):
  """SGD-Nesterov head: the logged learning rates follow 0.1 x B/256 with a
  cosine to 0 (no warmup); a run resumed from its step-2 checkpoint ends
  bitwise where the uninterrupted one does; with no few-label probe and no
  kNN the training split is never embedded (only the eval split is)."""
  embedded = []
  features = job._features  # pylint: disable=protected-access

  def recording(*args):
    embedded.append(args[4])
    return features(*args)
  monkeypatch.setattr(job, "_features", recording)
  c = eval_config(pretrained, protocol="paper", batch_size=16, num_epochs=1.0,
                  labels_per_class=(), knn=False, log_every_steps=1,
                  checkpoint_every_steps=2, max_checkpoints_to_keep=3)
  out = str(tmp_path / "paper")
  r = job.run(c, out)
  assert embedded == ["eval"]
  # Every job's step count: num_examples x epochs // B + 1 (the reference's).
  total = 64 * 1 // 16 + 1
  assert r["paper"]["steps"] == total and r["num_train_examples"] == 64
  assert r["few_label_top1"] == {} and r["knn_top1"] is None
  assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
  peak = 0.1 * 16 / 256
  with open(os.path.join(out, "metrics.jsonl")) as f:
    lrs = [json.loads(line)["learning_rate"] for line in f]
  want = [peak * 0.5 * (1 + np.cos(np.pi * t / total)) for t in range(total)]
  np.testing.assert_allclose(lrs, want, rtol=1e-6)
  assert lrs[0] == pytest.approx(peak)  # No warmup.

  resumed = str(tmp_path / "resumed")
  shutil.copytree(out, resumed)
  for step in (4, total):  # As if killed after the step-2 checkpoint.
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  os.remove(os.path.join(resumed, job.RESULTS_FILE))
  r2 = job.run(c, resumed)
  assert r["paper"]["resumed_from_step"] == 0
  assert r2["paper"]["resumed_from_step"] == 2
  assert (r2["top1"], r2["top5"]) == (r["top1"], r["top5"])
  jax.tree.map(np.testing.assert_array_equal, paper_state(resumed),
               paper_state(out))


@pytest.mark.slow
def test_architecture_mismatch_is_named(pretrained, tmp_path):
  c = eval_config(pretrained)
  c.model.depth, c.model.width_multiplier = 34, 0.125  # 0.125 matches.
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.depth=34 \(checkpoint has 18\)") as e:
    job.run(c, str(tmp_path))
  assert "width_multiplier" not in str(e.value)


@pytest.mark.slow
def test_one_device_kernel_grad_of_the_run_is_not_inherited(pretrained,
                                                            tmp_path):
  """conv_kernel_grad says how the pretraining job ran on its one device:
  a run saved with 'patches' (one device only) still evaluates on these 8,
  and an eval job's own explicit 'patches' is what gets refused."""
  run = str(tmp_path / "run")
  shutil.copytree(pretrained, run)
  path = os.path.join(run, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["model"]["conv_kernel_grad"] = "patches"
  saved["model"]["conv_library"] = "onednn"
  with open(path, "w") as f:
    json.dump(saved, f)
  mesh = sharding.make_mesh("auto")
  assert jax.device_count() == 8
  enc = encoder_lib.restore_encoder(run, mesh)
  assert enc.model_config["conv_kernel_grad"] == "auto"
  assert encoder_lib.pretraining_config(run).model.conv_kernel_grad == "auto"
  assert enc.model_config["conv_library"] == "auto"
  want = encoder_lib.restore_encoder(pretrained, mesh).variables
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(enc.variables), jax.device_get(want))
  # The eval job chooses its convolution from its own config (jaxclr/cpu).
  with pytest.raises(config_lib.ConfigError,
                     match=r"conv_kernel_grad='patches' runs on one device"):
    cpu.job_convolution({"conv_kernel_grad": "patches"})
  with pytest.raises(config_lib.ConfigError,
                     match=r"conv_library='onednn' cannot run here: it runs "
                     "on one device"):
    cpu.job_convolution({"conv_library": "onednn"})


def test_not_a_workdir_and_random_init_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(workdir_lib.WorkdirError, match="not a jaxclr"):
    job.run(eval_config(str(empty)), str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match="model.depth"):
    job.run(eval_config("none"), str(tmp_path / "out2"))
  with pytest.raises(config_lib.ConfigError, match="protocol='slow'"):
    job.run(eval_config(str(empty), protocol="slow"), str(tmp_path / "out3"))
  with pytest.raises(config_lib.ConfigError,
                     match=r"eval_batch_size: batch_size=100 must be divisible"
                     r" by the number of devices \(8\)"):
    job.run(eval_config(str(empty), eval_batch_size=100),
            str(tmp_path / "out4"))
  assert not (tmp_path / "out4").exists()  # Refused before the workdir.


def test_evaluation_reads_the_labelled_training_split():
  """STL-10 pretrains on 'unlabelled' (labels -1): probes and kNN banks must
  read its labelled 'train' split, unless the eval config names a split."""
  c = eval_config("none", dataset="stl10", image_size=96)
  d = job.labelled_data_spec(c)
  assert (d.dataset, d.train_split) == ("stl10", "train")
  c.train_split = "unlabelled"
  d = job.labelled_data_spec(c)
  assert d.train_split == "unlabelled"
  assert not d.augment.color_jitter_prob and not d.augment.use_blur


def test_evaluating_on_the_training_split_is_refused(tmp_path):
  """Data in one pile has no held-out split: refused before the workdir or
  any compilation, naming the split; a held-out split or the flag passes."""
  path = str(tmp_path / "pile.npz")
  np.savez(path, images=np.zeros((8, 8, 8, 3), np.uint8),
           labels=np.arange(8) % 2)
  ft = load_config_file("finetune", "random_init")
  c = load_config_file("linear_eval", "random_init")
  for config in (ft, c):
    config.pretrained_workdir, config.dataset = "none", f"npz:{path}"
    config.image_size = 8
  with pytest.raises(config_lib.ConfigError,
                     match=r"^fine-tuning would be evaluated on split 'train'"):
    finetune.run(ft, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError,
                     match=r"^the linear probe would be evaluated on split "
                     r"'train', .*holdout_fraction.*allow_eval_on_train=True"):
    job.run(c, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  c.protocol, c.eval_split = "knn", "all"  # 'all' holds 'train' too.
  with pytest.raises(config_lib.ConfigError, match="^the kNN .* split 'all'"):
    job.run(c, str(tmp_path / "out"))
  c.eval_split, c.holdout_fraction = None, 0.25
  spec = job.labelled_data_spec(c)
  assert job.checked_splits(c, spec, "x") == ("train", "holdout")
  c.holdout_fraction, c.allow_eval_on_train = None, True
  assert job.checked_splits(c, job.labelled_data_spec(c), "x") == (
      "train", "train")


def test_class_balanced_subsets_are_balanced_and_deterministic():
  labels = np.repeat(np.arange(7), [5, 9, 3, 12, 8, 2, 20])
  a = linear.class_balanced_subset(labels, 3, seed=0, draw=0)
  np.testing.assert_array_equal(np.bincount(labels[a]), [3, 3, 3, 3, 3, 2, 3])
  np.testing.assert_array_equal(a, linear.class_balanced_subset(labels, 3, 0, 0))
  assert not np.array_equal(a, linear.class_balanced_subset(labels, 3, 0, 1))
  assert len(np.unique(a)) == len(a)
  f = linear.label_fraction_subset(labels, 0.25, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[f]),
                                [1, 2, 1, 3, 2, 1, 5])


@pytest.mark.slow
def test_lbfgs_probe_reaches_the_regularised_optimum():
  """Same optimum as scikit-learn's L-BFGS (C = 1 / (n * l2)), on 8 devices."""
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  x = rng.normal(size=(203, 16)).astype(np.float32)
  y = (x[:, :3] @ rng.normal(size=(3, 4))).argmax(1)
  l2 = 1e-2
  params, _ = linear.fit_logistic_regression(
      x, y, num_classes=4, l2=l2, mesh=sharding.make_mesh("auto"),
      max_iters=500, pad_to=256)
  sk = LogisticRegression(C=1 / (len(y) * l2), tol=1e-10, max_iter=10000)
  sk.fit(x, y)
  # Softmax is invariant to a per-row shift of W; L2 picks zero-mean rows.
  w = params["kernel"] - params["kernel"].mean(1, keepdims=True)
  np.testing.assert_allclose(w, sk.coef_.T, atol=2e-3)


@pytest.mark.slow
def test_export_round_trip(pretrained, tmp_path):
  path = str(tmp_path / "enc.npz")
  manifest = export.export_encoder(pretrained, path)
  assert manifest["model"]["depth"] == 18 and manifest["image_size"] == 8
  assert manifest["feature_dim"] == 64 and manifest["checkpoint_step"] == 2
  embed = jaxclr.load_encoder(path)
  images = np.random.default_rng(0).uniform(size=(6, 8, 8, 3)).astype(np.float32)
  got = np.asarray(embed(images))
  # In-process: the restored encoder module on the checkpoint's variables.
  mesh = sharding.make_mesh("auto", jax.devices()[:1])
  enc = encoder_lib.restore_encoder(pretrained, mesh)
  cfg = encoder_lib.pretraining_config(pretrained)
  net = simclr.build_encoder(cfg.model, cfg.image_size)
  v = {c: enc.variables[c]["encoder"] for c in ("params", "batch_stats")}
  want = np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(v, images))
  np.testing.assert_array_equal(got, want)
  assert got.shape == (6, 64) and np.std(got) > 0


@pytest.mark.slow
def test_load_encoder_has_no_custom_call_unless_asked(pretrained, tmp_path):
  """An exported encoder runs on XLA's convolutions: no custom call in the
  compiled program of the returned function called on images (this CPU
  process included). conv_library='onednn' asks for jaxclr/cpu's path:
  the control, whose custom calls are there, equal to float32 round-off."""
  path = str(tmp_path / "enc.npz")
  export.export_encoder(pretrained, path)
  images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(
      np.float32)
  compiled = lambda embed: jax.jit(embed).lower(images).compile().as_text()
  embed = jaxclr.load_encoder(path)
  assert "custom-call" not in compiled(embed)
  onednn = jaxclr.load_encoder(path, conv_library="onednn")
  assert 'custom_call_target="jaxclr_onednn_conv2d"' in compiled(onednn)
  want = np.asarray(embed(images))
  np.testing.assert_allclose(onednn(images), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())
  with pytest.raises(config_lib.ConfigError, match="'mkl'; valid: auto"):
    jaxclr.load_encoder(path, conv_library="mkl")
