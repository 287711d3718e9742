"""Multi-class N-pair loss (Sohn 2016; docs/losses.md)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxclr.losses import common


def npair_with_metrics(z1, z2, labels=None, *, axis_name=None,
                       hidden_norm: bool = True, l2_reg: float = 0.0):
  """Multi-class N-pair loss (Sohn 2016, with its L2 regulariser).

  For anchor f_i = view-1 of image i, positive f_i+ = view-2 of image i and
  negatives the view-2 of every other image j of the global batch:
  l_i = log(1 + sum_{j != i} exp(f_i.f_j+ - f_i.f_i+)), averaged over the
  N anchors, which is a softmax cross-entropy at temperature 1. Plus
  l2_reg * mean_i (|f_i|^2 + |f_i+|^2) on the raw embeddings. The paper
  uses unnormalised embeddings (hidden_norm=False); with hidden_norm the
  dot products are cosines. Labels are not read (instance pairs).
  """
  del labels
  raw_sq = (jnp.sum(jnp.square(z1.astype(jnp.float32)), -1) +
            jnp.sum(jnp.square(z2.astype(jnp.float32)), -1))
  z1, z2 = common.embeddings(z1, z2, hidden_norm)
  loss, metrics = common.one_directional(z1, z2, None, temperature=1.0,
                                   axis_name=axis_name)
  if l2_reg:
    loss = loss + l2_reg * common.pmean(jnp.mean(raw_sq), axis_name)
  return loss, metrics
