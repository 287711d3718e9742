"""One-directional InfoNCE with an optional queue of past keys
(docs/losses.md)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxclr.losses import common


def infonce_with_metrics(z1, z2, labels=None, *, temperature: float,
                         axis_name=None, hidden_norm: bool = True,
                         queue=None):
  """One-directional InfoNCE (view-1 -> view-2) with an optional queue.

  l_i = -log(exp(s_ii/tau) / (sum_j exp(s_ij/tau) + sum_k exp(s_ik/tau))),
  s_ij = view-1 of image i . view-2 of image j over the global batch, and k
  over the rows of `queue` [K, d] (past view-2 embeddings, identical on
  every shard, no gradient; update it with update_queue). Rows of the queue
  that are exactly zero (not filled yet) are left out. Mean over the N
  view-1 anchors. Labels are not read (instance pairs).
  """
  del labels
  z1, z2 = common.embeddings(z1, z2, hidden_norm)
  extra = None
  if queue is not None and queue.shape[0]:
    queue = lax.stop_gradient(queue.astype(jnp.float32))
    filled = jnp.sum(jnp.square(queue), axis=-1) > 0  # [K]
    if hidden_norm:
      queue = common.l2_normalize(queue)
    extra = (common.matmul_t(z1, queue) / temperature -
             common.LARGE_NUM * (~filled).astype(jnp.float32)[None, :])
  return common.one_directional(z1, z2, extra, temperature=temperature,
                          axis_name=axis_name)


def update_queue(queue, new_keys):
  """FIFO: the queue [K, d] (oldest row first) with the global batch's
  new_keys [B, d] appended in order and the oldest rows dropped."""
  size = queue.shape[0]
  if size == 0:
    return queue
  keys = lax.stop_gradient(new_keys).astype(queue.dtype)
  return jnp.concatenate([queue, keys], axis=0)[-size:]
