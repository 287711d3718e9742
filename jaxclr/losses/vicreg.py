"""VICReg's loss (Bardes et al. 2022) over the global batch (docs/losses.md,
"VICReg").

As the authors' code computes it (facebookresearch/vicreg `main_vicreg.py`,
`VICReg.forward`), with z1, z2 [N, d] the global batch's projections:

    invariance = mean_{b,k} (z1_bk - z2_bk)^2
    variance   = (mean_k relu(1 - std1_k) + mean_k relu(1 - std2_k)) / 2,
                 std_k = sqrt(var_k + 1e-4), var the unbiased variance
    covariance = sum_{i != j} C1_ij^2 / d + sum_{i != j} C2_ij^2 / d,
                 C = (z - mean)^T (z - mean) / (N - 1)
    loss = lambda * invariance + mu * variance + nu * covariance

(lambda = mu = 25, nu = 1 published). The reference gathers z over the GPUs
for the variance and covariance (its FullGatherLayer); here they are psums
of per-shard sums (batch_stats), the same global statistics. solo-learn's
`solo/losses/vicreg.py` sums the two views' variance terms instead of
averaging them (twice the weight for the same mu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclr.losses import batch_stats

# Inside the square root of the variance term, as the reference.
VARIANCE_EPSILON = 1e-4


def invariance_term(z1, z2, *, axis_name=None):
  """Mean squared difference of the two views over the global batch and
  the dimensions (PyTorch's F.mse_loss on the whole batch)."""
  total = batch_stats.global_sum(jnp.sum(jnp.square(z1 - z2)), axis_name)
  return total / (batch_stats.global_count(z1, axis_name) * z1.shape[1])


def variance_covariance_terms(z, *, axis_name=None):
  """(variance hinge mean_k relu(1 - std_k), covariance sum_{i != j}
  C_ij^2 / d) of one view's projections over the global batch."""
  n, dim = batch_stats.global_count(z, axis_name), z.shape[1]
  c = batch_stats.centred(z, axis_name)
  covariance = batch_stats.cross_product(c, c, axis_name) / (n - 1)  # [d, d]
  std = jnp.sqrt(jnp.diagonal(covariance) + VARIANCE_EPSILON)
  return (jnp.mean(jax.nn.relu(1.0 - std)),
          batch_stats.off_diagonal_square_sum(covariance) / dim)


def vicreg_with_metrics(z1, z2, labels, *, axis_name=None,
                        invariance_weight: float, variance_weight: float,
                        covariance_weight: float):
  """The loss of this shard's rows z1, z2 [n, d] (the global batch when
  axis_name is None); the same global value on every shard.

  Returns (loss, metrics): the three terms before weighting
  (vicreg_invariance, vicreg_variance, vicreg_covariance).
  """
  del labels  # An image's two views are the only pair it compares.
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  invariance = invariance_term(z1, z2, axis_name=axis_name)
  variance1, covariance1 = variance_covariance_terms(z1, axis_name=axis_name)
  variance2, covariance2 = variance_covariance_terms(z2, axis_name=axis_name)
  variance = 0.5 * (variance1 + variance2)
  covariance = covariance1 + covariance2
  loss = (invariance_weight * invariance + variance_weight * variance
          + covariance_weight * covariance)
  return loss, {"vicreg_invariance": invariance,
                "vicreg_variance": variance,
                "vicreg_covariance": covariance}
