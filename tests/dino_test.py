"""DINO: its loss and centre against a NumPy version of main_dino.py's
DINOLoss, globally and on 8 devices (and the per-device centre that the
tolerance catches), its schedules, one step's wiring (teacher EMA, centre,
frozen last layer, the logged loss), 1 = 8 devices over 3 multi-crop steps
with a planted per-device centre failing that test, and exact resume after
SIGKILL."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.methods import byol, dino, prototypes
from jaxclr.parallel import sharding

import methods_util
import train_test

NUM_STEPS = 3


def tiny_dino_config(**fields):
  # 4 steps per epoch (64 examples, B=16): the last layer is frozen for 2
  # steps, the teacher temperature warms up per epoch, a low tau_base moves
  # the teacher visibly; two 4 px local crops beside the 8 px views.
  return methods_util.tiny_config(
      method="dino", dino__num_prototypes=32, dino__tau_base=0.5,
      dino__freeze_last_layer_epochs=0.5,
      dino__warmup_teacher_temperature_epochs=3,
      augment__num_local_crops=2, augment__local_crop_size=4, **fields)


# ------------------------------------------------------------ the formula
def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_dino_loss(student, teacher, center, temperature,
                    student_temperature=0.1, center_momentum=0.9):
  """facebookresearch/dino main_dino.py DINOLoss.forward and update_center,
  in float64, crop by crop: student [B, V, K] (global crops first),
  teacher [B, 2, K]. Returns (loss, new centre)."""
  student, teacher = (np.asarray(x, np.float64) for x in (student, teacher))
  q = np.exp(_log_softmax((teacher - center) / temperature))
  total, terms = 0.0, 0
  for iq in range(2):
    for v in range(student.shape[1]):
      if v == iq:
        continue
      log_p = _log_softmax(student[:, v] / student_temperature)
      total += np.mean(np.sum(-q[:, iq] * log_p, axis=-1))
      terms += 1
  # update_center: the sum over every teacher row (both global crops),
  # all-reduced, over len(teacher_output) * world size.
  rows = teacher.reshape(-1, teacher.shape[-1])
  batch_center = rows.sum(axis=0) / len(rows)
  return total / terms, (center * center_momentum +
                         batch_center * (1 - center_momentum))


def _scores(seed, batch=16, views=4, k=24):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(batch, views, k)).astype(np.float32)
  teacher = rng.normal(size=(batch, 2, k)).astype(np.float32)
  center = (0.3 * rng.normal(size=(k,))).astype(np.float32)
  return student, teacher, center


def _sharded(mesh, x):
  return jax.device_put(x, sharding.batch_sharded(mesh))


def _loss_fn(mesh, **kw):
  kw = {"student_temperature": 0.1, "center_momentum": 0.9, **kw}
  if mesh is None:
    return jax.jit(functools.partial(dino.dino_loss, **kw))
  return jax.jit(functools.partial(dino.sharded_dino_loss, mesh=mesh, **kw))


@pytest.mark.parametrize("views", [2, 5])
def test_loss_and_centre_equal_numpy_globally_and_on_8_devices(views):
  student, teacher, center = _scores(0, views=views)
  want_loss, want_center = numpy_dino_loss(student, teacher, center, 0.05)
  mesh = sharding.make_mesh("explicit")
  for fn, args in ((_loss_fn(None), (student, teacher)),
                   (_loss_fn(mesh), (_sharded(mesh, student),
                                     _sharded(mesh, teacher)))):
    loss, metrics, new_center = fn(*args, center, jnp.float32(0.05))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(new_center, want_center, rtol=1e-6, atol=1e-7)
    assert 0 < float(metrics["dino_teacher_entropy"]) < np.log(24)


@pytest.mark.slow
def test_gradient_on_8_devices_is_the_global_one():
  student, teacher, center = _scores(1)
  mesh = sharding.make_mesh("explicit")
  grad_global = jax.grad(lambda s: _loss_fn(None)(
      s, teacher, center, jnp.float32(0.04))[0])(student)
  sharded_teacher = _sharded(mesh, teacher)
  grad_8 = jax.jit(jax.grad(lambda s: _loss_fn(mesh)(
      s, sharded_teacher, center, jnp.float32(0.04))[0]))(
          _sharded(mesh, student))
  np.testing.assert_allclose(grad_8, grad_global, rtol=1e-5, atol=1e-8)
  # The teacher gets no gradient (stop-gradient, as torch's detach).
  grad_teacher = jax.grad(lambda t: _loss_fn(None)(
      student, t, center, jnp.float32(0.04))[0])(teacher)
  assert not np.any(grad_teacher)


def first_shard_center(teacher, axis_name):
  """The planted bug: the centre from one device's rows (what a missing
  all-reduce leaves when DDP broadcasts rank 0's buffers)."""
  local = jnp.mean(teacher, axis=(0, 1))
  return jax.lax.all_gather(local, axis_name, to="invarying")[0]


