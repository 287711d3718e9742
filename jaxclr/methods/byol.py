"""BYOL (Grill et al. 2020) as a plug-in of the pretraining job: its state,
its pure numerics and its step (docs/losses.md, "BYOL").

The online network is SimCLR's (encoder, projection head) plus a predictor;
its params are the state's params, so every evaluation job, export and the
periodic kNN read the online encoder with no change. The target network (an
encoder + projection head of the same shapes) lives in ByolTrainState.target
and so in every checkpoint: exact resume holds. It is an exponential moving
average of the online weights with a rate rising from tau_base to 1 on a
cosine schedule over the run.

Both networks run in training mode, once per view (per_view_bn, the
default, as the reference runs them): BatchNorm normalises each view by the
statistics of that view's global batch; with per_view_bn=False both views
share one BatchNorm batch (what jaxclr did before; docs/losses.md, "BYOL",
measures the two). The target's running statistics (never used in
training) are averaged from the online ones like the weights.

The momentum-encoder pieces here (target_tau, ema_update, target_part,
moved_target) serve every method with one (MoCo v2, MoCo v3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclr import errors
from jaxclr.methods import base
from jaxclr.training import state as state_lib, update
from jaxclr.training.state import TrainState

# The parts of the online network the target mirrors.
TARGET_PARTS = ("encoder", "projection_head")


class ByolTrainState(TrainState):
  # {"params": {encoder, projection_head}, "batch_stats": {...}}.
  target: Any


def target_tau(step, total_steps: int, tau_base: float,
               tau_final: float = 1.0):
  """A momentum encoder's EMA rate at `step`:
  tau_final - (tau_final - tau_base) (cos(pi step / K) + 1) / 2.

  tau_base at step 0, rising to tau_final at step K = total_steps. BYOL
  (and MoCo v3's --moco-m-cos) rise to 1; MoCo v2's m is constant
  (tau_base = tau_final); solo-learn's MoCo v2+ rises from 0.99 to 0.999
  (solo/utils/momentum.py, MomentumUpdater).
  """
  progress = jnp.asarray(step, jnp.float32) / max(int(total_steps), 1)
  return tau_final - (tau_final - tau_base) * (
      jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema_update(target, online, tau):
  """tau * target + (1 - tau) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)


def target_part(variables: dict, parts=TARGET_PARTS) -> dict:
  """{params, batch_stats} of the parts the target mirrors (BYOL's; DINO's
  teacher adds its prototypes, which have no batch_stats)."""
  return {kind: {k: variables[kind][k] for k in parts if k in variables[kind]}
          for kind in ("params", "batch_stats")}


def moved_target(state, new_state, tau):
  """new_state's target moved toward its online weights by the EMA at rate
  tau; a refused (non-finite) update leaves the target where it was too."""
  moved = ema_update(state.target, target_part(
      {"params": new_state.params, "batch_stats": new_state.batch_stats}), tau)
  return new_state.replace(target=state_lib.where_applied(
      new_state.opt_state, moved, state.target))


def regression_loss(p, z_target):
  """The symmetric BYOL loss per image, averaged over the (global) batch.

  p: [B, 2, D] online predictions, z_target: [B, 2, D] target projections
  (gradients already stopped): (2 - 2 cos(p_1, z'_2)) + (2 - 2 cos(p_2, z'_1)).
  A mean over examples needs no gather: under jit on global arrays it is one
  all-reduce. Returns (loss, metrics).
  """
  def unit(x):
    return x * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
  p, z = unit(p), unit(z_target)
  cos_12 = jnp.sum(p[:, 0] * z[:, 1], axis=-1)
  cos_21 = jnp.sum(p[:, 1] * z[:, 0], axis=-1)
  loss = jnp.mean(4.0 - 2.0 * cos_12 - 2.0 * cos_21)
  return loss, {"byol_cosine": jnp.mean(0.5 * (cos_12 + cos_21))}


def byol_step(state: ByolTrainState, batch, *, setup: base.Setup,
              target_model: nn.Module, tau_base: float,
              per_view_bn: bool = True):
  """One BYOL update on the global batch. Pure in (state, batch).

  setup.model: the online network (with predictor, optional probe);
  target_model: encoder + projection head only, applied with state.target.
  """
  def objective(views, inputs):
    target_out, _ = update.apply_network(target_model, state.target, inputs,
                                         per_view_bn=per_view_bn)
    z_target = jax.lax.stop_gradient(target_out["z"])  # [B, 2, D]
    return (*regression_loss(views["p"], z_target), ())

  new_state, metrics, _ = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn, per_view_bn=per_view_bn)
  tau = target_tau(state.step, setup.plan.total_steps, tau_base)
  return moved_target(state, new_state, tau), {**metrics, "byol_tau": tau}


class BYOL(base.Method):
  """BYOL: an online network with a predictor regresses an EMA target."""
  name = "byol"
  summary = ("BYOL: the online network's prediction regresses an EMA "
             "target's projection of the other view; no negatives")
  doc = "docs/losses.md"

  def defaults(self):
    # tau_base: target EMA rate, cosine from tau_base at step 0 to 1 at the
    # end (BYOL: 0.99 at B=256, 0.996 at B=4096). predictor_hidden_dim: the
    # predictor's hidden width (2-layer MLP to z's width). per_view_bn:
    # BatchNorm statistics per view, as the reference (False: both views
    # in one BatchNorm batch, as jaxclr before; config/legacy.py).
    return {"tau_base": 0.99, "predictor_hidden_dim": 4096,
            "per_view_bn": True}

  def check(self, opts, config) -> None:
    del config
    if not 0.0 <= opts.tau_base <= 1.0:
      raise errors.ConfigError(
          f"byol.tau_base={opts.tau_base!r} must be in [0, 1] (BYOL: 0.99 "
          "at B=256, 0.996 at B=4096)")
    if not opts.predictor_hidden_dim > 0:
      raise errors.ConfigError(f"byol.predictor_hidden_dim="
                               f"{opts.predictor_hidden_dim!r} must be > 0")

  def upgrade_saved(self, saved: dict) -> dict:
    # Both views shared one BatchNorm batch before per_view_bn existed.
    return {"per_view_bn": False, **saved}

  def predictor_hidden_dim(self, opts) -> int:
    return opts.predictor_hidden_dim

  def init_state(self, opts, setup, rng) -> ByolTrainState:
    """The online state, and the target as a copy of its encoder and head
    (BYOL initialises the target to the online weights)."""
    base_state = super().init_state(opts, setup, rng)
    target = target_part({"params": base_state.params,
                          "batch_stats": base_state.batch_stats})
    return state_lib.extend(base_state, ByolTrainState, target=target)

  def train_step(self, opts, setup, state, batch):
    return byol_step(state, batch, setup=setup,
                     target_model=setup.build_network(),
                     tau_base=opts.tau_base, per_view_bn=opts.per_view_bn)
