"""Distillation: the loss against its formula, the teachers restored exactly
(fine-tuned workdir and pretraining-format supervised head), the results
schema, the student's first loss, exact resume, no labels reaching the
student, user errors before anything is written."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_finetune_test as ft  # Its fixtures and config helpers.
from eval_finetune_test import finetuned, pretrained  # noqa: F401 (fixtures)
from jaxclr import config as config_lib
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.jobs import distill, pretrain
from jaxclr.parallel import sharding
from jaxclr.training import metrics, workdir as workdir_lib

STEPS, BATCH = 4, 8


def reference_distillation_loss(student, teacher, tau):
  """-sum_c p_c log q_c per row in float64, p = softmax(t/tau), q =
  softmax(s/tau), averaged over rows: written out element by element."""
  total = 0.0
  for s_row, t_row in zip(np.float64(student), np.float64(teacher)):
    p = np.exp(t_row / tau) / np.sum(np.exp(t_row / tau))
    log_q = s_row / tau - np.log(np.sum(np.exp(s_row / tau)))
    total += -sum(pc * lq for pc, lq in zip(p, log_q))
  return total / len(student)


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_loss_equals_the_formula_and_its_gradient(tau):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 5)).astype(np.float32) * 3
  got = distill.distillation_loss(jnp.asarray(s), jnp.asarray(t),
                                  temperature=tau)
  np.testing.assert_allclose(got, reference_distillation_loss(s, t, tau),
                             rtol=1e-5)
  scaled = distill.distillation_loss(jnp.asarray(s), jnp.asarray(t),
                                     temperature=tau,
                                     scale_by_temperature_squared=True)
  np.testing.assert_allclose(scaled, tau**2 * got, rtol=1e-6)
  # d/ds of the mean soft cross-entropy: (softmax(s/T) - softmax(t/T)) / (T N).
  grad = jax.grad(lambda x: distill.distillation_loss(
      x, jnp.asarray(t), temperature=tau))(jnp.asarray(s))
  expected = (jax.nn.softmax(s / tau) - jax.nn.softmax(t / tau)) / (tau * 6)
  np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.slow
def test_labelled_loss_averages_the_known_rows_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3)).astype(np.float32)
  labels = np.array([2, -1, 0, -1, 1], np.int32)
  known = [i for i in range(5) if labels[i] >= 0]
  expected = np.mean([np.log(np.sum(np.exp(logits[i]))) - logits[i, labels[i]]
                      for i in known])
  np.testing.assert_allclose(distill.labelled_loss(logits, labels), expected,
                             rtol=1e-5)
  assert float(distill.labelled_loss(logits, np.full(5, -1, np.int32))) == 0.0


def distill_config(teacher_workdir, **overrides):
  c = ft.load_config_file("distill")
  c.teacher_workdir = teacher_workdir
  c.batch_size, c.num_train_steps, c.eval_batch_size = BATCH, STEPS, 64
  c.learning_rate = 2.0
  c.log_every_steps, c.checkpoint_every_steps = 1, 2
  c.max_checkpoints_to_keep = 5
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def distilled(finetuned, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("distill"))
  distill.run(distill_config(finetuned[0]), out)
  with open(os.path.join(out, "results.json")) as f:
    return out, json.load(f)


@pytest.mark.slow
def test_results_and_the_restored_teacher(finetuned, pretrained, distilled):
  ft_dir, ft_results = finetuned
  out, r = distilled
  assert r["protocol"] == "distill" and r["teacher_kind"] == "finetune"
  assert r["teacher_workdir"] == os.path.abspath(ft_dir)
  # The teacher, rebuilt from the workdir and restored, scores exactly what
  # the fine-tuning job measured on the same eval split.
  assert (r["teacher_top1"], r["teacher_top5"]) == (ft_results["top1"],
                                                    ft_results["top5"])
  # The default student starts from the teacher's pretrained encoder.
  assert r["pretrained_workdir"] == os.path.abspath(pretrained)
  assert r["checkpoint_step"] == 2 and not r["random_init"]
  assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
  assert r["knn_top1"] is None and r["few_label_top1"] == {}
  assert r["steps"] == STEPS and r["num_classes"] == 4
  assert r["num_train_examples"] == 64 and r["num_labelled_examples"] == 0
  assert r["label_subset"] is None and r["temperature"] == 1.0
  # synthetic's labels are random: its one split may be evaluated on.
  assert (r["train_split"], r["eval_split"], r["eval_on_train"]) == (
      "train", "train", True)
  records = [x for x in metrics.read_records(out) if "loss" in x]
  assert [x["step"] for x in records] == list(range(1, STEPS + 1))
  # The student's classifier starts at zero: uniform predictions, so the
  # first loss is -sum p log(1/C) = ln C whatever the teacher says.
  assert records[0]["distill_loss"] == pytest.approx(math.log(4), rel=1e-6)
  assert all(0.0 <= x["teacher_agreement"] <= 1.0 for x in records)


@pytest.mark.slow
def test_resume_is_exact(finetuned, distilled, tmp_path):
  out, results = distilled
  resumed = ft.interrupted_copy(out, str(tmp_path / "resumed"), after_step=2)
  r = distill.run(distill_config(finetuned[0]), resumed)
  assert r["resumed_from_step"] == 2
  jax.tree.map(np.testing.assert_array_equal, ft.saved_state(resumed, STEPS),
               ft.saved_state(out, STEPS))
  assert (r["top1"], r["top5"]) == (results["top1"], results["top5"])
  with pytest.raises(workdir_lib.WorkdirError, match="temperature: 1.0 -> 2.0"):
    distill.run(distill_config(finetuned[0], temperature=2.0), resumed)


@pytest.mark.slow
def test_pretraining_teacher_is_its_supervised_head(pretrained):
  """A pretraining-format workdir (what jaxclr.convert writes) teaches with
  its supervised head: logits = h W + b, with h from the encoder restored by
  the evaluation path and W, b read from the checkpoint file directly."""
  mesh = sharding.make_mesh("auto")
  teacher = distill.load_teacher(pretrained, mesh)
  assert (teacher.kind, teacher.num_classes, teacher.checkpoint_step) == (
      "pretraining", 4, 2)
  images = np.random.default_rng(2).uniform(size=(8, 8, 8, 3)).astype(
      np.float32)
  encoder = encoder_lib.restore_encoder(pretrained, mesh)
  h = encoder.model.apply(encoder.variables, images, train=False)["h"]
  head = ft.saved_state(pretrained, 2)["params"]["linear_head"]
  dense = head[next(iter(head))] if "kernel" not in head else head
  expected = np.asarray(h) @ dense["kernel"] + dense["bias"]
  np.testing.assert_allclose(teacher.apply(teacher.variables, images),
                             expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_student_sees_no_label(finetuned):
  mesh = sharding.make_mesh("auto")
  teacher = distill.load_teacher(finetuned[0], mesh)
  config = distill._student_config(distill_config(finetuned[0]), teacher)
  _, _, src, subset, n = distill._student_data(config, teacher)
  assert subset is None and n == 0 and np.all(src.labels == -1)
  config = distill._student_config(
      distill_config(finetuned[0], labelled_weight=1.0, labels_per_class=2),
      teacher)
  _, _, src, subset, n = distill._student_data(config, teacher)
  assert n == 8 and np.sum(src.labels >= 0) == 8
  assert np.bincount(src.labels[src.labels >= 0]).tolist() == [2, 2, 2, 2]


@pytest.mark.slow
def test_user_errors_come_first(pretrained, finetuned, tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(config_lib.ConfigError, match="teacher_workdir is "
                     "required"):
    distill.run(distill_config(None), out)
  with pytest.raises(workdir_lib.WorkdirError, match="does not exist"):
    distill.run(distill_config(str(tmp_path / "nope")), out)
  with pytest.raises(config_lib.ConfigError, match=r"labelled_weight=1.0 "
                     r"needs exactly one label subset, got 0"):
    distill.run(distill_config(finetuned[0], labelled_weight=1.0), out)
  with pytest.raises(config_lib.ConfigError, match=r"labels_per_class=2 has "
                     r"no effect with labelled_weight=0"):
    distill.run(distill_config(finetuned[0], labels_per_class=2), out)
  with pytest.raises(config_lib.ConfigError, match="temperature=0.0"):
    distill.run(distill_config(finetuned[0], temperature=0.0), out)
  with pytest.raises(config_lib.ConfigError, match=r"teacher_view='raw'; "
                     r"valid: \('same', 'clean'\)"):
    distill.run(distill_config(finetuned[0], teacher_view="raw"), out)
  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(finetuned[0], unfinished)
  os.remove(os.path.join(unfinished, "results.json"))
  with pytest.raises(workdir_lib.WorkdirError, match="has not finished"):
    distill.run(distill_config(unfinished), out)
  assert not os.path.exists(out)


@pytest.mark.slow
def test_big_to_small_student_starts_from_its_own_run(finetuned, tmp_path):
  """SimCLRv2's big-to-small setting: the teacher fine-tuned from one
  pretraining run, the student a narrower network that starts from another
  run's encoder (--config.pretrained_workdir), not from the teacher's."""
  small = str(tmp_path / "small")
  c = ft.load_config_file("synthetic_tiny", "steps=2,every=1")
  c.model.width_multiplier = 0.0625
  pretrain.run(c, small)
  out = str(tmp_path / "out")
  # A learning rate so small that the student's parameters stay where they
  # started, to far below float32 round-off.
  r = distill.run(distill_config(finetuned[0], pretrained_workdir=small,
                                 learning_rate=1e-30, num_train_steps=2), out)
  assert r["pretrained_workdir"] == os.path.abspath(small)
  assert r["model"]["width_multiplier"] == 0.0625
  assert (r["teacher_top1"], r["teacher_top5"]) == (finetuned[1]["top1"],
                                                    finetuned[1]["top5"])
  start = ft.saved_state(small, 2)["params"]
  student = ft.saved_state(out, 2)["params"]["backbone"]
  assert "encoder" in student
  for part in encoder_lib.VARIABLE_PARTS:
    if part not in student:  # Head layers past ft_proj_selector are dropped.
      continue
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                         atol=1e-20),
                 student[part], start[part] if part == "encoder" else
                 {k: start[part][k] for k in student[part]})