def test_tolerance_catches_a_per_device_centre(monkeypatch):
  student, teacher, center = _scores(2)
  _, want_center = numpy_dino_loss(student, teacher, center, 0.05)
  mesh = sharding.make_mesh("explicit")
  monkeypatch.setattr(dino, "batch_center", first_shard_center)
  _, _, got = _loss_fn(mesh)(_sharded(mesh, student), _sharded(mesh, teacher),
                             center, jnp.float32(0.05))
  rel = train_test.relative_difference(got, want_center)
  assert rel > 1000 * 1e-6, rel


@pytest.mark.slow
def test_teacher_temperature_is_main_dinos_schedule():
  warmup, final, w, epochs, per_epoch = 0.04, 0.07, 30, 100, 7
  want = np.concatenate((np.linspace(warmup, final, w),
                         np.ones(epochs - w) * final))
  for step in (0, 6, 7, 29 * 7 + 6, 30 * 7, 99 * 7):
    got = dino.teacher_temperature(step, steps_per_epoch=per_epoch,
                                   warmup=warmup, final=final,
                                   warmup_epochs=w)
    np.testing.assert_allclose(got, want[step // per_epoch], rtol=1e-6)
  # No warm-up (main_dino.py's own default): the final value throughout.
  assert float(dino.teacher_temperature(0, steps_per_epoch=7, warmup=0.04,
                                        final=0.07, warmup_epochs=0)) == (
      pytest.approx(0.07))


# ------------------------------------------------------------ the step
def run_steps(config, mesh, num_steps=NUM_STEPS):
  """num_steps steps of the job's step; (state, metrics of the last)."""
  trainer, _ = methods_util.make_trainer(config, mesh)
  data = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      data, input_pipeline.open_source(data, "train"),
      batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  for _ in range(num_steps):
    state, metrics = trainer.step_fn(state,
                                     sharding.global_batch(mesh, next(batches)))
  return jax.device_get(state), jax.device_get(metrics)


def _prototype_leaves(state):
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      (state.params, state.opt_state)) if prototypes._under(path, "prototypes")]  # pylint: disable=protected-access


@pytest.mark.slow
def test_steps_follow_the_formula_teacher_ema_centre_and_freeze():
  """The job's step, one step at a time on one device: the logged loss is
  numpy_dino_loss of the student's scores (global and local crops, two
  passes) against the teacher's (global crops), the centre moves by the
  teacher's batch mean, the teacher by the scheduled EMA of the student,
  and the last layer (params and momentum) stays put for 2 steps."""
  config = tiny_dino_config()
  mesh = sharding.make_mesh("explicit", jax.devices()[:1])
  trainer, plan = methods_util.make_trainer(config, mesh)
  teacher_model = trainer.model.clone(num_classes=0)
  data = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      data, input_pipeline.open_source(data, "train"),
      batch_size=16, start_step=0, process_index=0, process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  assert isinstance(state, dino.DinoTrainState)
  assert set(state.target["params"]) == set(dino.TEACHER_PARTS)
  for step in range(NUM_STEPS):
    batch = next(batches)
    before = jax.device_get(state)
    variables = {"params": before.params, "batch_stats": before.batch_stats}
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
    student = [np.asarray(trainer.model.apply(
        variables, flat(batch[key]), train=True, mutable=["batch_stats"])[0]
        ["prototype_scores"]).reshape(16, n, -1)
               for key, n in (("images", 2), ("local_images", 2))]
    teacher = np.asarray(teacher_model.apply(
        before.target, flat(batch["images"]), train=True,
        mutable=["batch_stats"])[0]["prototype_scores"]).reshape(16, 2, -1)
    temperature = dino.teacher_temperature(
        step, steps_per_epoch=plan.steps_per_epoch, warmup=0.04, final=0.07,
        warmup_epochs=3)
    want_loss, want_center = numpy_dino_loss(
        np.concatenate(student, axis=1), teacher, before.center, temperature)
    state, metrics = trainer.step_fn(state, sharding.global_batch(mesh, batch))
    after = jax.device_get(state)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=2e-5)
    np.testing.assert_allclose(after.center, want_center, rtol=1e-4,
                               atol=1e-6)
    tau = byol.target_tau(step, plan.total_steps, 0.5)
    moved = byol.target_part({"params": after.params, "batch_stats": {}},
                             dino.TEACHER_PARTS)["params"]
    for got, old, new in zip(*(jax.tree.leaves(t) for t in (
        after.target["params"], before.target["params"], moved))):
      np.testing.assert_allclose(got, tau * old + (1 - tau) * new,
                                 rtol=1e-6, atol=1e-7)
    frozen = step < prototypes.frozen_steps(0.5, plan.steps_per_epoch)
    changed = [np.any(a != b) for a, b in zip(_prototype_leaves(after),
                                              _prototype_leaves(before))]
    assert not any(changed) if frozen else all(changed), (step, changed)


