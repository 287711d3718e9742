"""TrainState, the jit-compiled SimCLR step, and its pure pieces.

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

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxclr import losses, optim


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 [], finished updates.
  params: Any
  batch_stats: Any
  opt_state: Any
  # int32 [3]: (first step whose loss or gradient was non-finite, or -1;
  # how many such steps; at the first one, NONFINITE_LOSS | NONFINITE_GRAD).
  # Kept on device so the guard never syncs the host.
  nonfinite: jax.Array


NONFINITE_LOSS, NONFINITE_GRAD = 1, 2
NO_NONFINITE = (-1, 0, 0)


def init_train_state(rng, *, model: nn.Module, tx: optax.GradientTransformation,
                     image_size: int) -> TrainState:
  """Pure: jit it with out_shardings so the state is born where it lives."""
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  variables = model.init(rng, dummy, train=True)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(params),
                    nonfinite=jnp.array(NO_NONFINITE, jnp.int32))


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


def train_step(state: TrainState, batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               mesh, temperature: float, hidden_norm: bool,
               weight_decay: float, nonfinite_policy: str,
               augment_fn: Callable | None = None, rng=None,
               debug_inject_nan_at_step: int = -1):
  """One SimCLR update on the global batch. Pure in (state, batch).

  batch: images [B, 2, H, W, 3] float in [0, 1] (or uint8 in [0, 255]),
  labels [B], example_ids [B] (and color_params [B, 2, P] with
  augment.on_device).
  augment_fn(images, color_params) -> images runs on device when the
  colour/blur augmentations are configured to.
  debug_inject_nan_at_step > 0 (tests) makes the loss of the update that
  produces that step NaN; at -1 the program does not contain the check.
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
    z = out["z"].reshape((num_images, 2, -1))  # [B, 2, D]
    loss, metrics = losses.sharded_nt_xent_with_metrics(
        z[:, 0], z[:, 1], mesh=mesh, temperature=temperature,
        hidden_norm=hidden_norm)
    total = loss
    if "logits" in out:
      logits = out["logits"].reshape((num_images, 2, -1))
      probe_loss, probe_acc = probe_loss_and_accuracy(logits, batch["labels"])
      total = total + probe_loss + optim.probe_l2_penalty(params, weight_decay)
      metrics = {**metrics, "probe_loss": probe_loss, "probe_acc": probe_acc}
    if debug_inject_nan_at_step > 0:
      total = total * jnp.where(state.step + 1 == debug_inject_nan_at_step,
                                jnp.nan, 1.0)
    return total, (loss, metrics, new_vars["batch_stats"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (total, (loss, metrics, batch_stats)), grads = grad_fn(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  grad_norm = optax.tree.norm(grads)
  loss_ok, grad_ok = jnp.isfinite(total), jnp.isfinite(grad_norm)
  finite = loss_ok & grad_ok
  first_bad, num_bad, which = (state.nonfinite[0], state.nonfinite[1],
                               state.nonfinite[2])
  is_first = (first_bad < 0) & ~finite
  first_bad = jnp.where(is_first, state.step, first_bad)
  which = jnp.where(is_first, jnp.where(loss_ok, 0, NONFINITE_LOSS) |
                    jnp.where(grad_ok, 0, NONFINITE_GRAD), which)
  nonfinite = jnp.stack([first_bad, num_bad + (~finite).astype(jnp.int32),
                         which])
  if nonfinite_policy == "stop":
    # Freeze everything from the first bad step on; the host stops the run
    # at its next check without ever saving the poisoned state.
    apply = finite & (state.nonfinite[0] < 0)
    new_step = jnp.where(apply, state.step + 1, state.step)
  elif nonfinite_policy == "skip":
    apply = finite
    new_step = state.step + 1
  else:
    raise ValueError(f"nonfinite_policy={nonfinite_policy!r}; valid: 'stop', 'skip'")
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(apply, n, o), new, old)
  new_state = state.replace(
      step=new_step, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      batch_stats=keep(batch_stats, state.batch_stats), nonfinite=nonfinite)
  metrics = {**metrics, "loss": loss, "total_loss": total,
             "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
  return new_state, metrics


def make_train_step(*, config, model, tx, schedule, mesh, state_sharding,
                    batch_sharding, replicated_sharding, augment_fn=None):
  """jit(train_step) with shardings and the state buffers donated."""
  rng = jax.random.key(config.seed)
  step = functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, mesh=mesh,
      temperature=config.temperature, hidden_norm=config.hidden_norm,
      weight_decay=config.weight_decay,
      nonfinite_policy=config.nonfinite_policy, augment_fn=augment_fn,
      rng=rng,
      debug_inject_nan_at_step=config.get("debug_inject_nan_at_step", -1))
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding),
                 donate_argnums=0)
