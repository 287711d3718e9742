"""MoCo v3 (Chen, Xie & He 2021) as a plug-in of the pretraining job: a
momentum encoder, a predictor, and the other images of the global batch as
negatives (docs/losses.md, "MoCo v3").

The online network is SimCLR's encoder and projection head plus a predictor
(BYOL's shape); its params are the state's params, so evaluation and export
read the online encoder. The momentum encoder (encoder + head) is an EMA of
it with m rising from tau_base to tau_final on a cosine (the reference's
--moco-m-cos), byol.py's pieces. The loss is symmetric, each direction an
InfoNCE of the predictions q against the momentum keys k of the other view
over the whole global batch, scaled by 2 tau as the reference's `ctr_loss`
(facebookresearch/moco-v3 moco/builder.py):

  L = 2 tau [ CE(q_1 k_2^T / tau) + CE(q_2 k_1^T / tau) ],  positives on the diagonal

q, k unit vectors. The keys of every device are all-gathered (the
reference's concat_all_gather) and each device's queries are its own rows:
local rows against global columns, like NT-Xent's shard_map loss
(losses.common.one_directional). Both networks run once per view, so
BatchNorm normalises each view over its global batch (the reference runs
the network per view with SyncBN).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxclr import errors, losses
from jaxclr.losses import common
from jaxclr.methods import base, byol, mocov2
from jaxclr.training import state as state_lib, update


def contrastive_loss(q, k, *, temperature: float, axis_name=None):
  """The reference's ctr_loss(q, k) for this shard's rows q, k [n, D] (k
  without gradient): 2 tau x the cross-entropy of q against every key of the
  global batch (all-gathered over axis_name), positive = the same image's
  key; mean over the global rows, replicated. Returns (loss, metrics)."""
  q = losses.l2_normalize(q)
  k = lax.stop_gradient(losses.l2_normalize(k))
  loss, metrics = common.one_directional(q, k, None, temperature=temperature,
                                         axis_name=axis_name)
  return 2.0 * temperature * loss, metrics


def symmetric_loss(q, k, *, temperature: float, axis_name=None):
  """ctr(q_1, k_2) + ctr(q_2, k_1) of one shard's predictions q and keys k,
  each [n, 2, D]. Returns (loss, metrics of the first direction)."""
  loss_12, metrics = contrastive_loss(q[:, 0], k[:, 1],
                                      temperature=temperature,
                                      axis_name=axis_name)
  loss_21, _ = contrastive_loss(q[:, 1], k[:, 0], temperature=temperature,
                                axis_name=axis_name)
  return loss_12 + loss_21, metrics


def sharded_loss(q, k, *, mesh, temperature: float, data_axis: str = "data"):
  """symmetric_loss over batch-sharded global [B, 2, D] predictions and keys,
  under jit (Explicit and Auto meshes: shard_map states its sharding)."""
  fn = functools.partial(symmetric_loss, temperature=temperature,
                         axis_name=data_axis)
  return jax.shard_map(lambda a, b: fn(a, b), mesh=mesh,
                       in_specs=(P(data_axis), P(data_axis)),
                       out_specs=(P(), P()))(q, k)


def mocov3_step(state: byol.ByolTrainState, batch, *, setup: base.Setup,
                momentum_model, temperature: float, tau_base: float,
                tau_final: float):
  """One MoCo v3 update on the global batch. Pure in (state, batch).

  momentum_model: encoder + projection head, applied with state.target.
  """
  def objective(views, inputs):
    out, _ = update.apply_network(momentum_model, state.target, inputs,
                                  per_view_bn=True)
    keys = lax.stop_gradient(out["z"])  # [B, 2, D]
    return (*sharded_loss(views["p"], keys, mesh=setup.mesh,
                          temperature=temperature), ())

  new_state, metrics, _ = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn, per_view_bn=True)
  tau = byol.target_tau(state.step, setup.plan.total_steps, tau_base,
                        tau_final)
  return (byol.moved_target(state, new_state, tau),
          {**metrics, "moco_momentum": tau})


class MoCoV3(base.Method):
  """MoCo v3: predictor, momentum encoder, in-batch negatives of the global
  batch."""
  name = "mocov3"
  summary = ("MoCo v3: predictions contrast momentum-encoder keys of the "
             "other view over the global batch; predictor, EMA encoder")
  doc = "docs/losses.md"

  def defaults(self):
    # The reference's ResNet-50 defaults (main_moco.py): temperature 1.0
    # (0.2 is its ViT value), m 0.99 -> 1 on a cosine, predictor 4096 wide.
    return {"temperature": 1.0, "tau_base": 0.99, "tau_final": 1.0,
            "predictor_hidden_dim": 4096}

  def check(self, opts, config) -> None:
    del config
    if not opts.temperature > 0:
      raise errors.ConfigError(
          f"mocov3.temperature={opts.temperature!r} must be > 0")
    mocov2.check_momentum(self.name, opts)
    if not opts.predictor_hidden_dim > 0:
      raise errors.ConfigError(f"mocov3.predictor_hidden_dim="
                               f"{opts.predictor_hidden_dim!r} must be > 0")

  def predictor_hidden_dim(self, opts) -> int:
    return opts.predictor_hidden_dim

  def init_state(self, opts, setup, rng) -> byol.ByolTrainState:
    """The momentum encoder starts as a copy of the online encoder and head
    (the reference copies them)."""
    base_state = super().init_state(opts, setup, rng)
    target = byol.target_part({"params": base_state.params,
                               "batch_stats": base_state.batch_stats})
    return state_lib.extend(base_state, byol.ByolTrainState, target=target)

  def train_step(self, opts, setup, state, batch):
    return mocov3_step(state, batch, setup=setup,
                       momentum_model=setup.build_network(),
                       temperature=opts.temperature, tau_base=opts.tau_base,
                       tau_final=opts.tau_final)
