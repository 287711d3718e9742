"""Weighted kNN equals a brute-force NumPy vote, on 1 device and sharded on 8."""

import jax
import numpy as np
import pytest

from jaxclr.evaluation import knn
from jaxclr.parallel import sharding


def numpy_knn_scores(queries, bank, labels, *, k, num_classes, temperature):
  """Independent reference: a loop over queries with a stable sort."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  scores = np.zeros((len(q), num_classes), np.float64)
  for i in range(len(q)):
    sims = b @ q[i]
    order = np.argsort(-sims, kind="stable")[:k]  # Ties: lower index first.
    for j in order:
      scores[i, labels[j]] += np.exp(sims[j] / temperature)
  return scores


def make_problem(rng, m=203, q=37, d=12, c=5):
  bank = rng.normal(size=(m, d)).astype(np.float32)
  labels = rng.integers(0, c, size=m).astype(np.int32)
  # Exact ties: duplicated bank rows with different labels, and a query equal
  # to a duplicated row, so which tied neighbours enter the top k matters.
  bank[50:60] = bank[40]
  labels[50:60] = (labels[40] + 1 + np.arange(10) % (c - 1)) % c
  queries = rng.normal(size=(q, d)).astype(np.float32)
  queries[0] = bank[40] * 3.0  # Scale must not matter (cosine).
  return queries, bank, labels


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("k", [1, 7, 200])
def test_knn_scores_match_numpy(num_devices, k):
  rng = np.random.default_rng(k)
  queries, bank, labels = make_problem(rng)
  c, tau = 5, 0.1
  mesh = sharding.make_mesh("explicit", jax.devices()[:num_devices])
  b, bl, bv = knn.shard_bank(mesh, bank, labels)
  assert b.shape[0] % num_devices == 0
  got = np.asarray(knn.knn_scores(queries, b, bl, bv, k=k, num_classes=c,
                                  temperature=tau, mesh=mesh))
  want = numpy_knn_scores(queries.astype(np.float64), bank.astype(np.float64),
                          labels, k=k, num_classes=c, temperature=tau)
  # exp(s/0.1) reaches e^10: compare relative to each row's total weight.
  np.testing.assert_allclose(got / want.sum(1, keepdims=True),
                             want / want.sum(1, keepdims=True), atol=2e-5)
  # The tie case: query 0 sees 11 identical neighbours at similarity 1; with
  # k=7 exactly the 7 lowest indices (40, 50, ..., 55) must vote.
  if k == 7:
    np.testing.assert_allclose(got[0].sum(), 7 * np.exp(1 / tau), rtol=1e-5)
    expected = np.bincount(labels[[40, 50, 51, 52, 53, 54, 55]], minlength=c)
    np.testing.assert_allclose(got[0] / np.exp(1 / tau), expected, rtol=1e-5)


@pytest.mark.slow
def test_knn_accuracy_layout_invariant_and_chunked():
  rng = np.random.default_rng(0)
  queries, bank, labels = make_problem(rng, m=300, q=130)
  qlabels = rng.integers(0, 5, size=len(queries))
  want = numpy_knn_scores(queries.astype(np.float64), bank.astype(np.float64),
                          labels, k=20, num_classes=5, temperature=0.1)
  preds = {}
  for n in (1, 8):
    mesh = sharding.make_mesh("explicit", jax.devices()[:n])
    preds[n] = knn.knn_predict(queries, bank, labels, num_classes=5, k=20,
                               mesh=mesh, query_chunk=64)
  np.testing.assert_array_equal(preds[1], preds[8])
  np.testing.assert_array_equal(preds[1], want.argmax(1))
  acc = knn.knn_accuracy(queries, qlabels, bank, labels, num_classes=5, k=20,
                         query_chunk=64)
  assert acc == pytest.approx(np.mean(want.argmax(1) == qlabels))
