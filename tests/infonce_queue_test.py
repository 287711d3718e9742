"""InfoNCE's negatives queue in the train state: a FIFO of the global
batches' view-2 projections, the same on any layout, exact on resume."""


import jax
import numpy as np
import pytest

from jaxclr.methods import simclr
from jaxclr.parallel import sharding

import methods_util
import train_test


def tiny_queue_config(**arg):
  return methods_util.tiny_config(simclr__loss="infonce", simclr__queue_size=32,
                                  **arg)


def layout_config():
  # Three steps, so the queue is read on steps 2 and 3. At the tiny config's
  # lr 1.0 (no warmup) the InfoNCE dynamics amplify round-off: measured, 1
  # vs 8 devices, after 1 step 1.9e-7 relative in params, after 2 steps
  # 6.4e-5 with or without the queue (NT-Xent: 2.3e-6). At lr 0.1, 3 steps:
  # params 1.1e-7, momentum 6.8e-7, queue 3.7e-6, inside the tolerances that
  # catch the layout bugs (tests/train_test.py).
  c = tiny_queue_config()
  c.learning_rate = 0.1
  return c


@pytest.mark.slow
def test_queue_holds_the_last_global_batches_view_2_projections():
  config = tiny_queue_config()
  b = config.batch_size
  keys = []
  for state, batch, z in methods_util.steps_with_projections(
      config, sharding.make_mesh("explicit"), 3):
    if batch is None:
      assert isinstance(state, simclr.QueueTrainState)
      assert not np.any(state.queue)  # Empty: all zero rows.
      continue
    keys.append(z[:, 1])
    if len(keys) == 1:
      assert not np.any(state.queue[:b])  # Oldest half still empty.
      np.testing.assert_allclose(state.queue[b:], keys[0], rtol=1e-4,
                                 atol=1e-5)
  np.testing.assert_allclose(state.queue, np.concatenate(keys[1:]),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_queue_step_is_layout_invariant(monkeypatch):
  monkeypatch.setattr(train_test, "NUM_STEPS", 3)
  ref_state, ref_metrics = train_test.run_steps(
      layout_config(), sharding.make_mesh("explicit", jax.devices()[:1]))
  state, metrics = train_test.run_steps(layout_config(),
                                        sharding.make_mesh("explicit"))
  train_test.assert_same_state(state, ref_state)
  assert train_test.relative_difference(state.queue, ref_state.queue) < (
      train_test.WHOLE_TREE_RTOL["params"])
  for key in ("loss", "contrast_acc", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


@pytest.mark.slow
def test_resume_is_bitwise_with_the_queue(tmp_path):
  state, _ = methods_util.assert_resume_is_bitwise(
      tiny_queue_config(steps=4, every=2), tmp_path)
  assert isinstance(state, simclr.QueueTrainState)
  assert np.all(np.any(state.queue != 0, axis=-1))  # Full after 4 steps.
