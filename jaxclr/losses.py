"""NT-Xent, SimCLR's contrastive loss, and its metrics (docs/simclr.md 1).

Also the pieces the other losses (jaxclr/metric_losses.py) share: the
full-precision similarity matmul, the differentiable column gather and the
contrastive metrics.

Scale is the official code's, not the paper's: mean over view-1 anchors plus
mean over view-2 anchors, i.e. 2x the paper's L. The learning rates and weight
decays of the published recipes were tuned with this scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# Subtracted from the self-similarity logits after dividing by tau (as in the
# reference), so exp() of them is exactly 0 in float32.
LARGE_NUM = 1e9


def l2_normalize(x, eps: float = 1e-12):
  """tf.math.l2_normalize: x / sqrt(max(sum(x^2), eps))."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps))


def matmul_t(a, b):
  # Full fp32 precision: the logits are the objective, and on TPU the default
  # fp32 matmul precision would round them through bf16.
  return jnp.einsum("nd,md->nm", a, b, precision=lax.Precision.HIGHEST)


def gather_rows(x, axis_name):
  """(all rows over axis_name, global index of this shard's first row).

  With axis_name=None, x is already global: (x, 0). The all-gather is tiled
  (shard order) and differentiable: its transpose sends each column's
  gradient back to the shard that owns the row.
  """
  if axis_name is None:
    return x, 0
  return (lax.all_gather(x, axis_name, tiled=True),
          lax.axis_index(axis_name) * x.shape[0])


def contrast_metrics(logits_ab, labels):
  """contrast_acc, contrast_top5_acc, contrast_entropy of this shard's rows.

  logits_ab: [n, N] view-1 anchors against every view-2 column of the global
  batch; labels: [n] global column of each anchor's positive. Means over the
  local rows: pmean them over the shards for the global value.
  """
  logits_ab = lax.stop_gradient(logits_ab)
  positive = jnp.take_along_axis(logits_ab, labels[:, None], axis=-1)
  rank = jnp.sum(logits_ab > positive, axis=-1)  # 0 when the positive is top.
  p = jax.nn.softmax(logits_ab, axis=-1)
  return {
      "contrast_acc": jnp.mean((jnp.argmax(logits_ab, -1) == labels)
                               .astype(jnp.float32)),
      "contrast_top5_acc": jnp.mean((rank < 5).astype(jnp.float32)),
      "contrast_entropy": jnp.mean(-jnp.sum(p * jnp.log(p + 1e-8), axis=-1)),
  }


def nt_xent_with_metrics(z1, z2, *, temperature: float, axis_name=None,
                         hidden_norm: bool = True):
  """NT-Xent loss and contrastive metrics.

  Args:
    z1, z2: [n, d] projections of the two views of the same n images. With
      axis_name=None, n is the whole (global) batch. Inside shard_map with
      axis_name set, they are this shard's rows; the columns are all-gathered
      over axis_name (gradients flow back through the gather) and the positive
      of local row i is global column i + axis_index * n.
    temperature: tau > 0.
    axis_name: mapped axis (or tuple of axes) spanning the data-parallel shards.
    hidden_norm: L2-normalise the embeddings first (SimCLR's default).

  Returns:
    (loss, metrics): the global loss (replicated across shards when
    axis_name is set) and dict(contrast_acc, contrast_top5_acc,
    contrast_entropy), all over the global batch.
  """
  z1 = z1.astype(jnp.float32)
  z2 = z2.astype(jnp.float32)
  if hidden_norm:
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
  n = z1.shape[0]
  cols1, offset = gather_rows(z1, axis_name)  # [N, d]
  cols2, _ = gather_rows(z2, axis_name)
  num_cols = cols1.shape[0]
  labels = jnp.arange(n) + offset
  self_mask = jax.nn.one_hot(labels, num_cols, dtype=jnp.float32)  # [n, N]

  logits_aa = matmul_t(z1, cols1) / temperature - LARGE_NUM * self_mask
  logits_bb = matmul_t(z2, cols2) / temperature - LARGE_NUM * self_mask
  logits_ab = matmul_t(z1, cols2) / temperature
  logits_ba = matmul_t(z2, cols1) / temperature

  def cross_entropy(logits):  # positive sits in the first (ab/ba) block
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

  loss = (cross_entropy(jnp.concatenate([logits_ab, logits_aa], axis=1)) +
          cross_entropy(jnp.concatenate([logits_ba, logits_bb], axis=1)))

  # Metrics on the ab block only (view-1 anchors vs all view-2 columns).
  metrics = contrast_metrics(logits_ab, labels)
  if axis_name is not None:
    # Equal shard sizes: the mean over shards is the global mean.
    loss = lax.pmean(loss, axis_name)
    metrics = lax.pmean(metrics, axis_name)
  return loss, metrics


def nt_xent(z1, z2, *, temperature: float, axis_name=None,
            hidden_norm: bool = True):
  """The scalar NT-Xent loss; see nt_xent_with_metrics."""
  return nt_xent_with_metrics(z1, z2, temperature=temperature,
                              axis_name=axis_name, hidden_norm=hidden_norm)[0]


def sharded_nt_xent_with_metrics(z1, z2, *, mesh, temperature: float,
                                 hidden_norm: bool = True,
                                 data_axis: str = "data"):
  """nt_xent_with_metrics over a batch-sharded global array, under jit.

  Each device holds a (local 2n x global 2N) block of logits rather than the
  whole matrix. Works on Explicit and Auto meshes alike, since shard_map
  states its own sharding. Differentiate the returned loss (it is the global
  loss): do not average the resulting gradients again.
  """
  fn = functools.partial(nt_xent_with_metrics, temperature=temperature,
                         axis_name=data_axis, hidden_norm=hidden_norm)
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(data_axis), P(data_axis)),
                       out_specs=(P(), P()))(z1, z2)
