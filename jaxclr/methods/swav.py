"""SwAV (Caron et al. 2020) as a plug-in of the pretraining job: swapped
prediction of Sinkhorn-Knopp codes over K prototypes, on multi-crop views
(docs/methods.md, "SwAV").

The network is SimCLR's (encoder, projection head) plus a prototype layer
(params['prototypes'], W [D, K]): scores are cosines of the unit projection
with the prototypes. The prototypes are normalised to unit length at the
start of every step and frozen for the first `freeze_prototypes_epochs`.
The codes of each global crop come from Sinkhorn-Knopp over the **global**
batch: inside the loss's shard_map, every sum over samples is this shard's
sum all-reduced (psum), as swav's distributed_sinkhorn all-reduces them.

The optional queue (SwavTrainState.queue, [2, L, D]) holds each global
crop's unit projections of the last L / B global batches, replicated and
written from the all-gathered batch in the same order everywhere, and
checkpointed: exact resume holds. Writes start at `queue_start_epoch`; the
queue's rows join the Sinkhorn sums once it is full, as in the reference.

Reference: facebookresearch/swav main_swav.py (train, distributed_sinkhorn),
src/resnet50.py (the normalised projection and prototypes); cross-checked
with vturrisi/solo-learn solo/losses/swav.py, solo/utils/sinkhorn_knopp.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxclr import errors, losses
from jaxclr.methods import base, prototypes as prototypes_lib
from jaxclr.models import heads
from jaxclr.training import state as state_lib, update
from jaxclr.training.state import TrainState


class SwavTrainState(TrainState):
  # float32 [2, L, D]: each global crop's past unit projections, newest
  # batch first; zeros until written.
  queue: Any


def normalized_prototypes(params):
  """params with each prototype (a column of W) scaled to unit length, as
  main_swav.py does in place before every forward pass."""
  kernel = params[prototypes_lib.PART]["kernel"]
  norm = jnp.sqrt(jnp.sum(kernel * kernel, axis=0, keepdims=True))
  unit = kernel / jnp.maximum(norm, 1e-12)  # F.normalize's eps.
  return {**params, prototypes_lib.PART: {
      **params[prototypes_lib.PART], "kernel": unit}}


def sinkhorn(scores, queue_scores=None, queue_weight=0.0, *, epsilon: float,
             num_iters: int, axis_name=None):
  """SwAV's codes for this shard's rows: Sinkhorn-Knopp over the samples of
  the global batch (and the queue), as swav's distributed_sinkhorn.

  Args:
    scores: [n, K] cosines of this shard's samples with the prototypes.
    queue_scores: [L, K] replicated extra samples (the queue), or None.
    queue_weight: 1.0 to include the queue's samples in every sum, 0.0 to
      leave them out (a traced flag: the queue is not full yet).
    axis_name: the data axis inside shard_map: sums over samples are this
      shard's, all-reduced; None: the rows are every sample there is.

  Returns:
    [n, K] codes, each row a distribution over the K prototypes; over all
    samples each prototype gets an equal share (after num_iters rounds).
  """
  scores = scores.astype(jnp.float32)
  num_prototypes = scores.shape[1]
  queue = (jnp.zeros((0, num_prototypes), jnp.float32)
           if queue_scores is None else queue_scores.astype(jnp.float32))

  def over_samples(batch_sum, queue_sum):
    if axis_name is not None:
      batch_sum = lax.psum(batch_sum, axis_name)
    return batch_sum + queue_sum

  shards = 1 if axis_name is None else lax.axis_size(axis_name)
  num_samples = scores.shape[0] * shards + queue.shape[0] * queue_weight
  # A constant shift, which the first normalisation cancels exactly (the
  # reference has none): exp stays finite for any epsilon.
  shift = jnp.max(scores)
  if axis_name is not None:
    shift = lax.pmax(shift, axis_name)
  shift = jnp.maximum(shift, jnp.where(
      queue_weight > 0, jnp.max(queue, initial=-jnp.inf), -jnp.inf))
  q = jnp.exp((scores - shift) / epsilon)  # [n, K]
  qq = jnp.exp((queue - shift) / epsilon) * queue_weight  # [L, K]
  total = over_samples(jnp.sum(q), jnp.sum(qq))
  q, qq = q / total, qq / total

  def iteration(_, qs):
    q, qq = qs
    # Each prototype's total weight must be 1/K ...
    per_prototype = over_samples(jnp.sum(q, axis=0), jnp.sum(qq, axis=0))
    q = q / per_prototype / num_prototypes
    qq = qq / per_prototype / num_prototypes
    # ... and each sample's 1/B (a left-out queue row's sum is 0: keep it 0).
    q = q / jnp.sum(q, axis=1, keepdims=True) / num_samples
    queue_sum = jnp.sum(qq, axis=1, keepdims=True)
    qq = qq / jnp.where(queue_sum > 0, queue_sum, 1.0) / num_samples
    return q, qq

  q, _ = lax.fori_loop(0, num_iters, iteration, (q, qq))
  return q * num_samples  # Rows sum to 1: an assignment.


def swav_loss(scores, queue, kernel, queue_weight, *, temperature: float,
              epsilon: float, num_iters: int, axis_name=None):
  """SwAV's swapped-prediction loss for one shard's rows.

  Args:
    scores: [n, V, K] scores of the V = 2 + k crops (the global crops
      first), differentiable.
    queue: [2, L, D] replicated unit projections of past batches, or None.
    kernel: [D, K] the (unit) prototypes, for the queue's scores.
    queue_weight: 1.0 when the queue takes part in Sinkhorn, else 0.0.

  Returns:
    (loss, metrics), the global batch's: for each global crop i, codes
    q_i = sinkhorn(scores_i) (no gradient), and the mean over the other
    crops v of the cross-entropy between q_i and softmax(scores_v / T),
    averaged over images; then the mean over i.
  """
  scores = scores.astype(jnp.float32)
  num_images, num_views = scores.shape[:2]
  log_p = jax.nn.log_softmax(scores / temperature, axis=-1)  # [n, V, K]
  loss = 0.0
  for i in range(2):
    queue_scores = None
    if queue is not None:
      queue_scores = jnp.einsum("ld,dk->lk", queue[i], kernel,
                                precision=lax.Precision.HIGHEST)
    codes = lax.stop_gradient(sinkhorn(
        lax.stop_gradient(scores[:, i]), queue_scores, queue_weight,
        epsilon=epsilon, num_iters=num_iters, axis_name=axis_name))
    ce = -jnp.einsum("nk,nvk->v", codes, log_p,
                     precision=lax.Precision.HIGHEST) / num_images  # [V]
    others = (jnp.arange(num_views) != i).astype(jnp.float32)
    loss = loss + jnp.sum(ce * others) / (num_views - 1)
  loss = loss / 2.0
  if axis_name is not None:  # Equal shards: the mean of means is global.
    loss = lax.pmean(loss, axis_name)
  return loss, {}


def sharded_swav_loss(scores, queue, kernel, queue_weight, *, mesh,
                      temperature: float, epsilon: float, num_iters: int,
                      data_axis: str = "data"):
  """swav_loss over batch-sharded global scores under jit (the queue and
  kernel replicated); Explicit and Auto meshes alike."""
  fn = functools.partial(swav_loss, temperature=temperature, epsilon=epsilon,
                         num_iters=num_iters, axis_name=data_axis)
  if queue is None:
    return jax.shard_map(
        lambda s, k, w: fn(s, None, k, w), mesh=mesh,
        in_specs=(P(data_axis), P(), P()), out_specs=(P(), P()))(
            scores, kernel, queue_weight)
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(P(data_axis), P(), P(), P()),
      out_specs=(P(), P()))(scores, queue, kernel, queue_weight)


def queue_schedule(step, *, start_step: int, queue_size: int,
                   batch_size: int):
  """(write, in use) at `step`: batches are written from start_step on, and
  the queue joins Sinkhorn once full, after queue_size / B writes. Without
  a queue (queue_size 0), never: the logged swav_queue_in_use stays 0."""
  step = jnp.asarray(step, jnp.int32)
  if queue_size == 0:
    return jnp.zeros((), bool), jnp.zeros((), bool)
  return step >= start_step, step >= start_step + queue_size // batch_size


def push(queue, rows, write):
  """queue [L, D] with rows [B, D] in front (newest first), where write."""
  moved = jnp.concatenate([rows, queue[:queue.shape[0] - rows.shape[0]]])
  return jnp.where(write, moved, queue)


def swav_step(state, batch, *, setup: base.Setup, opts):
  """One SwAV update on the global batch. Pure in (state, batch)."""
  plan = setup.plan
  # The optimizer steps from the normalised prototypes, as the reference.
  state = state.replace(params=normalized_prototypes(state.params))
  kernel = lax.stop_gradient(state.params[prototypes_lib.PART]["kernel"])
  queue = getattr(state, "queue", None)
  batch_size = batch["labels"].shape[0]
  write, in_use = queue_schedule(
      state.step, start_step=int(opts.queue_start_epoch *
                                 plan.steps_per_epoch),
      queue_size=opts.queue_size, batch_size=batch_size)
  queue_weight = in_use.astype(jnp.float32)

  def objective(views, inputs):
    del inputs
    loss, metrics = sharded_swav_loss(
        update.all_crops(views, "prototype_scores"), queue, kernel,
        queue_weight, mesh=setup.mesh, temperature=opts.temperature,
        epsilon=opts.epsilon, num_iters=opts.sinkhorn_iterations)
    if queue is None:
      return loss, metrics, ()
    unit = losses.l2_normalize(views["z"])  # [B, 2, D], as swav's embedding.
    rows = [losses.replicated_rows(unit[:, i], mesh=setup.mesh)
            for i in range(2)]
    return loss, metrics, jnp.stack(
        [push(queue[i], rows[i], write) for i in range(2)])

  new_state, metrics, new_queue = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn)
  new_state = prototypes_lib.keep_part(
      new_state, state, state.step < prototypes_lib.frozen_steps(
          opts.freeze_prototypes_epochs, plan.steps_per_epoch))
  metrics = {**metrics, "swav_queue_in_use": queue_weight}
  if queue is not None:  # A refused update keeps the old queue too.
    new_state = new_state.replace(queue=state_lib.where_applied(
        new_state.opt_state, new_queue, queue))
  return new_state, metrics


def _check(ok: bool, message: str):
  if not ok:
    raise errors.ConfigError(message)


class SwAV(base.Method):
  """SwAV: swapped prediction of Sinkhorn-Knopp cluster codes."""
  name = "swav"
  summary = ("SwAV: each crop predicts the Sinkhorn-Knopp codes of the "
             "global crops over prototypes, equipartitioned over the "
             "global batch; no negatives")
  doc = "docs/losses.md"

  def defaults(self):
    # main_swav.py's values (its ImageNet scripts for K and the freeze).
    return {
        "num_prototypes": 3000,
        "temperature": 0.1,
        "epsilon": 0.05,  # Sinkhorn's entropy regularisation.
        "sinkhorn_iterations": 3,
        # L: past projections per global crop (a multiple of batch_size);
        # 0 = no queue (SwAV: 3840 with B=256, none with B=4096).
        "queue_size": 0,
        "queue_start_epoch": 15,  # main_swav.py's epoch_queue_starts.
        # Prototypes frozen this long (the paper's first epoch;
        # freeze_prototypes_niters=313 at B=4096 in the scripts).
        "freeze_prototypes_epochs": 1.0,
    }

  def check(self, opts, config) -> None:
    k = opts.num_prototypes
    _check(isinstance(k, int) and k > 0,
           f"swav.num_prototypes={k!r} must be an int > 0 (SwAV: 3000)")
    for name in ("temperature", "epsilon"):
      _check(opts[name] > 0, f"swav.{name}={opts[name]!r} must be > 0")
    n = opts.sinkhorn_iterations
    _check(isinstance(n, int) and n >= 1,
           f"swav.sinkhorn_iterations={n!r} must be an int >= 1 (SwAV: 3)")
    size, b = opts.queue_size, config.batch_size
    _check(isinstance(size, int) and size >= 0 and size % b == 0,
           f"swav.queue_size={size!r} must be 0 (no queue) or a positive "
           f"multiple of batch_size={b} (a FIFO of whole global batches), "
           f"e.g. {max(1, 3840 // b) * b}")
    for name in ("queue_start_epoch", "freeze_prototypes_epochs"):
      _check(opts[name] >= 0, f"swav.{name}={opts[name]!r} must be >= 0")

  def prototypes(self, opts) -> heads.PrototypeSpec:
    return heads.PrototypeSpec(count=opts.num_prototypes, weight_norm=False)

  def reads_local_crops(self, opts) -> bool:
    del opts
    return True

  def init_state(self, opts, setup, rng):
    state = super().init_state(opts, setup, rng)
    if opts.queue_size == 0:
      return state
    return state_lib.extend(state, SwavTrainState, queue=jnp.zeros(
        (2, opts.queue_size, setup.embedding_dim), jnp.float32))

  def train_step(self, opts, setup, state, batch):
    return swav_step(state, batch, setup=setup, opts=opts)
