"""Weighted k-nearest-neighbour classification with a device-sharded bank.

The rule of Wu et al. 2018 ("Unsupervised feature learning via
non-parametric instance discrimination", section 3.5), used by most
self-supervised papers as a cheap probe: features are L2-normalised, the k
training examples with the highest cosine similarity s_i vote for their class
with weight exp(s_i / tau), and the class with the largest total wins.
Defaults k=200, tau=0.1.

The feature BANK (the labelled training features) is split over the devices of
the mesh along its first axis; queries are replicated. Each device computes
the similarities of every query to its bank shard and keeps its own top k;
the per-device candidates (k per device) are all-gathered and merged with a
second top k. Nothing ever holds the full (queries x bank) similarity matrix
or the full bank, so the bank may exceed one device's memory.

Ties: `jax.lax.top_k` keeps the lower index first; shards are gathered in
device order, so the merged result equals a global top k over the whole bank
that breaks ties by the lower bank index (a stable sort).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxclr.parallel import sharding

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _local_top_k(queries, bank, bank_labels, bank_valid, *, k: int,
                 axis_name: str | None):
  """Top-k (similarity, label) of `queries` against this device's bank rows."""
  sims = queries @ bank.T  # [Q, M_local]
  sims = jnp.where(bank_valid[None, :], sims, -jnp.inf)
  kk = min(k, sims.shape[1])
  top_sims, top_idx = jax.lax.top_k(sims, kk)  # [Q, kk]
  top_labels = jnp.take(bank_labels, top_idx)  # [Q, kk]
  if axis_name is None:
    return top_sims, top_labels
  # [Q, n_dev * kk], device-major: preserves global index order on ties.
  all_sims = jax.lax.all_gather(top_sims, axis_name, axis=1, tiled=True)
  all_labels = jax.lax.all_gather(top_labels, axis_name, axis=1, tiled=True)
  kk = min(k, all_sims.shape[1])
  merged_sims, pos = jax.lax.top_k(all_sims, kk)
  return merged_sims, jnp.take_along_axis(all_labels, pos, axis=1)


def knn_votes(top_sims, top_labels, *, num_classes: int, temperature: float):
  """Class scores [Q, C] = sum over neighbours of exp(s/tau) * onehot(label).

  Neighbours with -inf similarity (padding) get weight 0.
  """
  weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature),
                      0.0)
  onehot = jax.nn.one_hot(top_labels, num_classes, dtype=jnp.float32)
  return jnp.einsum("qk,qkc->qc", weights, onehot)


@functools.partial(jax.jit, static_argnames=("k", "num_classes",
                                             "temperature", "mesh"))
def knn_scores(queries, bank, bank_labels, bank_valid, *, k: int,
               num_classes: int, temperature: float, mesh=None):
  """Weighted-kNN class scores [Q, C] (pure; jitted).

  Args:
    queries: [Q, D] features (any scale; normalised here), replicated.
    bank: [M, D] labelled features; with `mesh`, sharded P('data') on axis 0
      (M divisible by the mesh size: pad and mark padding in bank_valid).
    bank_labels: int32 [M]; bank_valid: bool [M] (False = padding row).
    mesh: a 1-D 'data' mesh, or None for a single-device computation.
  """
  queries = l2_normalize(queries)
  bank = l2_normalize(bank)
  if mesh is None:
    top = _local_top_k(queries, bank, bank_labels, bank_valid, k=k,
                       axis_name=None)
  else:
    axis = mesh.axis_names[0]
    fn = functools.partial(_local_top_k, k=k, axis_name=axis)
    top = jax.shard_map(fn, mesh=mesh,
                        in_specs=(P(), P(axis), P(axis), P(axis)),
                        out_specs=(P(), P()), check_vma=False)(
                            queries, bank, bank_labels, bank_valid)
  return knn_votes(*top, num_classes=num_classes, temperature=temperature)


def shard_bank(mesh, bank: np.ndarray, labels: np.ndarray):
  """Pads the bank to a multiple of the mesh size and places it P('data').

  Returns (bank, labels, valid) as global arrays. Host numpy in: every
  process holds the whole bank (and places only its own devices' rows).
  """
  n = mesh.devices.size
  m = bank.shape[0]
  pad = (-m) % n
  valid = np.concatenate([np.ones(m, bool), np.zeros(pad, bool)])
  bank = np.concatenate([np.asarray(bank, np.float32),
                         np.zeros((pad, bank.shape[1]), np.float32)])
  labels = np.concatenate([np.asarray(labels, np.int32),
                           np.zeros(pad, np.int32)])
  put = lambda x: sharding.from_host(mesh, x, P(mesh.axis_names[0]))
  return put(bank), put(labels), put(valid)


def knn_predict(queries: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray,
                *, num_classes: int, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, mesh=None,
                query_chunk: int = 1024) -> np.ndarray:
  """Predicted labels int [Q] for host features; queries go in chunks."""
  if mesh is None:
    b, bl = jnp.asarray(bank, jnp.float32), jnp.asarray(bank_labels, jnp.int32)
    bv = jnp.ones(bank.shape[0], bool)
  else:
    b, bl, bv = shard_bank(mesh, bank, bank_labels)
  preds = []
  for start in range(0, queries.shape[0], query_chunk):
    q = np.asarray(queries[start:start + query_chunk], np.float32)
    real = q.shape[0]
    if real < query_chunk and queries.shape[0] > query_chunk:
      q = np.concatenate([q, np.zeros((query_chunk - real, q.shape[1]),
                                      np.float32)])  # One compiled shape.
    q = jnp.asarray(q) if mesh is None else sharding.from_host(mesh, q, P())
    scores = knn_scores(q, b, bl, bv, k=k,
                        num_classes=num_classes, temperature=temperature,
                        mesh=mesh)
    preds.append(np.asarray(jax.device_get(jnp.argmax(scores, axis=-1)))[:real])
  return np.concatenate(preds)


def knn_accuracy(queries, query_labels, bank, bank_labels, **kwargs) -> float:
  preds = knn_predict(queries, bank, bank_labels, **kwargs)
  return float(np.mean(preds == np.asarray(query_labels)))
