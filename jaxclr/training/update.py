"""The update every pretraining method's step is built on (methods/):
views -> the network with global BatchNorm -> the method's objective (+ the
online probe) -> gradients -> the optimizer, over global arrays on the
1-D 'data' mesh.

BatchNorm statistics span the whole global batch because the arrays are
global: both views together (SimCLR's), or each view's global batch apart
(per_view_bn, as BYOL's and MoCo's reference code run the network once per
view). A method's loss that compares examples runs in shard_map
(jaxclr/losses) and is differentiated from outside, which gives the exact
global gradient with no extra averaging.

Multi-crop (batch['local_images'], augment.num_local_crops > 0): the local
crops are another resolution, so the network runs once more on them, as
the references' multi-crop wrappers run one pass per resolution. Each pass
normalises by its own group's statistics over the global batch, and the
running statistics move once per pass (docs/methods.md, "Multi-crop").
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxclr.training import optim, state as state_lib
from jaxclr.training.state import TrainState


def init_train_state(rng, *, model: nn.Module, optimizer: optim.Optimizer,
                     image_size: int) -> TrainState:
  """The state every method starts from: the network's params and BatchNorm
  statistics, and the optimizer's state. Pure: jit it with out_shardings so
  the state is born where it lives."""
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  variables = model.init(rng, dummy, train=True)
  return state_lib.create(variables["params"], variables["batch_stats"],
                          optimizer)


def flatten_views(images):
  """[B, 2, H, W, C] -> [2B, H, W, C], rows ordered (image, view).

  Merging the (sharded) batch axis with the view axis keeps every device's
  rows on that device, so no data moves.
  """
  return images.reshape((-1,) + images.shape[2:])


def apply_network(model: nn.Module, variables, inputs, *,
                  per_view_bn: bool = False):
  """A network in training mode on the flattened views of a global batch.

  inputs: [2B, H, W, 3], rows (image, view) as flatten_views orders them.
  per_view_bn=False: one call on the 2B rows, so BatchNorm normalises both
  views together (SimCLR: the TF code concatenates the two views). True: one
  call per view, each normalised by its own view's global batch, and the
  running statistics take the two updates in turn: BYOL's and MoCo's
  reference code run the network once per view (deepmind-research
  byol/byol_experiment.py `apply_once_fn`, facebookresearch/moco-v3
  moco/builder.py `forward`).

  Returns (outputs with every array as [B, 2, ...], new batch_stats).
  """
  def apply(x, batch_stats):
    out, new_vars = model.apply({**variables, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
    return out, new_vars["batch_stats"]

  batch_stats = variables["batch_stats"]
  if not per_view_bn:
    out, batch_stats = apply(inputs, batch_stats)
    return jax.tree.map(lambda a: a.reshape((-1, 2) + a.shape[1:]),
                        out), batch_stats
  pairs = inputs.reshape((-1, 2) + inputs.shape[1:])  # [B, 2, H, W, 3]
  outs = []
  for view in range(2):
    out, batch_stats = apply(pairs[:, view], batch_stats)
    outs.append(out)
  return jax.tree.map(lambda a, b: jnp.stack([a, b], axis=1),
                      *outs), batch_stats


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


# The network's outputs that a method's objective reads per view.
VIEW_OUTPUTS = ("z", "p", "prototype_scores")


def _views_input(batch, prefix: str, augment_fn):
  """Float images [B, V, H, W, 3] of the batch's `prefix`images, coloured
  on device when augment_fn is set."""
  images = images_as_float(batch[f"{prefix}images"])
  if augment_fn is not None:
    images = augment_fn(images, batch[f"{prefix}color_params"])
  return images


def _per_view(out, num_images: int, num_views: int, prefix: str = ""):
  return {prefix + k: out[k].reshape((num_images, num_views, -1))
          for k in VIEW_OUTPUTS if k in out}


def all_crops(views, key: str):
  """[B, 2 + k, ...]: the global views' views[key], then the local crops'
  (multi-crop), e.g. every crop's prototype scores."""
  if f"local_{key}" not in views:
    return views[key]
  return jnp.concatenate([views[key], views[f"local_{key}"]], axis=1)


def model_update(state: TrainState, batch, *, model: nn.Module,
                 optimizer: optim.Optimizer, weight_decay: float,
                 objective: Callable, augment_fn: Callable | None = None,
                 per_view_bn: bool = False):
  """The update every pretraining method's step is: views -> model ->
  objective (+ the online probe) -> gradients -> optimizer. Pure.

  objective(views, inputs) -> (loss, metrics, aux): views holds the model's
  per-view outputs as [B, 2, D] (z; p with a predictor; prototype_scores
  with prototypes), and with multi-crop the local crops' as local_z,
  local_prototype_scores, ... [B, k, D]; inputs the flattened global views
  [2B, H, W, 3] (for a second network, e.g. BYOL's target: apply_network).
  aux is returned as is (gradients stopped), e.g. a method's new state.
  per_view_bn: BatchNorm per global view (apply_network).
  Returns (new state, metrics, aux).
  """
  images = _views_input(batch, "", augment_fn)
  num_images = images.shape[0]
  inputs = flatten_views(images)  # [2B, H, W, 3]
  local_inputs = None
  if "local_images" in batch:
    local_images = _views_input(batch, "local_", augment_fn)
    num_local = local_images.shape[1]
    local_inputs = flatten_views(local_images)  # [kB, h, h, 3]

  def loss_fn(params):
    out, batch_stats = apply_network(
        model, {"params": params, "batch_stats": state.batch_stats}, inputs,
        per_view_bn=per_view_bn)
    views = {k: out[k] for k in VIEW_OUTPUTS if k in out}  # [B, 2, D]
    if local_inputs is not None:  # A second pass: the module docstring.
      local_out, new_vars = model.apply(
          {"params": params, "batch_stats": batch_stats},
          local_inputs, train=True, mutable=["batch_stats"])
      batch_stats = new_vars["batch_stats"]
      views.update(_per_view(local_out, num_images, num_local, "local_"))
    loss_value, metrics, aux = objective(views, inputs)
    total = loss_value
    if "logits" in out:
      probe_loss, probe_acc = probe_loss_and_accuracy(out["logits"],
                                                      batch["labels"])
      total = total + probe_loss + optim.probe_l2_penalty(params, weight_decay)
      metrics = {**metrics, "probe_loss": probe_loss, "probe_acc": probe_acc}
    return total, (loss_value, metrics, batch_stats,
                   jax.lax.stop_gradient(aux))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (total, (loss_value, metrics, batch_stats, aux)), grads = grad_fn(
      state.params)
  new_state, update_metrics = state_lib.apply_gradients(
      state, grads, batch_stats, optimizer)
  return new_state, {**metrics, **update_metrics, "loss": loss_value,
                     "total_loss": total}, aux


def jit_step(step, *, state_sharding, batch_sharding, replicated_sharding,
             compiler_options=None):
  """jit of a pretraining step(state, batch) -> (state, metrics), with its
  shardings and the state buffers donated (every method's step).
  compiler_options: XLA's, e.g. models.precision.compiler_options of the
  compute dtype."""
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding),
                 donate_argnums=0, compiler_options=compiler_options or None)
