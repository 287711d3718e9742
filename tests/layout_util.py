"""Shared pieces of the Barlow Twins, VICReg and SimSiam tests: float64
central-difference gradients of their NumPy reference losses, and the
3-step comparison of a method's run on 1 and 8 devices, with its negative
control (a statistic of the global batch computed per device instead)."""

import jax
import numpy as np

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.parallel import sharding

import methods_util
import train_test

NUM_STEPS = 3


def numeric_gradient(f, x, step=1e-6):
  """d f / d x of a float64 NumPy function by central differences
  (error ~ step^2: ~1e-10 relative for these smooth losses)."""
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    saved = x[index]
    x[index] = saved + step
    up = f(x)
    x[index] = saved - step
    down = f(x)
    x[index] = saved
    grad[index] = (up - down) / (2 * step)
  return grad


def put_sharded(x, mesh):
  """x as a global array sharded over the batch axis of `mesh`."""
  return jax.device_put(x, sharding.batch_sharded(mesh))


def run_steps(config, mesh, num_steps=NUM_STEPS):
  """(state, metrics) after num_steps steps of config's method on mesh,
  from the same initial state and batches on any mesh."""
  trainer, _ = methods_util.make_trainer(config, mesh)
  data = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      data, input_pipeline.open_source(data, "train"),
      batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  metrics = None
  for _ in range(num_steps):
    state, metrics = trainer.step_fn(
        state, sharding.global_batch(mesh, next(batches)))
  return jax.device_get(state), jax.device_get(metrics)


def one_device_mesh():
  return sharding.make_mesh("explicit", jax.devices()[:1])


def assert_same_run(run, ref_run, metric_keys):
  """The layout tolerances of tests/train_test.py (float32 round-off):
  params, BN statistics and optimizer state, and the given metrics."""
  (state, metrics), (ref_state, ref_metrics) = run, ref_run
  assert int(state.step) == int(ref_state.step) == NUM_STEPS
  train_test.assert_same_state(state, ref_state)
  for key in metric_keys:
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


def assert_planted_bug_fails(run, ref_run, metric_keys):
  """A run with a planted layout bug is far outside the tolerances: its
  parameters differ by 100x the whole-tree tolerance, and assert_same_run
  fails on it."""
  diff = train_test.relative_difference(
      train_test.flat_concat(run[0].params),
      train_test.flat_concat(ref_run[0].params))
  assert diff > 100 * train_test.WHOLE_TREE_RTOL["params"], diff
  try:
    assert_same_run(run, ref_run, metric_keys)
  except AssertionError:
    return diff
  raise AssertionError("the planted per-device statistic passed the layout "
                       "test")
