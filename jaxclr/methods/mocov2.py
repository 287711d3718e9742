"""MoCo v2 (He et al. 2020; Chen, Fan, Girshick & He 2020) as a plug-in of
the pretraining job: a momentum key encoder and a queue of its past keys
(docs/losses.md, "MoCo v2").

The online (query) network is SimCLR's encoder and projection head; its
params are the state's params, so evaluation and export read it unchanged.
The key encoder is an EMA of it (encoder + head: BYOL's target, with
byol.py's pieces and MoCo's schedule: a constant m by default). Each query
q_i is contrasted with its own key k_i (the other view through the key
encoder, no gradient) against the K keys of the queue:

  l_i = -log( exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.n_j / tau)) )

q, k unit vectors, n_j the queue's rows. As the reference
(facebookresearch/moco moco/builder.py) the loss is one-directional (view-1
queries, view-2 keys); symmetric=True adds the view-2 -> view-1 direction
with a queue of its own, as solo-learn's MoCo v2+ (solo/methods/
mocov2plus.py). There are no in-batch negatives, so the loss is a mean over
the global batch's rows and needs no gather; the queue is global: each step
writes the global batch's keys, all-gathered, at the same rows of the
replicated queue on every device (a ring of whole batches, the reference's
queue_ptr), after the loss has read it.

BatchNorm: the reference runs each encoder on one view per GPU and shuffles
the keys' GPUs ("shuffling BN") so that a query and its key never share
BatchNorm statistics. Here BatchNorm is global, per view (update.
apply_network): the statistics of each view's whole global batch, as
SimCLR's global BN and MoCo v3's SyncBN, which leaves a query and its key no
private statistic to share either (docs/losses.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr import errors, losses
from jaxclr.methods import base, byol, nnclr
from jaxclr.training import state as state_lib, update

# The directions (query view, key view) of the loss; each has a queue.
DIRECTIONS = ((0, 1), (1, 0))


class MocoV2TrainState(byol.ByolTrainState):
  # float32 [Q, K, D] unit keys, Q = 1 (the reference) or 2 (symmetric):
  # queue[d] holds the past keys of direction d's key view.
  queue: Any


def moco_loss(q, k, queue, *, temperature: float):
  """MoCo's InfoNCE of queries q [B, D] against their keys k [B, D] (no
  gradient) and the queue [K, D] of negatives (no gradient), mean over the
  B rows. Returns (loss, metrics): contrast_acc etc. of the positive among
  the 1 + K candidates (column 0)."""
  q = losses.l2_normalize(q.astype(jnp.float32))
  k = lax.stop_gradient(losses.l2_normalize(k.astype(jnp.float32)))
  queue = lax.stop_gradient(queue.astype(jnp.float32))
  positive = jnp.sum(q * k, axis=-1, keepdims=True)  # [B, 1]
  logits = jnp.concatenate([positive, losses.matmul_t(q, queue)],
                           axis=1) / temperature  # [B, 1 + K]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])
  metrics = losses.contrast_metrics(logits, jnp.zeros(q.shape[0], jnp.int32))
  return loss, metrics


def enqueue(queue, keys, offset, *, mesh):
  """The queue [K, D] with the global batch's unit keys [B, D] written at
  rows offset..offset+B, in batch order: the keys are all-gathered first, so
  every device writes the same rows (replicated)."""
  keys = losses.replicated_rows(losses.l2_normalize(keys), mesh=mesh)
  return lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (offset, 0))


def mocov2_step(state: MocoV2TrainState, batch, *, setup: base.Setup,
                key_model, temperature: float, tau_base: float,
                tau_final: float):
  """One MoCo v2 update on the global batch. Pure in (state, batch).

  key_model: encoder + projection head, applied with state.target.
  """
  batch_size = batch["labels"].shape[0]
  offset = nnclr.write_offset(state.step, state.queue.shape[1], batch_size)

  def objective(views, inputs):
    key_out, _ = update.apply_network(key_model, state.target, inputs,
                                      per_view_bn=True)
    keys = lax.stop_gradient(key_out["z"])  # [B, 2, D]
    results = [moco_loss(views["z"][:, qv], keys[:, kv], state.queue[d],
                         temperature=temperature)
               for d, (qv, kv) in enumerate(DIRECTIONS[:state.queue.shape[0]])]
    loss = sum(r[0] for r in results) / len(results)
    metrics = results[0][1]
    new_queue = jnp.stack([
        enqueue(state.queue[d], keys[:, kv], offset, mesh=setup.mesh)
        for d, (_, kv) in enumerate(DIRECTIONS[:state.queue.shape[0]])])
    return loss, metrics, new_queue

  new_state, metrics, new_queue = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn, per_view_bn=True)
  tau = byol.target_tau(state.step, setup.plan.total_steps, tau_base,
                        tau_final)
  new_state = byol.moved_target(state, new_state, tau)
  # A refused (non-finite) update keeps the old queue too.
  queue = state_lib.where_applied(new_state.opt_state, new_queue, state.queue)
  return new_state.replace(queue=queue), {**metrics, "moco_momentum": tau}


def check_momentum(section: str, opts) -> None:
  """tau_base <= tau_final in [0, 1] (MoCo's m and where it ends)."""
  if not 0.0 <= opts.tau_base <= opts.tau_final <= 1.0:
    raise errors.ConfigError(
        f"{section}.tau_base={opts.tau_base!r}, tau_final={opts.tau_final!r}:"
        " need 0 <= tau_base <= tau_final <= 1 (the key encoder's EMA rate, "
        "cosine from tau_base to tau_final; equal: constant)")


class MoCoV2(base.Method):
  """MoCo v2: a momentum key encoder and a queue of its past keys."""
  name = "mocov2"
  summary = ("MoCo v2: queries contrast their momentum-encoder key with a "
             "queue of past keys; EMA key encoder")
  doc = "docs/losses.md"

  def defaults(self):
    # The paper's (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos):
    # temperature 0.2, queue 65,536 keys, m 0.999 constant (tau_base =
    # tau_final), one direction (symmetric=True: both, solo-learn's v2+).
    return {"temperature": 0.2, "queue_size": 65536, "tau_base": 0.999,
            "tau_final": 0.999, "symmetric": False}

  def check(self, opts, config) -> None:
    if not opts.temperature > 0:
      raise errors.ConfigError(
          f"mocov2.temperature={opts.temperature!r} must be > 0")
    check_momentum(self.name, opts)
    k, b = opts.queue_size, config.batch_size
    if not (isinstance(k, int) and k > 0 and k % b == 0):
      raise errors.ConfigError(
          f"mocov2.queue_size={k!r} must be a positive multiple of "
          f"batch_size={b} (the queue is a ring of whole global batches, as "
          f"the reference's), e.g. {max(1, 65536 // b) * b}")

  def init_state(self, opts, setup, rng) -> MocoV2TrainState:
    """The key encoder a copy of the online encoder and head; the queue
    random unit vectors, as the reference starts it."""
    model_rng, queue_rng = jax.random.split(rng)
    base_state = super().init_state(opts, setup, model_rng)
    target = byol.target_part({"params": base_state.params,
                               "batch_stats": base_state.batch_stats})
    num_queues = 2 if opts.symmetric else 1
    queue = losses.l2_normalize(jax.random.normal(
        queue_rng, (num_queues, opts.queue_size, setup.embedding_dim),
        jnp.float32))
    return state_lib.extend(base_state, MocoV2TrainState, target=target,
                            queue=queue)

  def train_step(self, opts, setup, state, batch):
    return mocov2_step(state, batch, setup=setup,
                       key_model=setup.build_network(),
                       temperature=opts.temperature, tau_base=opts.tau_base,
                       tau_final=opts.tau_final)
