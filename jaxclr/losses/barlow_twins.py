"""Barlow Twins' loss (Zbontar et al. 2021) over the global batch
(docs/losses.md, "Barlow Twins").

As the authors' code computes it (facebookresearch/barlowtwins `main.py`,
`BarlowTwins.forward`): each view's projections are standardised per
dimension over the global batch (its `self.bn`, a BatchNorm1d without
affine that SyncBatchNorm makes global), the cross-correlation is
c = z1n^T z2n / N (N the global batch), and

    loss = scale * (sum_i (1 - c_ii)^2 + lambda * sum_{i != j} c_ij^2).

The authors' code has no scale (1.0; lambda 0.0051 at d = 8192);
solo-learn's `solo/losses/barlow.py` multiplies by `scale_loss` (0.1 in its
CIFAR recipe) and standardises each device's rows alone (a local
BatchNorm1d), which is not the global statistic; here it is.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxclr.losses import batch_stats

# PyTorch BatchNorm1d's default epsilon: the reference's standardisation.
STANDARDIZE_EPSILON = 1e-5


def cross_correlation(z1, z2, *, axis_name=None):
  """c [d, d]: the two views' projections, each standardised over the global
  batch, correlated over it (c_ij = sum_b z1n_bi z2n_bj / N)."""
  z1n = batch_stats.standardized(z1, axis_name, STANDARDIZE_EPSILON)
  z2n = batch_stats.standardized(z2, axis_name, STANDARDIZE_EPSILON)
  return batch_stats.cross_product(z1n, z2n, axis_name) / (
      batch_stats.global_count(z1, axis_name))


def barlow_twins_terms(c):
  """(on-diagonal sum_i (1 - c_ii)^2, off-diagonal sum_{i != j} c_ij^2)."""
  on_diagonal = jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
  return on_diagonal, batch_stats.off_diagonal_square_sum(c)


def barlow_twins_with_metrics(z1, z2, labels, *, axis_name=None,
                              barlow_lambda: float, barlow_scale: float):
  """The loss of this shard's rows z1, z2 [n, d] (the global batch when
  axis_name is None); the same global value on every shard.

  Returns (loss, metrics): bt_on_diagonal and bt_off_diagonal, the two
  sums before weighting.
  """
  del labels  # An image's two views are the only pair it compares.
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  c = cross_correlation(z1, z2, axis_name=axis_name)
  on_diagonal, off_diagonal = barlow_twins_terms(c)
  loss = barlow_scale * (on_diagonal + barlow_lambda * off_diagonal)
  return loss, {"bt_on_diagonal": on_diagonal,
                "bt_off_diagonal": off_diagonal}
