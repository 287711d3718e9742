"""Linear probes on frozen features: the fast protocol and label subsets.

Fast protocol (an approximation of SimCLR's linear evaluation, section 6.3 of
docs/simclr.md): the features of the training split are extracted ONCE
(eval preprocessing: centre crop, no augmentation), standardised with the
training split's mean and std (no labels used), and a multinomial logistic
regression W [D, C], b [C] is fitted on device by full-batch L-BFGS
(`optax.lbfgs` with its zoom line search) on

    mean_i CE(softmax(x_i W + b), y_i) + l2/2 * ||W||^2.

Why L-BFGS and not SGD: the problem is convex and small (D x C parameters),
so a deterministic full-batch solver converges to the unique optimum in a few
hundred iterations with no learning-rate or epoch schedule to tune, and its
result does not depend on batch order or device layout. The paper protocol
instead trains with SGD + Nesterov for 90-100 epochs on crop+flip augmented
images; the augmentation usually adds a point or two on ImageNet/CIFAR that
this approximation does not capture (compare both in benchmarks/RESULTS.md).
The SimCLR paper itself uses L-BFGS logistic regression for its transfer
benchmarks (P1 B.8). The L2 strength is a fixed config value (`fast_l2`),
the same for every encoder, never tuned on the test split.

The features are sharded over the mesh by rows (padding rows weigh 0), so
the loss and gradient reductions run across devices under jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxclr.parallel import sharding


def class_balanced_subset(labels: np.ndarray, per_class: int, seed: int,
                          draw: int = 0) -> np.ndarray:
  """Sorted indices of `per_class` examples of every class (fewer if a class
  has fewer), drawn without replacement from (seed, draw) only."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 0x1ABE1, draw])
  picked = []
  for c in np.unique(labels[labels >= 0]):
    idx = np.flatnonzero(labels == c)
    picked.append(rng.permutation(idx)[:per_class])
  return np.sort(np.concatenate(picked))


def label_fraction_subset(labels: np.ndarray, fraction: float, seed: int,
                          draw: int = 0) -> np.ndarray:
  """Class-balanced subset with round(fraction * n_c) (>= 1) per class c."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 0xF7AC, draw])
  picked = []
  for c in np.unique(labels[labels >= 0]):
    idx = np.flatnonzero(labels == c)
    n = max(1, int(round(fraction * len(idx))))
    picked.append(rng.permutation(idx)[:n])
  return np.sort(np.concatenate(picked))


def standardizer(features: np.ndarray):
  """(mean, std) of the features, std floored to avoid dividing by ~0."""
  f = np.asarray(features, np.float64)
  mean = f.mean(0)
  std = np.maximum(f.std(0), 1e-6 * max(f.std(0).max(), 1e-30) + 1e-12)
  return mean.astype(np.float32), std.astype(np.float32)


def _shard_rows(mesh, x: np.ndarray, pad_value=0):
  n = 1 if mesh is None else mesh.devices.size
  pad = (-x.shape[0]) % n
  if pad:
    x = np.concatenate([x, np.full((pad,) + x.shape[1:], pad_value, x.dtype)])
  if mesh is None:
    return jnp.asarray(x)
  return sharding.from_host(mesh, x, P(mesh.axis_names[0]))


def auto_mesh(mesh):
  """The same devices with an Auto axis: the solver's reductions over the
  sharded rows (x.T @ g) are left to the compiler, which all-reduces them."""
  if mesh is None:
    return None
  return sharding.make_mesh("auto", list(mesh.devices.flat))


def _objective(params, x, y, w, l2):
  logits = x @ params["kernel"] + params["bias"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return (jnp.sum(ce * w) / jnp.sum(w) +
          0.5 * l2 * jnp.sum(jnp.square(params["kernel"])))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def _lbfgs_fit(x, y, w, l2, *, num_classes: int, max_iters: int):
  params = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  fun = functools.partial(_objective, x=x, y=y, w=w, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def body(carry):
    params, state, i, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=fun)
    params = optax.apply_updates(params, updates)
    return params, state, i + 1, optax.tree.norm(grad)

  def cond(carry):
    _, _, i, gnorm = carry
    return (i < max_iters) & (gnorm > 1e-6)

  params, _, iters, gnorm = jax.lax.while_loop(
      cond, body, (params, opt.init(params), jnp.zeros((), jnp.int32),
                   jnp.array(jnp.inf, jnp.float32)))
  return params, fun(params), iters


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, *,
                            num_classes: int, l2: float, mesh=None,
                            max_iters: int = 500, pad_to: int | None = None):
  """Fits W, b on (already standardised) features; returns (params, info).

  pad_to: pad the rows (with weight 0) to this many, so that probes on
  subsets of different sizes reuse one compiled solver.
  """
  mesh = auto_mesh(mesh)
  n = len(labels)
  pad = max(0, (pad_to or n) - n)
  x = _shard_rows(mesh, np.pad(np.asarray(features, np.float32),
                               ((0, pad), (0, 0))))
  y = _shard_rows(mesh, np.pad(np.asarray(labels, np.int32), (0, pad)))
  w = _shard_rows(mesh, np.pad(np.ones(n, np.float32), (0, pad)))
  params, loss, iters = _lbfgs_fit(x, y, w, jnp.float32(l2),
                                   num_classes=num_classes,
                                   max_iters=max_iters)
  params = jax.device_get(params)
  return params, {"train_loss": float(loss), "lbfgs_iters": int(iters)}


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def evaluate_linear(params, features: np.ndarray, labels: np.ndarray) -> dict:
  logits = np.asarray(features, np.float32) @ params["kernel"] + params["bias"]
  return {"top1": top_k_accuracy(logits, labels, 1),
          "top5": top_k_accuracy(logits, labels, 5)}
