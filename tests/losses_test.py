"""NT-Xent against an independent NumPy formula, global and sharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxclr import losses
from jaxclr.parallel import sharding


def reference_nt_xent(z1, z2, tau):
  """SimCLR's loss written out anchor by anchor in float64.

  For each anchor (view-1 row i, then view-2 row i): -log of the softmax
  probability of its positive among the other 2N - 1 embeddings. The
  official scale is mean over view-1 anchors + mean over view-2 anchors.
  """
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(z1)
  allz = np.concatenate([z1, z2]).astype(np.float64)
  per_anchor = []
  for k in range(2 * n):
    positive = (k + n) % (2 * n)
    sims = allz @ allz[k] / tau
    others = [j for j in range(2 * n) if j != k]
    log_denominator = np.log(np.sum(np.exp(sims[others])))
    per_anchor.append(log_denominator - sims[positive])
  per_anchor = np.array(per_anchor)
  return per_anchor[:n].mean() + per_anchor[n:].mean()


def reference_metrics(z1, z2, tau):
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  logits = (z1 @ z2.T / tau).astype(np.float64)
  n = len(z1)
  acc = np.mean(np.argmax(logits, 1) == np.arange(n))
  top5 = np.mean([i in np.argsort(-logits[i])[:5] for i in range(n)])
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  entropy = np.mean(-np.sum(p * np.log(p + 1e-8), axis=1))
  return acc, top5, entropy


def random_embeddings(n=32, d=16, seed=0, correlated=True):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  z2 = rng.normal(size=(n, d)).astype(np.float32)
  if correlated:  # Positives closer than negatives, so accuracy is not 0.
    z2 = z1 + 1.5 * z2
  return z1, z2


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_global_loss_matches_reference(tau):
  z1, z2 = random_embeddings()
  loss = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=tau)
  np.testing.assert_allclose(loss, reference_nt_xent(z1, z2, tau), rtol=2e-6)


def test_metrics_match_reference():
  z1, z2 = random_embeddings()
  _, m = losses.nt_xent_with_metrics(jnp.asarray(z1), jnp.asarray(z2),
                                     temperature=0.1)
  acc, top5, entropy = reference_metrics(z1, z2, 0.1)
  assert 0.0 < acc < 1.0  # Non-trivial case.
  np.testing.assert_allclose(m["contrast_acc"], acc, atol=1e-7)
  np.testing.assert_allclose(m["contrast_top5_acc"], top5, atol=1e-7)
  np.testing.assert_allclose(m["contrast_entropy"], entropy, rtol=1e-5)


@pytest.mark.slow
def test_loss_is_twice_the_paper_scale_on_orthogonal_embeddings():
  # With z1 == z2 one-hot and orthogonal across images, every anchor's
  # positive has similarity 1/tau and its 2N-2 negatives 0.
  n, tau = 8, 0.5
  z = np.eye(n, dtype=np.float32)
  expected_per_anchor = np.log(np.exp(1 / tau) + 2 * n - 2) - 1 / tau
  loss = losses.nt_xent(jnp.asarray(z), jnp.asarray(z), temperature=tau)
  np.testing.assert_allclose(loss, 2 * expected_per_anchor, rtol=1e-6)


def sharded_nt_xent(z1, z2, *, mesh, temperature):
  """The registry's sharded NT-Xent of two [n, d] view arrays."""
  return losses.sharded("nt_xent", (z1, z2), mesh=mesh,
                        options={"temperature": temperature,
                                 "hidden_norm": True})


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharded_loss_and_gradient_equal_global(axis_type):
  mesh = sharding.make_mesh(axis_type)
  assert mesh.devices.size == 8
  z1, z2 = random_embeddings(n=32)
  tau = 0.2

  def global_loss(a, b):
    return losses.nt_xent(a, b, temperature=tau)

  def sharded_loss(a, b):
    return sharded_nt_xent(a, b, mesh=mesh, temperature=tau)[0]

  batch = sharding.batch_sharded(mesh)
  a = jax.device_put(z1, batch)
  b = jax.device_put(z2, batch)
  loss_s, (g1_s, g2_s) = jax.jit(jax.value_and_grad(sharded_loss, (0, 1)))(a, b)
  loss_g, (g1_g, g2_g) = jax.value_and_grad(global_loss, (0, 1))(
      jnp.asarray(z1), jnp.asarray(z2))
  np.testing.assert_allclose(loss_s, reference_nt_xent(z1, z2, tau), rtol=2e-6)
  np.testing.assert_allclose(loss_s, loss_g, rtol=1e-6)
  # No double averaging: the sharded gradient is the global one, not 8x it.
  np.testing.assert_allclose(g1_s, g1_g, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g2_s, g2_g, rtol=1e-5, atol=1e-7)


def test_sharded_metrics_equal_global():
  mesh = sharding.make_mesh("explicit")
  z1, z2 = random_embeddings(n=32, seed=3)
  batch = sharding.batch_sharded(mesh)
  _, m_s = jax.jit(functools.partial(
      sharded_nt_xent, mesh=mesh, temperature=0.1))(
          jax.device_put(z1, batch), jax.device_put(z2, batch))
  acc, top5, entropy = reference_metrics(z1, z2, 0.1)
  np.testing.assert_allclose(m_s["contrast_acc"], acc, atol=1e-6)
  np.testing.assert_allclose(m_s["contrast_top5_acc"], top5, atol=1e-6)
  np.testing.assert_allclose(m_s["contrast_entropy"], entropy, rtol=1e-5)


def test_shard_map_with_axis_name_uses_global_negatives():
  # Inside shard_map, each shard's loss must be the global loss: if only
  # local negatives were used it would be much lower than the reference.
  mesh = sharding.make_mesh("auto")
  z1, z2 = random_embeddings(n=16, seed=5)
  fn = jax.shard_map(
      functools.partial(losses.nt_xent, temperature=0.1, axis_name="data"),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  np.testing.assert_allclose(jax.jit(fn)(z1, z2),
                             reference_nt_xent(z1, z2, 0.1), rtol=2e-6)


def test_hidden_norm_off_uses_raw_dot_products():
  z1, z2 = random_embeddings(n=8, d=4)
  z1 *= 0.1
  z2 *= 0.1
  unnormed = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=1.0,
                            hidden_norm=False)
  # The same formula on raw (unnormalised) dot products, written directly.
  allz = np.concatenate([z1, z2]).astype(np.float64)
  n = len(z1)
  sims = allz @ allz.T
  np.fill_diagonal(sims, -np.inf)
  logp = sims - np.log(np.exp(sims).sum(1, keepdims=True))
  pos = np.concatenate([np.arange(n) + n, np.arange(n)])
  per_anchor = -logp[np.arange(2 * n), pos]
  np.testing.assert_allclose(unnormed,
                             per_anchor[:n].mean() + per_anchor[n:].mean(),
                             rtol=1e-5)
