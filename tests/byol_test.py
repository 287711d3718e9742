"""BYOL: its numerics against hand formulas, its step across device layouts,
exact resume, and evaluation reading the online encoder."""

import functools
import math

import jax
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.methods import byol
from jaxclr.parallel import sharding

import methods_util
import train_test

NUM_STEPS = 3


def tiny_byol_config(**arg):
  # A low tau_base moves the target visibly in a few steps.
  return methods_util.tiny_config(method="byol",
                                  byol__predictor_hidden_dim=32,
                                  byol__tau_base=0.5, **arg)


def test_tau_schedule_is_the_hand_computed_cosine():
  total, base = 40, 0.99
  for step in (0, 1, 10, 20, 33, 40):
    want = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
    np.testing.assert_allclose(byol.target_tau(step, total, base), want,
                               rtol=0, atol=1e-7)
  assert float(byol.target_tau(0, total, base)) == pytest.approx(base)
  assert float(byol.target_tau(total, total, base)) == pytest.approx(1.0)


def test_ema_update_is_the_weighted_mean():
  rng = np.random.default_rng(0)
  target = {"a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": {"c": rng.normal(size=5).astype(np.float32)}}
  online = jax.tree.map(lambda x: x + 1.0, target)
  got = byol.ema_update(target, online, 0.75)
  np.testing.assert_allclose(got["a"], 0.75 * target["a"] + 0.25 * online["a"],
                             rtol=1e-6)
  np.testing.assert_allclose(got["b"]["c"],
                             0.75 * target["b"]["c"] + 0.25 * online["b"]["c"],
                             rtol=1e-6)


def numpy_byol_loss(p, z):
  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  p, z = unit(p.astype(np.float64)), unit(z.astype(np.float64))
  l12 = 2 - 2 * np.sum(p[:, 0] * z[:, 1], -1)
  l21 = 2 - 2 * np.sum(p[:, 1] * z[:, 0], -1)
  return np.mean(l12 + l21)


@pytest.mark.slow
def test_regression_loss_equals_numpy_globally_and_sharded():
  rng = np.random.default_rng(1)
  p = rng.normal(size=(16, 2, 8)).astype(np.float32)
  z = rng.normal(size=(16, 2, 8)).astype(np.float32)
  want = numpy_byol_loss(p, z)
  got, metrics = jax.jit(byol.regression_loss)(p, z)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  mesh = sharding.make_mesh("explicit")
  sharded = functools.partial(jax.device_put,
                              device=sharding.batch_sharded(mesh))
  got8, _ = jax.jit(byol.regression_loss)(sharded(p), sharded(z))
  np.testing.assert_allclose(got8, want, rtol=1e-5)
  # Gradient: the mean makes each image's term weigh 1/B on any layout.
  g1 = jax.grad(lambda a: byol.regression_loss(a, z)[0])(p)
  g8 = jax.jit(jax.grad(lambda a: byol.regression_loss(a, sharded(z))[0]))(
      sharded(p))
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-7)
  # Predictions aligned with the other view's targets: zero loss.
  aligned, m = byol.regression_loss(3.0 * z[:, ::-1], z)
  assert float(aligned) == pytest.approx(0.0, abs=1e-5)
  assert float(m["byol_cosine"]) == pytest.approx(1.0, abs=1e-6)


@functools.lru_cache(maxsize=None)
def one_device_run():
  mesh = sharding.make_mesh("explicit", jax.devices()[:1])
  return train_test.run_steps(tiny_byol_config(), mesh)


