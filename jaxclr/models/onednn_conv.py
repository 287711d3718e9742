"""2-D convolution (NHWC / HWIO, float32) on TensorFlow's oneDNN kernels,
called from the jitted step through host callbacks: the CPU switch
`model.conv_library='onednn'`.

Why this exists: on the 2-core CPU a 3x3, 64-channel R-18 layer's forward
and both gradients took 1.15 s on XLA:CPU (the kernel gradient as the step
computes it, jaxclr/models/conv.py) and 0.70 s on oneDNN, the library
TensorFlow's CPU convolutions use, callbacks included; the R-18 / B=256 job
ran 1.12x faster end to end (benchmarks/RESULTS.md, "CPU speed, 2026-12-05
(oneDNN)"). jaxlib ships no
oneDNN convolution, and tensorflow-cpu -- already a dependency for the input
pipeline -- does, so the forward is one `jax.pure_callback` into
tf.raw_ops.Conv2D and the backward one into Conv2DBackpropInput +
Conv2DBackpropFilter. The arrays cross by DLPack, without copies on the way
in; jax copies each result into XLA's buffer (one copy per output).

Stride 1 with the centred padding ResNets use is TensorFlow's 'SAME'; any
other padding is applied here and the kernel runs 'VALID' (TensorFlow's
EXPLICIT padding leaves oneDNN for a slower kernel). Values equal XLA's
convolution to float32 round-off (tests/onednn_conv_test.py); each call is
deterministic, which exact resumption needs.

Where it applies (conv.py decides): the CPU backend, one device in all (a
callback sees whole arrays, and on a multi-device mesh would gather them to
one device), float32, kernels larger than 1x1 (XLA's 1x1 convolutions are
single matmuls and were as fast or faster).
"""

from __future__ import annotations

import functools
import importlib
import os
import platform

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding

from jaxclr.parallel import sharding

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_NO_PADDING = ((0, 0), (0, 0))


def unavailable_reason() -> str | None:
  """None when TensorFlow's oneDNN convolutions can run here, else why not."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    # TensorFlow enables oneDNN by default on x86-64 only.
    return f"TensorFlow uses oneDNN on x86-64, and this is {platform.machine()}"
  if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() in (
      "0", "false", "off"):
    return "TF_ENABLE_ONEDNN_OPTS turns TensorFlow's oneDNN kernels off"
  try:
    importlib.import_module("tensorflow")
  except ImportError as e:
    return f"tensorflow does not import ({e})"
  return None


def applies(kernel_shape, dtype) -> bool:
  """Whether conv2d below takes this convolution (the rest stay on XLA)."""
  return kernel_shape[0] * kernel_shape[1] > 1 and jnp.dtype(
      dtype) == jnp.float32


def _tf_padding(kernel_shape, strides: int, padding: Padding):
  """(TensorFlow padding mode, padding to apply before calling it)."""
  same = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2)
               for k in kernel_shape[:2])
  if strides == 1 and padding == same:
    return "SAME", _NO_PADDING
  return "VALID", padding


def _pad(x, padding: Padding):
  if padding == _NO_PADDING:
    return x
  return jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))


def _like(y, x):
  """y with x's sharding where x's mesh has Explicit axes: a callback's
  result carries none, and the step's batch-sharded types must line up."""
  mesh = sharding.explicit_mesh_of(x)
  if mesh is None:
    return y
  return jax.sharding.reshard(
      y, NamedSharding(mesh, jax.typeof(x).sharding.spec))


def _to_tf(a):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # DLPack: TensorFlow reads XLA's host buffer in place.
  return tf.experimental.dlpack.from_dlpack(a.__dlpack__())


def _tf_forward(mode: str, strides: int):
  def call(x, kernel):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.raw_ops.Conv2D(input=_to_tf(x), filter=_to_tf(kernel),
                             strides=[1, strides, strides, 1],
                             padding=mode).numpy()
  return call


def _tf_backward(mode: str, strides: int):
  def call(x, kernel, dy):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    x_tf, kernel_tf, dy_tf = _to_tf(x), _to_tf(kernel), _to_tf(dy)
    stride = [1, strides, strides, 1]
    dx = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=list(x.shape), filter=kernel_tf, out_backprop=dy_tf,
        strides=stride, padding=mode)
    dw = tf.raw_ops.Conv2DBackpropFilter(
        input=x_tf, filter_sizes=list(kernel.shape), out_backprop=dy_tf,
        strides=stride, padding=mode)
    return dx.numpy(), dw.numpy()
  return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: int, padding: Padding):
  """conv(x, kernel), stride `strides`, (low, high) padding per spatial dim;
  float32 x and kernel."""
  return _forward(x, kernel, strides, padding)[0]


def _forward(x, kernel, strides, padding):
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"oneDNN convolution takes float32, got {x.dtype} input "
                    f"and {kernel.dtype} kernel")
  # Imported while tracing, so the first step does not import TensorFlow on
  # one of XLA's threads.
  importlib.import_module("tensorflow")
  mode, pre = _tf_padding(kernel.shape, strides, padding)
  out = jax.eval_shape(
      lambda a, b: lax.conv_general_dilated(a, b, (strides, strides), padding,
                                            dimension_numbers=_DIMENSIONS),
      x, kernel)
  y = jax.pure_callback(_tf_forward(mode, strides),
                        jax.ShapeDtypeStruct(out.shape, out.dtype),
                        _pad(x, pre), kernel)
  return _like(y, x), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  mode, pre = _tf_padding(kernel.shape, strides, padding)
  x_in = _pad(x, pre)
  dx_in, dw = jax.pure_callback(
      _tf_backward(mode, strides),
      (jax.ShapeDtypeStruct(x_in.shape, x_in.dtype),
       jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)),
      x_in, kernel, dy)
  if pre != _NO_PADDING:
    (top, _), (left, _) = pre
    dx_in = dx_in[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return _like(dx_in, x), dw


conv2d.defvjp(_forward, _backward)
