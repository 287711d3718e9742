"""Supervised contrastive losses (Khosla et al. 2020; docs/losses.md): L_out,
the paper's, and the form with the positives' sum inside the log that
solo-learn trains its SupCon with."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclr.losses import common


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
  logp, pos, metrics = _log_probabilities(z1, z2, labels, temperature,
                                          axis_name, hidden_norm)
  num_pos = jnp.sum(pos, axis=-1).astype(jnp.float32)  # >= 1
  per_anchor = -jnp.sum(jnp.where(pos, logp, 0.0), axis=-1) / num_pos
  return common.pmean((jnp.mean(per_anchor), metrics), axis_name)


def supcon_in_with_metrics(z1, z2, labels=None, *, temperature: float,
                           axis_name=None, hidden_norm: bool = True):
  """Supervised contrastive loss with the positives summed inside the log,
  as solo-learn computes it (vturrisi/solo-learn solo/losses/simclr.py,
  `simclr_loss_func` with class indexes, which solo/methods/supcon.py
  trains with):

    l_i = -log( sum_{p in P(i)} exp(s_ip/tau) / sum_{a in A(i)} exp(s_ia/tau) )

  with A(i), P(i) as supcon_with_metrics's; mean over the 2N anchors. This
  is Khosla et al.'s L_in less log|P(i)| per anchor (solo-learn leaves out
  L_in's 1/|P(i)| inside the log): the same gradient as L_in, a value lower
  by the mean of log|P(i)|. With one label per image it equals L_out.

  Returns:
    (loss, metrics), metrics as supcon_with_metrics's.
  """
  logp, pos, metrics = _log_probabilities(z1, z2, labels, temperature,
                                          axis_name, hidden_norm)
  # log sum_p exp(s_ip/tau) - log sum_a exp(s_ia/tau), from the log-softmax
  # over A(i); masking the non-positives keeps it finite (P(i) is never empty).
  per_anchor = -jax.nn.logsumexp(
      jnp.where(pos, logp, -common.LARGE_NUM), axis=-1)
  return common.pmean((jnp.mean(per_anchor), metrics), axis_name)


def _log_probabilities(z1, z2, labels, temperature, axis_name, hidden_norm):
  """(log-softmax over A(i) [2n, 2N], positive mask [2n, 2N], metrics of
  this shard's rows) of the local anchors."""
  z1, z2 = common.embeddings(z1, z2, hidden_norm)
  anchors, cols, self_mask, pos, _, image, num_images = (
      common.anchors_and_columns(z1, z2, labels, axis_name))
  logits = common.matmul_t(anchors, cols) / temperature  # [2n, 2N]
  # Same self-masking as nt_xent: exp() of the masked logits is exactly 0.
  logp = jax.nn.log_softmax(
      logits - common.LARGE_NUM * self_mask.astype(jnp.float32), axis=-1)
  n = z1.shape[0]
  metrics = common.contrast_metrics(logits[:n, num_images:], image)
  return logp, pos, metrics
