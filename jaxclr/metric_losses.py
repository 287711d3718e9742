"""SupCon, triplet (batch-hard, semi-hard), N-pair and InfoNCE (docs/losses.md).

Each loss takes the two views' projections z1, z2 [n, d] and optional labels
[n], like losses.nt_xent_with_metrics: with axis_name=None they are the
global batch; inside shard_map with axis_name set they are this shard's rows,
the columns (and labels) are all-gathered over axis_name, gradients flow back
through the gather, and the result is the global loss on every shard.

Rows are anchors, columns candidates. Columns are ordered view-1 of images
0..N-1, then view-2 of images 0..N-1: view v of global image j is column
v * N + j. Anchors are this shard's view-1 rows, then its view-2 rows.

Labels: None, or every label -1, means instance discrimination (the two views
of an image are its only positives). With class labels, views of images of
the same class are positives; an image labelled -1 (unlabelled) is a class of
its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr import losses

MININGS = ("batch_hard", "semi_hard")


def _embeddings(z1, z2, hidden_norm):
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  if hidden_norm:
    z1, z2 = losses.l2_normalize(z1), losses.l2_normalize(z2)
  return z1, z2


def _class_keys(labels, image):
  """Positive-pair key of each image: its label, or a unique negative key."""
  if labels is None:
    return image
  return jnp.where(labels >= 0, labels.astype(jnp.int32), -1 - image)


def _anchors_and_columns(z1, z2, labels, axis_name):
  """Local anchors against the gathered global views.

  Returns:
    anchors [2n, d]; cols [2N, d]; self_mask [2n, 2N] (1 at each anchor's own
    column); pos_mask [2n, 2N] (same key, not itself); neg_mask (other key);
    image [n] (global index of the local rows); N.
  """
  n = z1.shape[0]
  cols1, offset = losses.gather_rows(z1, axis_name)  # [N, d]
  cols2, _ = losses.gather_rows(z2, axis_name)
  num_images = cols1.shape[0]
  image = jnp.arange(n) + offset  # [n]
  all_images = jnp.arange(num_images)
  all_labels = (None if labels is None
                else losses.gather_rows(labels, axis_name)[0])
  key = _class_keys(labels, image)  # [n]
  col_key = _class_keys(all_labels, all_images)  # [N]
  anchor_key = jnp.concatenate([key, key])
  col_key = jnp.concatenate([col_key, col_key])
  self_col = jnp.concatenate([image, image + num_images])  # [2n]
  self_mask = jax.nn.one_hot(self_col, 2 * num_images, dtype=jnp.bool_)
  same = anchor_key[:, None] == col_key[None, :]  # [2n, 2N]
  return (jnp.concatenate([z1, z2]), jnp.concatenate([cols1, cols2]),
          self_mask, same & ~self_mask, ~same, image, num_images)


def _global_mean(total, count, axis_name):
  """sum / count over every shard (counts may differ between shards)."""
  if axis_name is not None:
    total, count = lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0)


def _pmean(tree, axis_name):
  return tree if axis_name is None else lax.pmean(tree, axis_name)


def supcon_with_metrics(z1, z2, labels=None, *, temperature: float,
                        axis_name=None, hidden_norm: bool = True):
  """Supervised contrastive loss L_out (Khosla et al. 2020, L_out).

  For each of the 2N views i (anchor), with A(i) every other view of the
  global batch and P(i) those with the same label (always including i's own
  other view):  l_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip/tau) /
  sum_{a in A(i)} exp(s_ia/tau)),  s = cosine similarity (hidden_norm).
  The loss is the mean of l_i over all 2N anchors. With one label per image
  (labels=None) P(i) is i's other view alone, so the loss is NT-Xent's
  per-anchor mean: supcon == losses.nt_xent / 2 (nt_xent sums the view-1
  and view-2 means).

  Returns:
    (loss, metrics): metrics as nt_xent's (view-1 anchors against the view-2
    columns, positive = the same image's other view).
  """
  z1, z2 = _embeddings(z1, z2, hidden_norm)
  anchors, cols, self_mask, pos, _, image, num_images = (
      _anchors_and_columns(z1, z2, labels, axis_name))
  logits = losses.matmul_t(anchors, cols) / temperature  # [2n, 2N]
  # Same self-masking as nt_xent: exp() of the masked logits is exactly 0.
  logp = jax.nn.log_softmax(
      logits - losses.LARGE_NUM * self_mask.astype(jnp.float32), axis=-1)
  num_pos = jnp.sum(pos, axis=-1).astype(jnp.float32)  # >= 1
  per_anchor = -jnp.sum(jnp.where(pos, logp, 0.0), axis=-1) / num_pos
  n = z1.shape[0]
  metrics = losses.contrast_metrics(logits[:n, num_images:], image)
  return _pmean((jnp.mean(per_anchor), metrics), axis_name)


def triplet_distances(z1, z2, labels=None, *, axis_name=None,
                      hidden_norm: bool = True):
  """Squared Euclidean distances of the local anchors to every global view.

  Returns (dist [2n, 2N], pos_mask, neg_mask, image [n], N); see the module
  docstring for the row and column order. On unit vectors dist = 2 - 2 cos,
  in [0, 4].
  """
  z1, z2 = _embeddings(z1, z2, hidden_norm)
  anchors, cols, _, pos, neg, image, num_images = _anchors_and_columns(
      z1, z2, labels, axis_name)
  sq_a = jnp.sum(jnp.square(anchors), axis=-1)
  sq_c = jnp.sum(jnp.square(cols), axis=-1)
  dist = sq_a[:, None] + sq_c[None, :] - 2.0 * losses.matmul_t(anchors, cols)
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
  loss = _global_mean(jnp.sum(hinge), count, axis_name)
  active = _global_mean(jnp.sum((hinge > 0).astype(jnp.float32)), count,
                        axis_name)
  n = z1.shape[0]
  # Nearest view-2 column by distance == by cosine (unit vectors).
  metrics = losses.contrast_metrics(-dist[:n, num_images:], image)
  del metrics["contrast_entropy"]
  metrics = _pmean(metrics, axis_name)
  return loss, {**metrics, "triplet_active_frac": lax.stop_gradient(active)}


def _one_directional(z1, z2, extra_cols, *, temperature, axis_name):
  """Cross-entropy of view-1 anchors against the view-2 columns (+ extra
  columns), positive = the same image's view-2; mean over global anchors."""
  cols2, offset = losses.gather_rows(z2, axis_name)  # [N, d]
  num_images = cols2.shape[0]
  image = jnp.arange(z1.shape[0]) + offset
  logits = losses.matmul_t(z1, cols2) / temperature  # [n, N]
  all_logits = logits
  if extra_cols is not None:
    all_logits = jnp.concatenate([logits, extra_cols], axis=1)
  logp = jax.nn.log_softmax(all_logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, image[:, None], axis=-1))
  metrics = losses.contrast_metrics(logits[:, :num_images], image)
  return _pmean((loss, metrics), axis_name)


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
  z1, z2 = _embeddings(z1, z2, hidden_norm)
  loss, metrics = _one_directional(z1, z2, None, temperature=1.0,
                                   axis_name=axis_name)
  if l2_reg:
    loss = loss + l2_reg * _pmean(jnp.mean(raw_sq), axis_name)
  return loss, metrics


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
  z1, z2 = _embeddings(z1, z2, hidden_norm)
  extra = None
  if queue is not None and queue.shape[0]:
    queue = lax.stop_gradient(queue.astype(jnp.float32))
    filled = jnp.sum(jnp.square(queue), axis=-1) > 0  # [K]
    if hidden_norm:
      queue = losses.l2_normalize(queue)
    extra = (losses.matmul_t(z1, queue) / temperature -
             losses.LARGE_NUM * (~filled).astype(jnp.float32)[None, :])
  return _one_directional(z1, z2, extra, temperature=temperature,
                          axis_name=axis_name)


def update_queue(queue, new_keys):
  """FIFO: the queue [K, d] (oldest row first) with the global batch's
  new_keys [B, d] appended in order and the oldest rows dropped."""
  size = queue.shape[0]
  if size == 0:
    return queue
  keys = lax.stop_gradient(new_keys).astype(queue.dtype)
  return jnp.concatenate([queue, keys], axis=0)[-size:]
