"""What SwAV and DINO share about their prototype layer (params['prototypes'],
models/heads.py `Prototypes`): the steps it is frozen for, and the freeze.

Both references leave it untouched early on: SwAV for its first
`freeze_prototypes_niters` iterations (facebookresearch/swav main_swav.py),
DINO for its first `freeze_last_layer` epochs (facebookresearch/dino
utils.py cancel_gradients_last_layer). Both set the gradient to None, and
PyTorch's SGD/LARS then skip the parameter entirely: no weight decay, no
momentum. A zero gradient in optax would still decay the weights and move
the momentum, so the freeze here keeps the part's parameters *and* its
optimizer-state leaves from before the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PART = "prototypes"  # The network's module name (models/simclr.py).


def frozen_steps(epochs: float, steps_per_epoch: int) -> int:
  """Steps in the first `epochs` epochs (the references count epochs or
  iterations; 1 epoch at B=4096 on ImageNet is 312 steps here, 313 in
  SwAV's script)."""
  return int(epochs * steps_per_epoch)


def _under(path, part: str) -> bool:
  return any(getattr(key, "key", None) == part for key in path)


def keep_part(new_state, old_state, keep, part: str = PART):
  """new_state with old_state's params[part] and every optimizer-state leaf
  under a `part` key (momentum traces, ...), where `keep` (a traced bool)."""
  def pick(path, new, old):
    return jnp.where(keep, old, new) if _under(path, part) else new

  params = jax.tree_util.tree_map_with_path(pick, new_state.params,
                                            old_state.params)
  opt_state = jax.tree_util.tree_map_with_path(pick, new_state.opt_state,
                                               old_state.opt_state)
  return new_state.replace(params=params, opt_state=opt_state)
