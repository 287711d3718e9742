"""TrainState, the one state type of every training job, and its update.

A job's state is arrays only (model and optimizer live outside it, bound to
the step): step, params, BatchNorm statistics and the optimizer state.
Non-finite updates are handled here once for every job: the optimizer
(`optim.Optimizer`, optax.apply_if_finite inside) refuses them, and the
BatchNorm statistics of such a step are dropped too, so a skipped update
leaves the state as it was except for the step counter.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxclr.training import optim


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 [], finished updates (applied or skipped).
  params: Any
  batch_stats: Any  # {} for a job without BatchNorm in training mode.
  opt_state: Any


def create(params, batch_stats, optimizer: optim.Optimizer) -> TrainState:
  """Pure: call inside a jitted init with out_shardings."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=optimizer.init(params))


def extend(base: TrainState, cls, **extra):
  """`base`'s fields in a TrainState subclass `cls` with its `extra` ones
  (a method's own state: a queue, an EMA target, a support set)."""
  return cls(step=base.step, params=base.params,
             batch_stats=base.batch_stats, opt_state=base.opt_state, **extra)


def where_applied(opt_state, new, old):
  """`new` if the update that produced `opt_state` was applied, else `old`,
  leaf by leaf: whatever a refused (non-finite) update must leave alone."""
  applied = optim.update_applied(opt_state)
  return jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)


def apply_gradients(state: TrainState, grads, batch_stats,
                    optimizer: optim.Optimizer):
  """The update every job's step ends with.

  Returns (new state, metrics): grad_norm and the learning rate applied,
  `optimizer.schedule(state.step)`.
  """
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params,
                                        state.step)
  batch_stats = where_applied(opt_state, batch_stats, state.batch_stats)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {"grad_norm": optax.tree.norm(grads),
                     "learning_rate": optimizer.schedule(state.step)}
