"""The matmul weight gradient equals XLA's convolution gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr.models import conv
from jaxclr.parallel import sharding


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 2), (7, 2)])
def test_matmul_weight_grad_equals_xla(k, stride):
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.normal(size=(4, 11, 9, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
  pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)

  def loss(x, w, matmul):
    y = conv.conv2d(x, w, stride, (pad, pad), matmul_weight_grad=matmul)
    return jnp.sum(jnp.sin(y))  # A non-trivial cotangent.

  want = jax.grad(functools.partial(loss, matmul=False), (0, 1))(x, w)
  got = jax.grad(functools.partial(loss, matmul=True), (0, 1))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(
      conv.conv2d(x, w, stride, (pad, pad), matmul_weight_grad=True),
      conv.conv2d(x, w, stride, (pad, pad), matmul_weight_grad=False))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_matmul_weight_grad_on_a_batch_sharded_mesh(axis_type):
  mesh = sharding.make_mesh(axis_type)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)

  def wgrad(x, w, matmul):
    return jax.grad(lambda w: jnp.sum(conv.conv2d(
        x, w, 2, ((1, 1), (1, 1)), matmul_weight_grad=matmul) ** 2))(w)

  xs = jax.device_put(x, sharding.batch_sharded(mesh))
  ws = jax.device_put(w, sharding.replicated(mesh))
  got = jax.jit(functools.partial(wgrad, matmul=True))(xs, ws)
  want = wgrad(jnp.asarray(x), jnp.asarray(w), matmul=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
