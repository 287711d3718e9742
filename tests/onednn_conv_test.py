"""The oneDNN convolution (jaxclr/cpu/onednn_conv.py): values and both
gradients against independent float64 formulas, determinism, which
convolutions it takes, how model.conv_library resolves, and a ResNet's
gradients against XLA's convolutions."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxclr import config as config_lib, cpu
from jaxclr.config import schema as config_schema
from jaxclr.cpu import onednn_conv
from jaxclr.models import conv
from jaxclr.models.simclr import build_encoder
from jaxclr.training import workdir

import conv_test
import multihost_test
import pretrain_test

pytestmark = pytest.mark.skipif(
    onednn_conv.unavailable_reason() is not None,
    reason=str(onednn_conv.unavailable_reason()))


def _value_and_grads(library, x, w, dy, stride, pad):
  def loss(x, w):
    y = cpu.conv2d(x, w, stride, pad, library=library, kernel_grad="xla")
    return jnp.sum(y * dy), y
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      x, w)
  return y, dx, dw


@pytest.mark.parametrize("k,stride,size,cin,cout", [
    (3, 1, 8, 5, 7), (3, 2, 9, 4, 6), (3, 2, 8, 4, 6), (7, 2, 11, 3, 4),
    (2, 1, 5, 2, 3), (5, 3, 12, 3, 2), (1, 1, 6, 5, 7), (1, 2, 8, 5, 7),
    (1, 2, 7, 3, 4)])
def test_values_and_gradients_equal_the_formula(k, stride, size, cin, cout):
  rng = np.random.default_rng(k * 100 + stride * 10 + size)
  x = rng.standard_normal((3, size, size, cin)).astype(np.float32)
  w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  pad = conv_test.centred_padding(k)
  out = (size + pad[0][0] + pad[0][1] - k) // stride + 1
  dy = rng.standard_normal((3, out, out, cout)).astype(np.float32)
  got = _value_and_grads("onednn", x, w, dy, stride, pad)
  want = conv_test.numpy_conv_and_grads(x, w, dy, stride, pad)
  for name, g, e in zip(("y", "dx", "dw"), got, want):
    assert g.shape == e.shape, name
    np.testing.assert_allclose(g, e, rtol=0, atol=2e-6 * np.abs(e).max(),
                               err_msg=name)


def test_repeated_calls_are_bitwise_equal():
  """Exact resumption needs a deterministic step: threads must not change
  oneDNN's summation order from one call to the next."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((16, 16, 16, 32)).astype(np.float32)
  w = rng.standard_normal((3, 3, 32, 48)).astype(np.float32)
  dy = rng.standard_normal((16, 16, 16, 48)).astype(np.float32)
  pad = conv_test.centred_padding(3)
  first = _value_and_grads("onednn", x, w, dy, 1, pad)
  for _ in range(3):
    for a, b in zip(first, _value_and_grads("onednn", x, w, dy, 1, pad)):
      np.testing.assert_array_equal(a, b)


def _calls_back(fn, *args) -> bool:
  return "ffi_call" in str(jax.make_jaxpr(fn)(*args))


def test_takes_float32_convolutions_only():
  x = jnp.ones((2, 6, 6, 3), jnp.float32)
  for shape, dtype, taken in [((3, 3, 3, 4), jnp.float32, True),
                              ((1, 3, 3, 4), jnp.float32, True),
                              ((1, 1, 3, 4), jnp.float32, True),
                              ((3, 3, 3, 4), jnp.bfloat16, False),
                              ((1, 1, 3, 4), jnp.bfloat16, False)]:
    w = jnp.ones(shape, dtype)
    pad = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in shape[:2])
    fn = lambda x, w, pad=pad: jax.grad(lambda w_: jnp.sum(cpu.conv2d(
        x.astype(w_.dtype), w_, 1, pad, library="onednn",
        kernel_grad="xla").astype(
            jnp.float32)))(w)
    assert _calls_back(fn, x, w) == taken, (shape, dtype)
    assert onednn_conv.applies(dtype) == taken


def test_tensorflow_reads_aligned_and_unaligned_buffers():
  """XLA's buffers are 64-byte aligned and cross in place; anything else is
  copied, never misread."""
  storage = np.arange(4 * 3 * 5 * 7 + 64, dtype=np.float32)
  start = (-storage.ctypes.data % 64) // 4
  for offset in (0, 1):
    x = storage[start + offset:start + offset + 4 * 3 * 5 * 7].reshape(
        4, 3, 5, 7)
    assert (x.ctypes.data % 64 == 0) == (offset == 0)
    np.testing.assert_array_equal(onednn_conv._to_tf(x).numpy(), x)


def test_an_unused_gradient_is_not_computed():
  """The input gradient and the kernel gradient are separate custom calls,
  so a first layer's input gradient or a frozen kernel's gradient is
  dropped from the program."""
  x = jnp.ones((2, 6, 6, 3), jnp.float32)
  w = jnp.ones((3, 3, 3, 4), jnp.float32)
  pad = conv_test.centred_padding(3)
  loss = lambda x, w: jnp.sum(cpu.conv2d(x, w, 1, pad, library="onednn",
                                         kernel_grad="xla"))
  for argnums, kept, dropped in [(1, "kernel_grad", "input_grad"),
                                 (0, "input_grad", "kernel_grad")]:
    hlo = jax.jit(jax.grad(loss, argnums)).lower(x, w).compile().as_text()
    assert kept in hlo and dropped not in hlo, argnums


