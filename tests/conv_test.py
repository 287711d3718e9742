"""The patch-matmul kernel gradient (jaxclr/cpu/patch_conv.py) against an
independent float64 formula, XLA's own gradient, and across device layouts.
The formula and the ResNet gradient comparison also serve
onednn_conv_test.py."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools

from jaxclr import config as config_lib, cpu
from jaxclr.config import schema as config_schema
from jaxclr.cpu import patch_conv
from jaxclr.models import conv
from jaxclr.models.simclr import build_encoder
from jaxclr.training import workdir


def centred_padding(k):
  return (((k - 1) // 2, k - 1 - (k - 1) // 2),) * 2


def _taps(kernel_shape, out_hw):
  kh, kw = kernel_shape[:2]
  return itertools.product(range(kh), range(kw), range(out_hw[0]),
                           range(out_hw[1]))


def numpy_conv_and_grads(x, w, dy, stride, padding):
  """y, dL/dx, dL/dw of L = sum(conv(x, w) * dy), in float64, one tap and
  one output position at a time."""
  x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
  xp = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  _, ho, wo, _ = dy.shape
  y = np.zeros(dy.shape)
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  for i, j, r, c in _taps(w.shape, (ho, wo)):
    window = xp[:, r * stride + i, c * stride + j, :]
    y[:, r, c] += window @ w[i, j]
    dxp[:, r * stride + i, c * stride + j] += dy[:, r, c] @ w[i, j].T
    dw[i, j] += window.T @ dy[:, r, c]
  (top, _), (left, _) = padding
  dx = dxp[:, top:top + x.shape[1], left:left + x.shape[2]]
  return y, dx, dw


@pytest.mark.parametrize("k,stride,size,cin,cout", [
    (3, 1, 8, 5, 7), (3, 2, 9, 4, 6), (1, 1, 6, 8, 3), (1, 2, 7, 3, 5),
    (7, 2, 11, 3, 4), (2, 1, 5, 2, 3)])
def test_kernel_grad_equals_the_formula_and_xla(k, stride, size, cin, cout):
  rng = np.random.default_rng(k * 100 + stride * 10 + size)
  x = rng.standard_normal((3, size, size, cin)).astype(np.float32)
  w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  pad = centred_padding(k)

  def loss(x, w, kernel_grad, dy):
    return jnp.sum(cpu.conv2d(x, w, stride, pad, library="xla",
                              kernel_grad=kernel_grad)
                   * dy)

  y = cpu.conv2d(x, w, stride, pad, library="xla", kernel_grad="xla")
  dy = rng.standard_normal(y.shape).astype(np.float32)
  np.testing.assert_array_equal(
      cpu.conv2d(x, w, stride, pad, library="xla", kernel_grad="patches"), y)
  gx_p, gw_p = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(
      x, w, "patches", dy)
  gx_x, gw_x = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(
      x, w, "xla", dy)
  expected = numpy_conv_and_grads(x, w, dy, stride, pad)[2]
  scale = np.abs(expected).max()
  np.testing.assert_allclose(gw_p, expected, rtol=0, atol=2e-6 * scale)
  np.testing.assert_allclose(gw_x, expected, rtol=0, atol=2e-6 * scale)
  # The input gradient is XLA's in both forms.
  np.testing.assert_array_equal(gx_p, gx_x)


@pytest.mark.slow
def test_kernel_grad_keeps_the_kernel_dtype_and_sums_in_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 6, 6, 3)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((4, 6, 6, 2)), jnp.bfloat16)
  pad = centred_padding(3)
  dw = patch_conv.kernel_grad_from_patches(x, dy, w.shape, 1, pad)
  assert dw.dtype == jnp.float32
  expected = numpy_conv_and_grads(np.asarray(x, np.float32),
                                  np.asarray(w, np.float32),
                                  np.asarray(dy, np.float32), 1, pad)[2]
  np.testing.assert_allclose(dw, expected, rtol=0,
                             atol=1e-5 * np.abs(expected).max())
  gw = jax.grad(lambda w_: jnp.sum(cpu.conv2d(
      x, w_, 1, pad, library="xla",
      kernel_grad="patches").astype(jnp.float32)))(w)
  assert gw.dtype == jnp.bfloat16


def test_auto_is_patches_on_a_one_device_cpu_job_only():
  resolve = cpu.resolve_kernel_grad
  assert resolve("auto", backend="cpu", num_devices=1) == "patches"
  assert cpu.resolve_kernel_grad("auto", backend="cpu", num_devices=8) == "xla"
  assert cpu.resolve_kernel_grad("auto", backend="gpu", num_devices=1) == "xla"
  assert cpu.resolve_kernel_grad("auto", backend="tpu", num_devices=1) == "xla"
  assert cpu.resolve_kernel_grad("xla", backend="cpu", num_devices=1) == "xla"
  assert resolve("patches", backend="gpu", num_devices=1) == "patches"
  with pytest.raises(config_lib.ConfigError,
                     match="'im2col'; valid: auto, xla, patches"):
    cpu.resolve_kernel_grad("im2col", backend="cpu", num_devices=1)
  # Its per-tap all-reduces inside a loop can deadlock XLA:CPU's devices.
  with pytest.raises(config_lib.ConfigError,
                     match="'patches' runs on one device.*has 8"):
    cpu.resolve_kernel_grad("patches", backend="cpu", num_devices=8)
  assert cpu.KERNEL_GRADS == config_schema.CONV_KERNEL_GRADS
  # This test process has 8 (simulated) devices: 'auto' builds XLA's form.
  assert cpu.job_convolution(config_lib.pretrain_config().model) is None
  assert build_encoder(config_lib.pretrain_config().model,
                       image_size=32).conv is conv.conv2d


def test_config_refuses_an_unknown_kernel_grad():
  config = config_lib.pretrain_config()
  config.dataset = "synthetic"
  config.model.conv_kernel_grad = "fast"
  with pytest.raises(config_lib.ConfigError,
                     match="model.conv_kernel_grad='fast'; valid: auto"):
    config_lib.validate(config, job="pretrain")


def resnet_grads_and_outputs(depth, sk_ratio, library="xla",
                             kernel_grad="xla"):
  """The gradient of sum(tanh(features)) w.r.t. the parameters, and the
  features, of a 1/8-width ResNet on 4 fixed images, its convolutions on
  the CPU paths given (jaxclr/cpu: conv2d), whatever `auto` would resolve
  in this 8-device process: the encoder runs on one device here."""
  model_config = config_lib.pretrain_config().model
  model_config.update(depth=depth, width_multiplier=0.125, sk_ratio=sk_ratio)
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(4, 32, 32, 3)),
                  jnp.float32)
  encoder = build_encoder(
      model_config, image_size=32 if depth == 18 else 64,
      conv=functools.partial(cpu.conv2d, library=library,
                             kernel_grad=kernel_grad))
  variables = encoder.init(jax.random.key(0), x, train=True)

  def loss(params):
    h, _ = encoder.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(h)), h

  return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


def assert_grads_close(got, want, rel):
  """Each leaf of got within rel x (its max |want|) of want."""
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  flat_got = jax.tree.leaves(got)
  assert len(flat_want) == len(flat_got)
  for (path, w), g in zip(flat_want, flat_got):
    scale = max(float(np.abs(w).max()), 1e-12)
    np.testing.assert_allclose(g, w, rtol=0, atol=rel * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("depth,sk_ratio", [(18, 0.0), (50, 0.0625)])
def test_resnet_gradients_agree_between_the_two_forms(depth, sk_ratio):
  """Same variables, same forward, gradients equal to float32 round-off,
  for every conv kind the ResNets have (stems, strided, 1x1, SK)."""
  grads_x, out_x = resnet_grads_and_outputs(depth, sk_ratio,
                                            kernel_grad="xla")
  grads_p, out_p = resnet_grads_and_outputs(depth, sk_ratio,
                                            kernel_grad="patches")
  np.testing.assert_array_equal(out_x, out_p)
  assert_grads_close(grads_p, grads_x, 1e-5)


def test_a_run_may_resume_with_the_kernel_grad_or_remat_flipped():
  """Neither changes what the finished steps computed beyond round-off;
  an architecture field still refuses the resume."""
  old = workdir.config_to_dict(config_lib.pretrain_config())
  new = config_lib.pretrain_config()
  new.model.conv_kernel_grad, new.model.remat = "xla", True
  assert workdir.config_differences(old, workdir.config_to_dict(new)) == []
  new.model.depth = 18
  assert workdir.config_differences(old, workdir.config_to_dict(new)) == [
      "model.depth: 50 -> 18"]
