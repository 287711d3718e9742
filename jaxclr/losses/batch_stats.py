"""Statistics over the global batch, for the losses built on them (Barlow
Twins' standardisation and cross-correlation, VICReg's variance and
covariance; docs/losses.md).

Each function takes one shard's rows x [n, d]; with axis_name set (inside
shard_map) its sums run over every shard with `lax.psum`, so each shard
holds the global batch's statistic and the gradient through it is the
global one; with axis_name=None, x is the whole batch. Computing any of
them per shard instead is the bug the methods' layout tests are built to
catch (tests/barlow_twins_test.py, tests/vicreg_test.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def global_sum(x, axis_name):
  """x summed over the shards (x itself when axis_name is None)."""
  return x if axis_name is None else lax.psum(x, axis_name)


def global_count(x, axis_name) -> int:
  """Rows of the global batch: this shard's times the number of shards
  (every shard holds the same number)."""
  n = x.shape[0]
  return n if axis_name is None else n * lax.axis_size(axis_name)


def centred(x, axis_name):
  """x minus its column means over the global batch."""
  mean = global_sum(jnp.sum(x, axis=0), axis_name) / global_count(
      x, axis_name)
  return x - mean


def standardized(x, axis_name, epsilon: float):
  """(x - mean) / sqrt(var + epsilon) per column over the global batch, with
  the biased variance: BatchNorm in training mode without scale or offset
  (PyTorch's BatchNorm1d(affine=False)). Two passes (centre, then square),
  as jaxclr's BatchNorm, so round-off does not depend on the layout."""
  c = centred(x, axis_name)
  var = global_sum(jnp.sum(c * c, axis=0), axis_name) / global_count(
      x, axis_name)
  return c * lax.rsqrt(var + epsilon)


def cross_product(a, b, axis_name):
  """a^T b [d, e] summed over the rows of the global batch, in full float32
  (on TPU the default precision would round it through bfloat16)."""
  local = jnp.einsum("nd,ne->de", a, b, precision=lax.Precision.HIGHEST)
  return global_sum(local, axis_name)


def off_diagonal_square_sum(m):
  """sum_{i != j} m_ij^2 of a square matrix (masked, not sum(m^2) minus the
  diagonal's, which cancels when the diagonal dominates)."""
  off = jnp.where(jnp.eye(m.shape[0], dtype=jnp.bool_), 0.0, m)
  return jnp.sum(off * off)
