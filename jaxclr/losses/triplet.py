"""Triplet loss with batch-hard or semi-hard mining over the global batch
(docs/losses.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr.losses import common


MININGS = ("batch_hard", "semi_hard")


def triplet_distances(z1, z2, labels=None, *, axis_name=None,
                      hidden_norm: bool = True):
  """Squared Euclidean distances of the local anchors to every global view.

  Returns (dist [2n, 2N], pos_mask, neg_mask, image [n], N); see the module
  docstring for the row and column order. On unit vectors dist = 2 - 2 cos,
  in [0, 4].
  """
  z1, z2 = common.embeddings(z1, z2, hidden_norm)
  anchors, cols, _, pos, neg, image, num_images = common.anchors_and_columns(
      z1, z2, labels, axis_name)
  sq_a = jnp.sum(jnp.square(anchors), axis=-1)
  sq_c = jnp.sum(jnp.square(cols), axis=-1)
  dist = sq_a[:, None] + sq_c[None, :] - 2.0 * common.matmul_t(anchors, cols)
  return jnp.maximum(dist, 0.0), pos, neg, image, num_images


def mine_batch_hard(dist, pos, neg):
  """Hermans et al. 2017 'batch hard': per anchor, the farthest positive
  and the nearest negative column. Returns (pos_col, neg_col, valid) [2n];
  valid is False for an anchor without any negative."""
  pos_col = jnp.argmax(jnp.where(pos, dist, -jnp.inf), axis=-1)
  neg_col = jnp.argmin(jnp.where(neg, dist, jnp.inf), axis=-1)
  return pos_col, neg_col, jnp.any(neg, axis=-1)


def mine_semi_hard(dist, pos, neg):
  """FaceNet semi-hard negatives (Schroff et al. 2015), for every positive
  pair: for anchor a and positive p, the nearest negative n that is farther
  than the positive (d_an > d_ap); when none is, the farthest negative (as
  tf-addons' triplet_semihard_loss). Pairs whose hinge would be 0 either way
  (d_an >= d_ap + margin) are kept in the mean, as in tf-addons.

  Returns (neg_col [2n, 2N]: the negative column for each positive column p,
  -1 where p is not a positive; valid [2n, 2N]: a positive pair whose anchor
  has a negative).
  """
  neg_dist = jnp.where(neg, dist, jnp.inf)
  order = jnp.argsort(neg_dist, axis=-1)  # Negatives first, nearest first.
  sorted_dist = jnp.take_along_axis(neg_dist, order, axis=-1)
  num_neg = jnp.sum(neg, axis=-1)  # [2n]
  # First sorted negative strictly farther than each column's distance.
  first = jax.vmap(lambda s, d: jnp.searchsorted(s, d, side="right"))(
      sorted_dist, dist)  # [2n, 2N]
  rank = jnp.where(first < num_neg[:, None], first,
                   jnp.maximum(num_neg - 1, 0)[:, None])
  neg_col = jnp.take_along_axis(order, rank, axis=-1)  # rank < 2N
  valid = pos & (num_neg > 0)[:, None]
  return jnp.where(valid, neg_col, -1), valid


def _per_image(x, n):
  """[2n, ...] (view-1 rows, then view-2 rows) -> [n, 2, ...]."""
  return jnp.swapaxes(x.reshape((2, n) + x.shape[1:]), 0, 1)


def mined_triplets(z1, z2, labels=None, *, mining: str, axis_name=None,
                   hidden_norm: bool = True):
  """The triplets the loss uses, as global column indices, per local image.

  batch_hard: (pos_col, neg_col) each [n, 2] (-1: no negative).
  semi_hard: neg_col [n, 2, 2N] for each positive column (-1: none).
  Under shard_map with out_specs P(axis) they read as the global batch's.
  """
  dist, pos, neg, _, _ = triplet_distances(z1, z2, labels, axis_name=axis_name,
                                           hidden_norm=hidden_norm)
  n = z1.shape[0]
  if mining == "batch_hard":
    pos_col, neg_col, valid = mine_batch_hard(dist, pos, neg)
    return (_per_image(jnp.where(valid, pos_col, -1), n),
            _per_image(jnp.where(valid, neg_col, -1), n))
  return _per_image(mine_semi_hard(dist, pos, neg)[0], n)


def triplet_with_metrics(z1, z2, labels=None, *, margin: float, mining: str,
                         axis_name=None, hidden_norm: bool = True):
  """Triplet loss max(0, d_ap - d_an + margin), d = squared Euclidean on the
  (L2-normalised, with hidden_norm) embeddings, mined over the global batch.

  mining='batch_hard': one triplet per anchor view (mine_batch_hard);
  'semi_hard': one per (anchor, positive) pair (mine_semi_hard). The loss is
  the mean over the mined triplets of the whole global batch; anchors with
  no negative (every view in the batch shares their label) have none.

  Returns:
    (loss, metrics): contrast_acc and contrast_top5_acc as nt_xent's (on
    cosine similarities; no temperature, so no entropy), and
    triplet_active_frac, the fraction of triplets with a non-zero hinge.
  """
  if mining not in MININGS:
    raise ValueError(f"mining={mining!r}; valid: {MININGS}")
  dist, pos, neg, image, num_images = triplet_distances(
      z1, z2, labels, axis_name=axis_name, hidden_norm=hidden_norm)
  if mining == "batch_hard":
    pos_col, neg_col, valid = mine_batch_hard(dist, pos, neg)
    d_ap = jnp.take_along_axis(dist, pos_col[:, None], axis=-1)[:, 0]
    d_an = jnp.take_along_axis(dist, neg_col[:, None], axis=-1)[:, 0]
  else:
    neg_col, valid = mine_semi_hard(dist, pos, neg)
    d_ap = dist
    d_an = jnp.take_along_axis(dist, jnp.maximum(neg_col, 0), axis=-1)
  hinge = jnp.where(valid, jnp.maximum(d_ap - d_an + margin, 0.0), 0.0)
  count = jnp.sum(valid).astype(jnp.float32)
  loss = common.global_mean(jnp.sum(hinge), count, axis_name)
  active = common.global_mean(jnp.sum((hinge > 0).astype(jnp.float32)), count,
                        axis_name)
  n = z1.shape[0]
  # Nearest view-2 column by distance == by cosine (unit vectors).
  metrics = common.contrast_metrics(-dist[:n, num_images:], image)
  del metrics["contrast_entropy"]
  metrics = common.pmean(metrics, axis_name)
  return loss, {**metrics, "triplet_active_frac": lax.stop_gradient(active)}