@functools.lru_cache(maxsize=None)
def one_device_run():
  return run_steps(tiny_dino_config(),
                   sharding.make_mesh("explicit", jax.devices()[:1]))


def assert_same_extra_state(state, ref_state, fields):
  for name in fields:
    got = train_test.flat_concat(getattr(state, name))
    want = train_test.flat_concat(getattr(ref_state, name))
    assert train_test.relative_difference(got, want) < (
        train_test.WHOLE_TREE_RTOL["params"]), name


def assert_same_run(state, metrics, ref_state, ref_metrics, fields, keys):
  train_test.assert_same_state(state, ref_state)
  assert_same_extra_state(state, ref_state, fields)
  for key in keys:
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_dino_steps_are_layout_invariant(axis_type):
  """3 multi-crop steps on 8 devices equal 1 device: parameters, BN
  statistics, optimizer state, teacher and centre, within the SimCLR
  step's round-off tolerances (tests/train_test.py explains them)."""
  ref_state, ref_metrics = one_device_run()
  state, metrics = run_steps(tiny_dino_config(), sharding.make_mesh(axis_type))
  assert int(state.step) == NUM_STEPS
  assert_same_run(state, metrics, ref_state, ref_metrics,
                  ("target", "center"),
                  ("loss", "dino_teacher_entropy", "probe_loss", "grad_norm"))


@pytest.mark.slow
def test_layout_tolerance_catches_a_per_device_centre(monkeypatch):
  ref_state, ref_metrics = one_device_run()
  monkeypatch.setattr(dino, "batch_center", first_shard_center)
  state, metrics = run_steps(tiny_dino_config(),
                             sharding.make_mesh("explicit"))
  rel = train_test.relative_difference(state.center, ref_state.center)
  assert rel > 100 * train_test.WHOLE_TREE_RTOL["params"], rel
  with pytest.raises(AssertionError):
    assert_same_run(state, metrics, ref_state, ref_metrics,
                    ("target", "center"), ("loss",))


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_with_teacher_and_centre(tmp_path):
  state = methods_util.assert_sigkill_resume_is_bitwise(
      tiny_dino_config(steps=6, every=2), tmp_path)
  assert isinstance(state, dict) and np.any(state["center"] != 0)


def test_the_prototype_layer_is_cosine_scores_with_weight_norm():
  """DINO's last layer: unit(x) @ (v / |v|) per prototype, gain 1."""
  from jaxclr.models import heads  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  for weight_norm in (True, False):
    layer = heads.Prototypes(num_prototypes=7, weight_norm=weight_norm)
    variables = layer.init(jax.random.key(0), x)
    v = np.asarray(variables["params"]["kernel"], np.float64)
    assert v.shape == (6, 7) and np.abs(v).max() <= 1 / np.sqrt(6)
    w = v / np.linalg.norm(v, axis=0) if weight_norm else v
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(layer.apply(variables, x), unit @ w,
                               rtol=1e-5, atol=1e-6)


def _config_file(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(train_test.TINY_CONFIG), f"{name}.py"), arg)


def test_recipes_are_the_published_ones():
  """configs/dino.py: solo-learn's CIFAR-10 DINO; configs/imagenet.py:
  method=dino: the README's ResNet-50 command (docs/losses.md, DINO)."""
  c = _config_file("dino")
  assert (c.method, c.optimizer, c.learning_rate, c.weight_decay,
          c.trust_coefficient, c.batch_size, c.num_epochs,
          c.model.depth) == ("dino", "lars", 0.3, 1e-6, 0.02, 256, 1000, 18)
  assert (c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim) == (3, 2048, 256)
  assert c.dino.to_dict() == {
      "num_prototypes": 4096, "student_temperature": 0.1,
      "teacher_temperature": 0.07, "warmup_teacher_temperature": 0.04,
      "warmup_teacher_temperature_epochs": 0, "center_momentum": 0.9,
      "tau_base": 0.9995, "freeze_last_layer_epochs": 1.0}
  assert c.augment.num_local_crops == 0
  assert _config_file("dino", "local_crops=6").augment.num_local_crops == 6
  c = _config_file("imagenet", "method=dino")
  assert (c.optimizer, c.learning_rate, c.learning_rate_scaling,
          c.weight_decay, c.warmup_epochs, c.num_epochs) == (
              "sgd", 0.03, "linear", 1e-4, 10.0, 100)
  a = c.augment
  assert (a.crop_area_range, a.num_local_crops, a.local_crop_size,
          a.local_crop_area_range) == ((0.14, 1.0), 8, 96, (0.05, 0.14))
  assert (c.dino.num_prototypes, c.dino.tau_base,
          c.dino.warmup_teacher_temperature_epochs) == (65536, 0.996, 30)