@pytest.mark.slow
def test_byol_state_starts_with_the_target_equal_to_the_online_network():
  trainer, _ = methods_util.make_trainer(tiny_byol_config(),
                            sharding.make_mesh("explicit", jax.devices()[:1]))
  state = jax.device_get(trainer.init_fn(jax.random.key(0)))
  assert isinstance(state, byol.ByolTrainState)
  assert set(state.params) == {"encoder", "projection_head", "predictor",
                               "linear_head"}
  assert "bn1" not in state.params["predictor"]  # No BN on q's output.
  for kind in ("params", "batch_stats"):
    for part in byol.TARGET_PARTS:
      for a, b in zip(jax.tree.leaves(state.target[kind][part]),
                      jax.tree.leaves(getattr(state, kind)[part])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_one_step_moves_the_target_by_the_scheduled_ema():
  config = tiny_byol_config()
  mesh = sharding.make_mesh("explicit", jax.devices()[:1])
  trainer, plan = methods_util.make_trainer(config, mesh)
  state = trainer.init_fn(jax.random.key(config.seed))
  before = jax.device_get(state.target)
  src = input_pipeline.open_source(config_lib.data_spec(config), "train")
  batch = next(input_pipeline.pretrain_batches(
      config_lib.data_spec(config), src, batch_size=config.batch_size,
      start_step=0, process_index=0, process_count=1))
  state, metrics = trainer.step_fn(state, sharding.global_batch(mesh, batch))
  state = jax.device_get(state)
  tau = 1 - (1 - config.byol.tau_base) * (math.cos(0.0) + 1) / 2
  assert float(metrics["byol_tau"]) == pytest.approx(tau)
  online = byol.target_part({"params": state.params,
                             "batch_stats": state.batch_stats})
  for path, got in jax.tree_util.tree_leaves_with_path(state.target):
    old = np.asarray(_at(before, path))
    new = np.asarray(_at(online, path))
    np.testing.assert_allclose(got, tau * old + (1 - tau) * new, rtol=1e-6,
                               atol=1e-7, err_msg=jax.tree_util.keystr(path))
  # The online params did move, so the check above is not vacuous.
  kernel = state.params["encoder"]
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(
      jax.tree.leaves(kernel), jax.tree.leaves(before["params"]["encoder"])))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def without_predictor_mean(batch_stats):
  predictor = dict(batch_stats["predictor"])
  predictor["bn0"] = {"var": predictor["bn0"]["var"]}
  return {**batch_stats, "predictor": predictor}


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_byol_step_is_layout_invariant(axis_type):
  """8 devices equal 1 after several steps, target included, within the
  SimCLR step's round-off tolerances (tests/train_test.py explains them)."""
  ref_state, ref_metrics = one_device_run()
  state, metrics = train_test.run_steps(tiny_byol_config(),
                                        sharding.make_mesh(axis_type))
  # The predictor's first BN sees Dense(z) with z centred over the batch by
  # the projector's output BN (scale, no offset): its batch mean is zero in
  # exact arithmetic, so its running mean is round-off (~1e-10) on any
  # layout and a relative comparison of it means nothing. Both must be zero.
  for s in (state, ref_state):
    assert np.abs(s.batch_stats["predictor"]["bn0"]["mean"]).max() < 1e-6
  train_test.assert_same_state(*(s.replace(batch_stats=without_predictor_mean(
      s.batch_stats)) for s in (state, ref_state)))
  got = train_test.flat_concat(state.target)
  want = train_test.flat_concat(ref_state.target)
  assert train_test.relative_difference(got, want) < (
      train_test.WHOLE_TREE_RTOL["params"])
  for key in ("loss", "byol_cosine", "probe_loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory):
  config = tiny_byol_config(steps=4, every=2)
  state, workdir = methods_util.assert_resume_is_bitwise(
      config, tmp_path_factory.mktemp("byol"))
  return workdir, config, state


@pytest.mark.slow
def test_resume_is_bitwise_with_the_target(byol_run):
  _, _, state = byol_run  # The fixture compared every leaf, target included.
  assert isinstance(state, byol.ByolTrainState)


@pytest.mark.slow
def test_evaluation_reads_the_online_encoder(byol_run):
  workdir, _, state = byol_run
  frozen = encoder_lib.restore_encoder(workdir, sharding.make_mesh("explicit"))
  got = frozen.variables["params"]["encoder"]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params["encoder"])):
    np.testing.assert_array_equal(a, b)
  # ... and not the target, which differs from it after training.
  assert any(
      np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(
          jax.tree.leaves(got),
          jax.tree.leaves(state.target["params"]["encoder"])))
