"""Multi-class N-pair loss (Sohn 2016; docs/losses.md)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxclr.losses import common


def npair_with_metrics(z1, z2, labels=None, *, axis_name=None,
                       embedding_l2: float = 0.002):
  """Multi-class N-pair loss with its L2 regulariser on the embeddings.

  For anchor f_i = view-1 of image i, positive f_i+ = view-2 of image i and
  negatives the view-2 of every other image j of the global batch:
  l_i = log(1 + sum_{j != i} exp(f_i.f_j+ - f_i.f_i+)), averaged over the
  N anchors, which is a softmax cross-entropy at temperature 1, plus
  embedding_l2 / 4 * (mean_i |f_i|^2 + mean_i |f_i+|^2). The embeddings are
  not normalised, and the regulariser is TensorFlow's (tensorflow/tensorflow
  tensorflow/contrib/losses/python/metric_learning/metric_loss_ops.py,
  `npairs_loss`, reg_lambda=0.002: "Embeddings should not be l2
  normalized"). The normalised form is InfoNCE at temperature 1
  (loss 'infonce'). Labels are not read (instance pairs).
  """
  del labels
  z1, z2 = common.embeddings(z1, z2, hidden_norm=False)
  loss, metrics = common.one_directional(z1, z2, None, temperature=1.0,
                                         axis_name=axis_name)
  if embedding_l2:
    sq_norms = common.pmean(jnp.mean(jnp.sum(jnp.square(z1), -1)) +
                            jnp.mean(jnp.sum(jnp.square(z2), -1)), axis_name)
    loss = loss + 0.25 * embedding_l2 * sq_norms
  return loss, metrics
