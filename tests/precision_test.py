"""The mixed-precision policy's pieces (jaxclr/models/precision.py): the
float32 kernel gradients against float64 formulas, the dtypes each part
of the model leaves in, and the compiler option that keeps the casts."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conv_test
from jaxclr import config as config_lib
from jaxclr.models import conv, precision, resnet
from jaxclr.models.simclr import build_model

BF16 = jnp.bfloat16
OPTIONS = precision.compiler_options("bfloat16")
IMAGENET_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs",
                               "imagenet.py")


def as_bf16(x):
  """float32 values rounded to bfloat16 (exact in float32 again)."""
  return np.asarray(jnp.asarray(x, jnp.float32).astype(BF16).astype(
      jnp.float32))


@pytest.mark.slow
@pytest.mark.parametrize("k,stride,size,cin,cout", [
    (3, 1, 8, 5, 7), (3, 2, 9, 4, 6), (1, 1, 6, 8, 3), (1, 2, 7, 3, 5),
    (7, 2, 11, 3, 4), (3, 2, 8, 3, 2)])
def test_conv_kernel_grad_equals_the_float64_formula(k, stride, size, cin,
                                                     cout):
  rng = np.random.default_rng(10 * k + stride)
  x = rng.standard_normal((3, size, size, cin)).astype(np.float32)
  w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  pad = conv_test.centred_padding(k)
  dy = rng.standard_normal(
      conv.conv2d(x, w, stride, pad).shape).astype(np.float32)
  got = jax.jit(precision.conv_kernel_grad, static_argnums=(2, 3, 4))(
      x, dy, w.shape, stride, pad)
  want = conv_test.numpy_conv_and_grads(x, w, dy, stride, pad)[2]
  assert got.dtype == jnp.float32 and got.shape == w.shape
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=2e-6 * np.abs(want).max())


def conv_grads(x, w, dy, stride, pad, dtype, kernel_grad_f32: bool):
  """(y, dx, dw) of sum(conv(x, w) * dy) with w float32 cast to dtype:
  precision.conv, or (kernel_grad_f32=False) the cast written inline, as
  before the policy (JAX's bfloat16 kernel gradient)."""
  def f(x, w):
    if kernel_grad_f32:
      y = precision.conv(conv.conv2d, x, w, stride, pad, dtype)
    else:
      y = conv.conv2d(x.astype(dtype), w.astype(dtype), stride, pad)
    return jnp.sum(y.astype(jnp.float32) * dy), y
  # The policy's compiler options: XLA keeps the casts as written.
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True),
                             compiler_options=OPTIONS)(x, w)
  return y, dx, dw


@pytest.mark.slow
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 2), (7, 2)])
def test_bfloat16_conv_has_a_float32_kernel_gradient(k, stride):
  """bfloat16 operands, bfloat16 output and input gradient (bitwise what
  XLA's bfloat16 convolution gives), and a kernel gradient in float32 that
  equals the float64 sum over the bfloat16 operands to float32 round-off;
  JAX's own (bfloat16) kernel gradient misses it by a bfloat16 rounding,
  which the tolerance catches (negative control)."""
  rng = np.random.default_rng(k + stride)
  # The activations arrive in bfloat16 (the previous layer's output).
  x = jnp.asarray(rng.standard_normal((4, 9, 9, 6)), BF16)
  w = rng.standard_normal((k, k, 6, 5)).astype(np.float32)
  pad = conv_test.centred_padding(k)
  out_shape = conv.conv2d(x, w.astype(BF16), stride, pad).shape
  dy = as_bf16(rng.standard_normal(out_shape))
  y, dx, dw = conv_grads(x, w, dy, stride, pad, BF16, True)
  y0, dx0, dw0 = conv_grads(x, w, dy, stride, pad, BF16, False)
  assert y.dtype == dx.dtype == BF16 and dw.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y0, np.float32))
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(dx0, np.float32))
  want = conv_test.numpy_conv_and_grads(np.asarray(x, np.float32),
                                        as_bf16(w), dy, stride, pad)[2]
  atol = 2e-6 * np.abs(want).max()
  np.testing.assert_allclose(dw, want, rtol=0, atol=atol)
  assert np.abs(np.asarray(dw0, np.float32) - want).max() > 10 * atol


def test_float32_conv_is_conv_fn_itself():
  """float32: the injected convolution with its own gradients (the CPU
  paths' are theirs), no custom rule."""
  calls = []

  def conv_fn(x, w, strides, padding):
    calls.append(x.dtype)
    return conv.conv2d(x, w, strides, padding)

  x = np.ones((2, 5, 5, 3), np.float32)
  w = np.ones((3, 3, 3, 4), np.float32)
  pad = conv_test.centred_padding(3)
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(precision.conv(
      conv_fn, x, w, 1, pad, jnp.float32)), 0))(w)
  assert "custom_vjp" not in str(jaxpr)
  assert calls == [jnp.float32]


