"""What the losses share: the full-precision similarity matmul, the
differentiable column gather, the contrastive metrics, and the row / column
layout of the two views over the global batch (docs/losses.md).

Every loss takes the two views' projections z1, z2 [n, d] (and optional
labels [n]): with axis_name=None they are the global batch; inside
shard_map with axis_name set they are this shard's rows, the columns (and
labels) are all-gathered over axis_name, gradients flow back through the
gather, and the result is the global loss on every shard.

Rows are anchors, columns candidates. Columns are ordered view-1 of images
0..N-1, then view-2 of images 0..N-1: view v of global image j is column
v * N + j. Anchors are this shard's view-1 rows, then its view-2 rows.

Labels: None, or every label -1, means instance discrimination (the two
views of an image are its only positives). With class labels, views of
images of the same class are positives; an image labelled -1 (unlabelled) is
a class of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr.models import precision

# Subtracted from the self-similarity logits after dividing by tau (as in the
# reference), so exp() of them is exactly 0 in float32.
LARGE_NUM = 1e9


def l2_normalize(x, eps: float = 1e-12):
  """tf.math.l2_normalize: x / sqrt(max(sum(x^2), eps))."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps))


def matmul_t(a, b):
  # Full float32 precision (precision.LOGITS_PRECISION): the logits are the
  # objective, and on TPU the default float32 matmul precision would round
  # them through bfloat16.
  return jnp.einsum("nd,md->nm", a, b, precision=precision.LOGITS_PRECISION)


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


def embeddings(z1, z2, hidden_norm: bool):
  """The views as a loss reads them (precision.LOSS_DTYPE, float32),
  L2-normalised when hidden_norm."""
  z1, z2 = precision.to_loss(z1), precision.to_loss(z2)
  if hidden_norm:
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
  return z1, z2


def _class_keys(labels, image):
  """Positive-pair key of each image: its label, or a unique negative key."""
  if labels is None:
    return image
  return jnp.where(labels >= 0, labels.astype(jnp.int32), -1 - image)


def anchors_and_columns(z1, z2, labels, axis_name):
  """Local anchors against the gathered global views.

  Returns:
    anchors [2n, d]; cols [2N, d]; self_mask [2n, 2N] (1 at each anchor's own
    column); pos_mask [2n, 2N] (same key, not itself); neg_mask (other key);
    image [n] (global index of the local rows); N.
  """
  n = z1.shape[0]
  cols1, offset = gather_rows(z1, axis_name)  # [N, d]
  cols2, _ = gather_rows(z2, axis_name)
  num_images = cols1.shape[0]
  image = jnp.arange(n) + offset  # [n]
  all_images = jnp.arange(num_images)
  all_labels = (None if labels is None
                else gather_rows(labels, axis_name)[0])
  key = _class_keys(labels, image)  # [n]
  col_key = _class_keys(all_labels, all_images)  # [N]
  anchor_key = jnp.concatenate([key, key])
  col_key = jnp.concatenate([col_key, col_key])
  self_col = jnp.concatenate([image, image + num_images])  # [2n]
  self_mask = jax.nn.one_hot(self_col, 2 * num_images, dtype=jnp.bool_)
  same = anchor_key[:, None] == col_key[None, :]  # [2n, 2N]
  return (jnp.concatenate([z1, z2]), jnp.concatenate([cols1, cols2]),
          self_mask, same & ~self_mask, ~same, image, num_images)


def global_mean(total, count, axis_name):
  """sum / count over every shard (counts may differ between shards)."""
  if axis_name is not None:
    total, count = lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0)


def pmean(tree, axis_name):
  """The mean over shards of per-shard means (equal shard sizes): the
  global mean."""
  return tree if axis_name is None else lax.pmean(tree, axis_name)


def one_directional(z1, z2, extra_cols, *, temperature, axis_name):
  """Cross-entropy of view-1 anchors against the view-2 columns (+ extra
  columns), positive = the same image's view-2; mean over global anchors."""
  cols2, offset = gather_rows(z2, axis_name)  # [N, d]
  num_images = cols2.shape[0]
  image = jnp.arange(z1.shape[0]) + offset
  logits = matmul_t(z1, cols2) / temperature  # [n, N]
  all_logits = logits
  if extra_cols is not None:
    all_logits = jnp.concatenate([logits, extra_cols], axis=1)
  logp = jax.nn.log_softmax(all_logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, image[:, None], axis=-1))
  metrics = contrast_metrics(logits[:, :num_images], image)
  return pmean((loss, metrics), axis_name)
