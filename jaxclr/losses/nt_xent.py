"""NT-Xent, SimCLR's contrastive loss (docs/simclr.md 1).

Scale is the official code's, not the paper's: mean over view-1 anchors plus
mean over view-2 anchors, i.e. 2x the paper's L. The learning rates and weight
decays of the published recipes were tuned with this scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr.losses import common


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
  # float32 (precision.LOSS_DTYPE) before the gather: the columns travel
  # and the logits are computed in float32.
  z1, z2 = common.embeddings(z1, z2, hidden_norm)
  n = z1.shape[0]
  cols1, offset = common.gather_rows(z1, axis_name)  # [N, d]
  cols2, _ = common.gather_rows(z2, axis_name)
  num_cols = cols1.shape[0]
  labels = jnp.arange(n) + offset
  self_mask = jax.nn.one_hot(labels, num_cols, dtype=jnp.float32)  # [n, N]

  masked = common.LARGE_NUM * self_mask
  logits_aa = common.matmul_t(z1, cols1) / temperature - masked
  logits_bb = common.matmul_t(z2, cols2) / temperature - masked
  logits_ab = common.matmul_t(z1, cols2) / temperature
  logits_ba = common.matmul_t(z2, cols1) / temperature

  def cross_entropy(logits):  # positive sits in the first (ab/ba) block
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

  loss = (cross_entropy(jnp.concatenate([logits_ab, logits_aa], axis=1)) +
          cross_entropy(jnp.concatenate([logits_ba, logits_bb], axis=1)))

  # Metrics on the ab block only (view-1 anchors vs all view-2 columns).
  metrics = common.contrast_metrics(logits_ab, labels)
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