def test_bfloat16_matmul_has_a_float32_kernel_gradient():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 12)), BF16)
  w = rng.standard_normal((12, 5)).astype(np.float32)
  dy = as_bf16(rng.standard_normal((16, 5)))

  def grads(fn):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(
        fn(x, w).astype(jnp.float32) * dy), (0, 1)),
                   compiler_options=OPTIONS)(x, w)

  dx, dw = grads(lambda x, w: precision.matmul(x, w, BF16))
  dx0, dw0 = grads(lambda x, w: x.astype(BF16) @ w.astype(BF16))
  assert dx.dtype == BF16 and dw.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(dx0, np.float32))
  want = np.asarray(x, np.float64).T @ dy.astype(np.float64)
  atol = 2e-6 * np.abs(want).max()
  np.testing.assert_allclose(dw, want, rtol=0, atol=atol)
  assert np.abs(np.asarray(dw0, np.float32) - want).max() > 10 * atol


def test_dense_has_flax_dense_variables_and_values():
  """precision.Dense is nn.Dense in float32: the same variables (names,
  shapes, initial values) and outputs, so checkpoints and the official
  checkpoint converter see no change."""
  x = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
  ours = precision.Dense(3, kernel_init=nn.initializers.normal(0.01))
  theirs = nn.Dense(3, kernel_init=nn.initializers.normal(0.01))
  v = ours.init(jax.random.key(0), x)
  v_flax = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, v) == jax.tree.map(np.shape, v_flax)
  jax.tree.map(np.testing.assert_array_equal, v, v_flax)
  np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x),
                             rtol=1e-6)


def test_pointwise_conv_has_nn_conv_variables():
  x = np.ones((2, 1, 1, 6), np.float32)
  ours = resnet.PointwiseConv(4)
  theirs = nn.Conv(4, (1, 1), kernel_init=resnet.conv_kernel_init)
  v, v_flax = ours.init(jax.random.key(0), x), theirs.init(
      jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, v, v_flax)
  np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x),
                             rtol=1e-6)


def tiny_model(dtype: str):
  config = config_lib.load_config_file(IMAGENET_CONFIG, "tiny")
  config.model.compute_dtype = dtype
  config.model.se_ratio = 0.25
  return build_model(config, num_classes=4)


@pytest.mark.slow
def test_bfloat16_model_outputs_and_variables():
  """bfloat16 compute: the same float32 variables as float32 compute; h, z
  and the probe's logits leave in float32; every gradient is float32."""
  images = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
  models = {d: tiny_model(d) for d in ("float32", "bfloat16")}
  variables = models["float32"].init(jax.random.key(0), images, train=True)
  v16 = models["bfloat16"].init(jax.random.key(0), images, train=True)
  jax.tree.map(np.testing.assert_array_equal, variables, v16)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype("float32")}

  def loss(params, model):
    out, _ = model.apply({**variables, "params": params}, images,
                         train=True, mutable=["batch_stats"])
    return jnp.sum(out["z"]) + jnp.sum(out["logits"]), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                            static_argnums=1)(variables["params"],
                                              models["bfloat16"])
  for name in ("h", "z", "logits"):
    assert out[name].dtype == jnp.float32, name
  assert out["proj"][0].dtype == BF16  # A hidden head layer: compute dtype.
  assert {g.dtype for g in jax.tree.leaves(grads)} == {np.dtype("float32")}


def test_compiler_options():
  assert precision.compiler_options("float32") == {}
  assert precision.compiler_options(jnp.float32) == {}
  assert precision.compiler_options("bfloat16") == {
      "xla_allow_excess_precision": False}
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    precision.compiler_options("float16")


def test_compiler_options_keep_the_bfloat16_rounding():
  """A bfloat16 convolution's output read back as float32 must be a
  bfloat16 value. With the option it is; without it XLA:CPU (which
  computes bfloat16 convolutions in float32) drops the rounding in a
  one-device program, which made the one-device step differ from the
  SPMD one (negative control)."""
  rng = np.random.default_rng(0)
  x = rng.random((8, 12, 12, 8), np.float32)
  w = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)
  pad = conv_test.centred_padding(3)

  def f(x, w):
    return conv.conv2d(x.astype(BF16), w.astype(BF16), 1,
                       pad).astype(jnp.float32) * 1.5

  def is_bf16_times_1_5(y):
    y = np.asarray(y) / 1.5
    return np.array_equal(as_bf16(y), y)

  kept = jax.jit(f, compiler_options=OPTIONS)
  assert is_bf16_times_1_5(kept(x, w))
  if jax.default_backend() == "cpu":
    assert not is_bf16_times_1_5(jax.jit(f)(x, w))