def test_keeps_the_batch_sharding_of_an_explicit_mesh():
  """The step's arrays are typed batch-sharded on an Explicit mesh; the
  callbacks' results must carry that type, or the loss's shard_map fails."""
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:1])
  spec = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(3)
  x = jax.device_put(rng.standard_normal((4, 8, 8, 3)).astype(np.float32),
                     spec)
  w = jax.device_put(rng.standard_normal((3, 3, 3, 5)).astype(np.float32),
                     NamedSharding(mesh, P()))

  @jax.jit
  def step(x, w):
    y, vjp = jax.vjp(lambda x, w: cpu.conv2d(
        x, w, 2, conv_test.centred_padding(3), library="onednn",
        kernel_grad="xla"), x, w)
    return (y,) + vjp(y)

  y, dx, dw = step(x, w)
  assert jax.typeof(y).sharding.spec == P("data", None, None, None)
  assert jax.typeof(dx).sharding.spec == P("data", None, None, None)
  assert dw.shape == w.shape
  want_y, want_dx, _ = conv_test.numpy_conv_and_grads(
      np.asarray(x), np.asarray(w), np.asarray(y), 2,
      conv_test.centred_padding(3))
  np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-6 * abs(want_y).max())
  np.testing.assert_allclose(dx, want_dx, rtol=0,
                             atol=2e-6 * abs(want_dx).max())


def test_auto_is_onednn_on_a_one_device_cpu_job_only(monkeypatch):
  assert cpu.resolve_library("auto", backend="cpu", num_devices=1) == "onednn"
  assert cpu.resolve_library("auto", backend="cpu", num_devices=8) == "xla"
  assert cpu.resolve_library("auto", backend="gpu", num_devices=1) == "xla"
  assert cpu.resolve_library("auto", backend="tpu", num_devices=1) == "xla"
  assert cpu.resolve_library("xla", backend="cpu", num_devices=1) == "xla"
  assert cpu.resolve_library("onednn", backend="cpu", num_devices=1) == "onednn"
  with pytest.raises(config_lib.ConfigError,
                     match="'mkl'; valid: auto, xla, onednn"):
    cpu.resolve_library("mkl", backend="cpu", num_devices=1)
  with pytest.raises(config_lib.ConfigError,
                     match="'onednn' cannot run here: it runs on one "
                     "device.*has 8"):
    cpu.resolve_library("onednn", backend="cpu", num_devices=8)
  with pytest.raises(config_lib.ConfigError,
                     match="'onednn' cannot run here: it runs on the CPU "
                     "backend.*'gpu'"):
    cpu.resolve_library("onednn", backend="gpu", num_devices=1)
  assert cpu.LIBRARIES == config_schema.CONV_LIBRARIES
  # This test process has 8 (simulated) devices: 'auto' builds XLA's convs.
  assert build_encoder(config_lib.pretrain_config().model,
                       image_size=32).conv is conv.conv2d
  # A user who turned TensorFlow's oneDNN off gets XLA's, or a clear error.
  monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
  assert cpu.resolve_library("auto", backend="cpu", num_devices=1) == "xla"
  with pytest.raises(config_lib.ConfigError,
                     match="cannot run here: TF_ENABLE_ONEDNN_OPTS"):
    cpu.resolve_library("onednn", backend="cpu", num_devices=1)


def test_config_refuses_an_unknown_library_and_resumes_with_it_flipped():
  config = config_lib.pretrain_config()
  config.dataset = "synthetic"
  config.model.conv_library = "mkl"
  with pytest.raises(config_lib.ConfigError,
                     match="model.conv_library='mkl'; valid: auto"):
    config_lib.validate(config, job="pretrain")
  old = workdir.config_to_dict(config_lib.pretrain_config())
  new = config_lib.pretrain_config()
  new.model.conv_library = "xla"
  assert workdir.config_differences(old, workdir.config_to_dict(new)) == []


@pytest.mark.slow
@pytest.mark.parametrize("depth,sk_ratio", [(18, 0.0), (50, 0.0625)])
def test_resnet_values_and_gradients_agree_with_xla(depth, sk_ratio):
  """Same variables: outputs and gradients equal XLA's convolutions' to
  float32 round-off, for every conv kind the ResNets have (stems, strided,
  1x1 projections and bottlenecks, SK)."""
  grads_x, out_x = conv_test.resnet_grads_and_outputs(depth, sk_ratio,
                                                      library="xla")
  grads_o, out_o = conv_test.resnet_grads_and_outputs(depth, sk_ratio,
                                                      library="onednn")
  np.testing.assert_allclose(out_o, out_x, rtol=0,
                             atol=1e-5 * np.abs(out_x).max())
  conv_test.assert_grads_close(grads_o, grads_x, 1e-5)


@pytest.mark.slow
def test_a_one_device_job_uses_it_and_resumes_bitwise(tmp_path):
  """The default on a one-device CPU job, end to end: the job says so, and
  a run resumed from its step-2 checkpoint ends bitwise where the
  uninterrupted one did (exact resumption needs a deterministic step)."""
  run, resumed = str(tmp_path / "run"), str(tmp_path / "resumed")
  env = multihost_test.child_env(1)

  def job(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxclr.main",
         f"--config={pretrain_test.TINY_CONFIG}:steps=4,every=2",
         f"--workdir={workdir}"], env=env, cwd=multihost_test.REPO,
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr

  assert "oneDNN kernels" in job(run)
  shutil.copytree(run, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  job(resumed)
  config = config_lib.load_config_file(pretrain_test.TINY_CONFIG,
                                       "steps=4,every=2")
  want, _, _ = pretrain_test.restore_state(config, run, step=4)
  got, _, _ = pretrain_test.restore_state(config, resumed, step=4)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
