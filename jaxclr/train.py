"""The jit-compiled SimCLR step and its pure pieces (TrainState: jaxclr.state).

The step runs over global arrays on a 1-D 'data' mesh spanning every device of
every process. BatchNorm statistics are computed over the whole global batch
(both views) because the arrays are global; the contrastive loss is computed
per device as (local rows x all-gathered columns) inside shard_map and
differentiated from outside, which gives the exact global gradient with no
extra averaging.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxclr import config_lib, metric_losses, objectives, optim
from jaxclr import state as state_lib
from jaxclr.state import TrainState


class QueueTrainState(TrainState):
  """InfoNCE with a negatives queue: the queue is state (and checkpointed)."""
  queue: Any  # float32 [K, D] past view-2 projections, oldest first; 0 = empty.


def init_train_state(rng, *, model: nn.Module, optimizer: optim.Optimizer,
                     image_size: int, queue_size: int = 0,
                     embedding_dim: int = 0) -> TrainState:
  """Pure: jit it with out_shardings so the state is born where it lives.

  queue_size > 0 adds an all-zero (empty) negatives queue [K, embedding_dim].
  """
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  variables = model.init(rng, dummy, train=True)
  state = state_lib.create(variables["params"], variables["batch_stats"],
                           optimizer)
  if queue_size <= 0:
    return state
  return state_lib.extend(
      state, QueueTrainState,
      queue=jnp.zeros((queue_size, embedding_dim), jnp.float32))


def flatten_views(images):
  """[B, 2, H, W, C] -> [2B, H, W, C], rows ordered (image, view).

  Merging the (sharded) batch axis with the view axis keeps every device's
  rows on that device, so no data moves.
  """
  return images.reshape((-1,) + images.shape[2:])


def probe_loss_and_accuracy(logits, labels):
  """Cross-entropy and accuracy of the online probe over both views.

  logits: [B, 2, C]; labels: [B] (-1 = unlabelled, ignored).
  """
  valid = (labels >= 0).astype(jnp.float32)[:, None]  # [B, 1]
  safe_labels = jnp.maximum(labels, 0)[:, None]  # [B, 1]
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.broadcast_to(safe_labels, logits.shape[:2]))
  denom = jnp.maximum(2.0 * jnp.sum(valid), 1.0)
  correct = (jnp.argmax(logits, -1) == safe_labels).astype(jnp.float32)
  return jnp.sum(ce * valid) / denom, jnp.sum(correct * valid) / denom


def images_as_float(images):
  """float32 in [0, 1] from float views or uint8 ones (transfer_dtype='uint8')."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def model_update(state: TrainState, batch, *, model: nn.Module,
                 optimizer: optim.Optimizer, weight_decay: float,
                 objective: Callable, augment_fn: Callable | None = None):
  """The update every pretraining method's step is: views -> model ->
  objective (+ the online probe) -> gradients -> optimizer. Pure.

  objective(views, inputs) -> (loss, metrics, aux): views holds the model's
  per-view outputs as [B, 2, D] (z; p with a predictor), inputs the
  flattened images [2B, H, W, 3] (for a second network, e.g. BYOL's target);
  aux is returned as is (gradients stopped), e.g. a method's new state.
  Returns (new state, metrics, aux).
  """
  images = images_as_float(batch["images"])
  if augment_fn is not None:
    images = augment_fn(images, batch["color_params"])
  num_images = images.shape[0]
  inputs = flatten_views(images)  # [2B, H, W, 3]

  def loss_fn(params):
    out, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, inputs,
        train=True, mutable=["batch_stats"])
    views = {k: out[k].reshape((num_images, 2, -1)) for k in ("z", "p")
             if k in out}
    loss_value, metrics, aux = objective(views, inputs)
    total = loss_value
    if "logits" in out:
      logits = out["logits"].reshape((num_images, 2, -1))
      probe_loss, probe_acc = probe_loss_and_accuracy(logits, batch["labels"])
      total = total + probe_loss + optim.probe_l2_penalty(params, weight_decay)
      metrics = {**metrics, "probe_loss": probe_loss, "probe_acc": probe_acc}
    return total, (loss_value, metrics, new_vars["batch_stats"],
                   jax.lax.stop_gradient(aux))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (total, (loss_value, metrics, batch_stats, aux)), grads = grad_fn(
      state.params)
  new_state, update_metrics = state_lib.apply_gradients(
      state, grads, batch_stats, optimizer)
  return new_state, {**metrics, **update_metrics, "loss": loss_value,
                     "total_loss": total}, aux


def train_step(state: TrainState, batch, *, model: nn.Module,
               optimizer: optim.Optimizer, mesh, temperature: float,
               hidden_norm: bool, weight_decay: float,
               augment_fn: Callable | None = None, loss: str = "nt_xent",
               class_labels: bool = False, margin: float = 0.2):
  """One SimCLR update on the global batch. Pure in (state, batch).

  batch: images [B, 2, H, W, 3] float in [0, 1] (or uint8 in [0, 255]),
  labels [B], example_ids [B], and with device augmentation color_params
  [B, 2, P]: augment_fn(images, color_params) -> images then applies the
  colour/blur draws the host made. loss names objectives.LOSSES' entry;
  with class_labels it reads batch["labels"] (same class = positive).
  """
  queue = getattr(state, "queue", None)  # QueueTrainState (InfoNCE) only.

  def objective(views, inputs):
    del inputs
    loss_value, metrics = objectives.sharded_contrastive_loss(
        loss, views["z"], batch["labels"] if class_labels else None,
        mesh=mesh, temperature=temperature, hidden_norm=hidden_norm,
        margin=margin, queue=queue)
    if queue is None:
      return loss_value, metrics, ()
    keys = objectives.replicated_rows(views["z"][:, 1], mesh=mesh)
    return loss_value, metrics, metric_losses.update_queue(queue, keys)

  new_state, metrics, new_queue = model_update(
      state, batch, model=model, optimizer=optimizer,
      weight_decay=weight_decay, objective=objective, augment_fn=augment_fn)
  if queue is not None:  # A refused update keeps the old queue too.
    new_state = new_state.replace(queue=state_lib.where_applied(
        new_state.opt_state, new_queue, queue))
  return new_state, metrics


def jit_step(step, *, state_sharding, batch_sharding, replicated_sharding):
  """jit of a pretraining step(state, batch) -> (state, metrics), with its
  shardings and the state buffers donated (every method's step)."""
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding),
                 donate_argnums=0)


def make_train_step(*, config, model, optimizer, mesh, augment_fn=None,
                    **shardings):
  """jit(train_step) with shardings and the state buffers donated."""
  loss, class_labels = config_lib.loss_setup(config)
  step = functools.partial(
      train_step, model=model, optimizer=optimizer, mesh=mesh,
      temperature=config.temperature, hidden_norm=config.hidden_norm,
      weight_decay=config.weight_decay, augment_fn=augment_fn, loss=loss,
      class_labels=class_labels, margin=config.triplet_margin)
  return jit_step(step, **shardings)
