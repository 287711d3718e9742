"""Pretraining with optimizer='sgd' (SupCon's recipe) through the job: the
momentum buffers are checkpointed state, so resume is exact; the update is
the hand formula of optim_test on the trainer's own parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr.parallel import sharding
from jaxclr.training import optim

import methods_util


@pytest.mark.slow
def test_supcon_with_sgd_resumes_bitwise(tmp_path):
  config = methods_util.tiny_config(steps=4, every=2, method="supcon",
                                    optimizer="sgd", weight_decay=1e-3)
  state, _ = methods_util.assert_resume_is_bitwise(config, tmp_path)
  assert int(state.step) == 4
  assert int(optim.nonfinite_count(state.opt_state)) == 0


@pytest.mark.slow
def test_trainer_builds_the_sgd_it_was_asked_for():
  """The trainer's optimiser on its own parameters: one update from a zero
  buffer is -lr (g + wd w) on the kernels LARS decays, -lr g elsewhere."""
  config = methods_util.tiny_config(steps=4, every=2, method="supcon",
                                    optimizer="sgd", weight_decay=1e-2)
  mesh = sharding.make_mesh(config.mesh_axis_type, jax.devices()[:1])
  trainer, plan = methods_util.make_trainer(config, mesh)
  state = jax.device_get(trainer.init_fn(jax.random.key(0)))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
  updates, _ = trainer.optimizer.update(
      grads, trainer.optimizer.init(state.params), state.params, 1)
  lr = float(optim.learning_rate_schedule(plan)(1))
  assert lr > 0
  mask = optim.lars_mask(state.params)
  for u, p, decayed in zip(jax.tree.leaves(updates),
                           jax.tree.leaves(state.params),
                           jax.tree.leaves(mask)):
    want = -lr * (0.5 + (1e-2 * np.asarray(p) if decayed else 0.0))
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-9)
  assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
