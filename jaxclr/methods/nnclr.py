"""NNCLR (Dwibedi et al. 2021) as a plug-in of the pretraining job: the
support set in the train state, the nearest-neighbour contrastive loss over
the global batch, and the step (docs/losses.md, "NNCLR").

The network is SimCLR's (encoder, projection head) plus a predictor; the
state's params are the online network, so evaluation and export read it
unchanged. The support set is a FIFO of the last K/B global batches of
view-1 projections (L2-normalised), written every step in the same order on
every device and host (it is replicated and written from the all-gathered
batch), and checkpointed with the state: exact resume holds.

Each view's positive is its nearest neighbour (cosine) in the support set
before this step's batch is added, as in the paper; the loss contrasts
NN(z_1) against the predictions p_2 of the whole global batch (and NN(z_2)
against p_1), so gradients reach the network only through p.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxclr import errors, losses
from jaxclr.methods import base
from jaxclr.training import state as state_lib, update
from jaxclr.training.state import TrainState


class NnclrTrainState(TrainState):
  support: Any  # float32 [K, D], unit rows.
  support_labels: Any  # int32 [K], -1: unknown (unlabelled or not yet written).


def write_offset(step, queue_size: int, batch_size: int):
  """Row of the support set where the global batch of `step` is written."""
  return (step % (queue_size // batch_size)) * batch_size


def ordered_support(support, step, batch_size: int):
  """The support set oldest batch first, after `step` steps (the batch of
  step - 1 last): rows as the FIFO holds them."""
  return jnp.roll(support, -write_offset(step, support.shape[0], batch_size),
                  axis=0)


def nn_contrastive_loss(z1, z2, p1, p2, labels, support, support_labels,
                        offset, *, temperature: float, axis_name=None):
  """NNCLR's loss and the new support set, for one shard's rows.

  Args:
    z1, z2, p1, p2: [n, D] projections and predictions of the two views;
      with axis_name set, this shard's rows (columns are all-gathered).
    labels: [n] class labels (-1 = none), only for the agreement metric.
    support, support_labels: the replicated support set [K, D], [K].
    offset: row where this global batch is written.

  Returns:
    (loss, metrics, new support, new support labels); the loss is the global
    batch's (replicated across shards), metrics global.
  """
  z1, z2, p1, p2 = (losses.l2_normalize(x.astype(jnp.float32))
                    for x in (z1, z2, p1, p2))

  def nearest(z):
    index = jnp.argmax(losses.matmul_t(z, support), axis=-1)
    return support[index], support_labels[index]

  nn1, nn1_labels = nearest(z1)
  nn2, nn2_labels = nearest(z2)
  cols_p1, first = losses.gather_rows(p1, axis_name)
  cols_p2, _ = losses.gather_rows(p2, axis_name)
  targets = jnp.arange(z1.shape[0]) + first

  def cross_entropy(logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=-1))

  logits_12 = losses.matmul_t(nn1, cols_p2) / temperature
  logits_21 = losses.matmul_t(nn2, cols_p1) / temperature
  loss = 0.5 * (cross_entropy(logits_12) + cross_entropy(logits_21))
  metrics = losses.contrast_metrics(logits_12, targets)
  known = (labels >= 0).astype(jnp.float32)
  agree = sum(((labels == l) & (l >= 0)).astype(jnp.float32) * known
              for l in (nn1_labels, nn2_labels))
  counts = jnp.stack([jnp.sum(agree), 2.0 * jnp.sum(known)])
  all_z1, all_labels = lax.stop_gradient(z1), labels.astype(jnp.int32)
  if axis_name is not None:
    # 'invarying': the same rows on every shard, so the new support set is
    # replicated by construction (out_specs P()).
    all_z1, all_labels = (lax.all_gather(x, axis_name, tiled=True,
                                         to="invarying")
                          for x in (all_z1, all_labels))
    loss = lax.pmean(loss, axis_name)
    metrics = lax.pmean(metrics, axis_name)
    counts = lax.psum(counts, axis_name)
  metrics["nn_label_agreement"] = counts[0] / jnp.maximum(counts[1], 1.0)
  new_support = lax.dynamic_update_slice(support, all_z1, (offset, 0))
  new_labels = lax.dynamic_update_slice(support_labels, all_labels, (offset,))
  return loss, metrics, new_support, new_labels


def sharded_nn_contrastive_loss(views, labels, support, support_labels,
                                offset, *, mesh, temperature: float,
                                data_axis: str = "data"):
  """nn_contrastive_loss over batch-sharded global [B, 2, D] views, under jit;
  Explicit and Auto meshes alike (shard_map states its own sharding)."""
  fn = functools.partial(nn_contrastive_loss, temperature=temperature,
                         axis_name=data_axis)
  z, p = views["z"], views["p"]
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(P(data_axis),) * 5 + (P(), P(), P()),
      out_specs=(P(), P(), P(), P()))(
          z[:, 0], z[:, 1], p[:, 0], p[:, 1], labels, support, support_labels,
          offset)


def init_support(rng, queue_size: int, embedding_dim: int):
  """Random unit vectors fill the support set until K/B batches have been
  written (as the reference implementations start); labels -1."""
  support = losses.l2_normalize(
      jax.random.normal(rng, (queue_size, embedding_dim), jnp.float32))
  return support, jnp.full((queue_size,), -1, jnp.int32)


def nnclr_step(state: NnclrTrainState, batch, *, setup: base.Setup,
               temperature: float):
  """One NNCLR update on the global batch. Pure in (state, batch)."""
  batch_size = batch["labels"].shape[0]
  offset = write_offset(state.step, state.support.shape[0], batch_size)

  def objective(views, inputs):
    del inputs
    loss, metrics, support, labels = sharded_nn_contrastive_loss(
        views, batch["labels"], state.support, state.support_labels, offset,
        mesh=setup.mesh, temperature=temperature)
    return loss, metrics, (support, labels)

  new_state, metrics, (support, labels) = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn)
  # A refused (non-finite) update keeps the old support set too.
  support, labels = state_lib.where_applied(
      new_state.opt_state, (support, labels),
      (state.support, state.support_labels))
  return new_state.replace(support=support, support_labels=labels), metrics


class NNCLR(base.Method):
  """NNCLR: each view's positive is its nearest neighbour in a support set."""
  name = "nnclr"
  summary = ("NNCLR: a view's positive is its nearest neighbour in a "
             "support set of past projections; predictor, no EMA")
  doc = "docs/losses.md"

  def defaults(self):
    # queue_size: support set size K, a multiple of batch_size (a FIFO of
    # whole global batches). predictor_hidden_dim: the predictor's width.
    return {"temperature": 0.1, "queue_size": 65536,
            "predictor_hidden_dim": 4096}

  def check(self, opts, config) -> None:
    if not opts.temperature > 0:
      raise errors.ConfigError(
          f"nnclr.temperature={opts.temperature!r} must be > 0")
    if not opts.predictor_hidden_dim > 0:
      raise errors.ConfigError(f"nnclr.predictor_hidden_dim="
                               f"{opts.predictor_hidden_dim!r} must be > 0")
    k, b = opts.queue_size, config.batch_size
    if not (isinstance(k, int) and k > 0 and k % b == 0):
      raise errors.ConfigError(
          f"nnclr.queue_size={k!r} must be a positive multiple of "
          f"batch_size={b} (the support set is a FIFO of whole global "
          f"batches), e.g. {max(1, 65536 // b) * b}")

  def predictor_hidden_dim(self, opts) -> int:
    return opts.predictor_hidden_dim

  def init_state(self, opts, setup, rng) -> NnclrTrainState:
    model_rng, support_rng = jax.random.split(rng)
    base_state = super().init_state(opts, setup, model_rng)
    support, labels = init_support(support_rng, opts.queue_size,
                                   setup.embedding_dim)
    return state_lib.extend(base_state, NnclrTrainState, support=support,
                            support_labels=labels)

  def train_step(self, opts, setup, state, batch):
    return nnclr_step(state, batch, setup=setup,
                      temperature=opts.temperature)
