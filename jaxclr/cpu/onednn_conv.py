"""2-D convolution (NHWC / HWIO, float32) on TensorFlow's oneDNN kernels,
called from the jitted step as XLA custom calls: the CPU switch
`model.conv_library='onednn'`.

Why this exists: on the 2-core CPU a 3x3, 64-channel R-18 layer's forward
and both gradients took 1.15 s on XLA:CPU (the kernel gradient as the step
computes it, jaxclr/cpu/patch_conv.py) and 0.57 s on oneDNN, the library
TensorFlow's CPU convolutions use, calls included; the R-18 / B=256 job
ran faster end to end (benchmarks/RESULTS.md, "CPU speed, 2026-12-05
(oneDNN)" and "(late)"). jaxlib ships no oneDNN convolution, and
tensorflow-cpu -- already a dependency for the input pipeline -- does, so
the forward is one custom call into tf.raw_ops.Conv2D, and the gradients
one each into Conv2DBackpropInput and Conv2DBackpropFilter. The custom call
is an XLA FFI target whose handler is Python (jaxclr/cpu/python_ffi.py):
TensorFlow reads XLA's buffers in place (DLPack) and each result is copied
once into XLA's output buffer.

Stride 1 with the centred padding ResNets use is TensorFlow's 'SAME'; any
other padding is applied here and the kernel runs 'VALID' (TensorFlow's
EXPLICIT padding leaves oneDNN for a slower kernel). Values equal XLA's
convolution to float32 round-off (tests/onednn_conv_test.py); each call is
deterministic, which exact resumption needs.

Where it applies (jaxclr/cpu/__init__.py: resolve_library decides): the
CPU backend, one device in all (a custom call sees whole arrays, and on a
multi-device mesh would gather them to one device), float32, x86-64, and
the jaxlib and TensorFlow versions of jaxclr/cpu/versions.py. A failure
inside the call ends a job in one line naming the switch
(jaxclr/cpu/__init__.py: describe_failure). 1x1 kernels included: through pure_callback's copies
they were slower than XLA's single matmuls (R-50 step 20.2 s against
15.6), in place they are faster (R-50 / 224 px / B=32 step 2.25-2.66
against 1.90-2.12 images/s).
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
import numpy as np

from jaxclr.cpu import python_ffi
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


def applies(dtype) -> bool:
  """Whether conv2d below takes a convolution of this dtype (the rest stay
  on XLA)."""
  return jnp.dtype(dtype) == jnp.float32


def _tf_padding(kernel_shape, strides: int, padding: Padding):
  """(TensorFlow padding mode, padding to apply before calling it)."""
  # TensorFlow's 'SAME' at stride 1: (k - 1) // 2 before, the rest after --
  # TensorFlow's definition, which the ResNets' centred padding
  # (resnet.py) happens to equal; at other strides 'SAME' depends on the
  # input size, so those always pad here.
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
  """y with x's sharding where x's mesh has Explicit axes: a custom call's
  result carries none, and the step's batch-sharded types must line up."""
  mesh = sharding.explicit_mesh_of(x)
  if mesh is None:
    return y
  return jax.sharding.reshard(
      y, NamedSharding(mesh, jax.typeof(x).sharding.spec))


# The custom calls' target (jaxclr/cpu: describe_failure looks for it).
FFI_TARGET = "jaxclr_onednn_conv2d"
# TensorFlow reads a buffer in place when it is this aligned (its CPU
# allocator's alignment); XLA's buffers are.
_TF_ALIGNMENT = 64


def _to_tf(a):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if a.size and a.ctypes.data % _TF_ALIGNMENT == 0:
    # DLPack: TensorFlow reads XLA's buffer in place.
    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
  return tf.constant(a)


class _DLPackOf:
  """A TensorFlow tensor as a DLPack producer NumPy can read in place."""

  def __init__(self, tensor):
    self._tensor = tensor

  def __dlpack__(self, **unused_kwargs):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.experimental.dlpack.to_dlpack(self._tensor)

  def __dlpack_device__(self):
    return (1, 0)  # DLPack's kDLCPU, device 0.


def _run_conv(inputs, outputs, attrs):
  """The FFI handler (jaxclr/cpu/python_ffi.py): one TensorFlow op, its result
  copied once into XLA's output buffer."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  op, stride, mode = attrs["op"], attrs["stride"], attrs["padding"]
  strides = [1, stride, stride, 1]
  if op == "forward":
    x, kernel = inputs
    result = tf.raw_ops.Conv2D(input=_to_tf(x), filter=_to_tf(kernel),
                               strides=strides, padding=mode)
  elif op == "input_grad":
    kernel, dy = inputs
    result = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=list(outputs[0].shape), filter=_to_tf(kernel),
        out_backprop=_to_tf(dy), strides=strides, padding=mode)
  elif op == "kernel_grad":
    x, dy = inputs
    result = tf.raw_ops.Conv2DBackpropFilter(
        input=_to_tf(x), filter_sizes=list(outputs[0].shape),
        out_backprop=_to_tf(dy), strides=strides, padding=mode)
  else:
    raise ValueError(f"op {op!r}; valid: 'forward', 'input_grad', "
                     "'kernel_grad'")
  np.copyto(outputs[0], np.from_dlpack(_DLPackOf(result)))


def _call(op: str, result_shape, operands, stride: int, mode: str):
  # Registered here, not at import: a job that never takes this path
  # registers nothing. Imported while tracing, so the first step does not
  # import TensorFlow on one of XLA's threads.
  importlib.import_module("tensorflow")
  python_ffi.register(FFI_TARGET, _run_conv)
  return jax.ffi.ffi_call(
      FFI_TARGET, jax.ShapeDtypeStruct(result_shape, jnp.float32))(
          *operands, op=op, stride=np.int64(stride), padding=mode)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: int, padding: Padding):
  """conv(x, kernel), stride `strides`, (low, high) padding per spatial dim;
  float32 x and kernel."""
  return _forward(x, kernel, strides, padding)[0]


def _forward(x, kernel, strides, padding):
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"oneDNN convolution takes float32, got {x.dtype} input "
                    f"and {kernel.dtype} kernel")
  mode, pre = _tf_padding(kernel.shape, strides, padding)
  out = jax.eval_shape(
      lambda a, b: lax.conv_general_dilated(a, b, (strides, strides), padding,
                                            dimension_numbers=_DIMENSIONS),
      x, kernel)
  y = _call("forward", out.shape, (_pad(x, pre), kernel), strides, mode)
  return _like(y, x), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  mode, pre = _tf_padding(kernel.shape, strides, padding)
  x_in = _pad(x, pre)
  # Two calls, not one: XLA drops a gradient nobody uses (the input
  # gradient of the first layer, the kernel gradient of a frozen encoder).
  dx_in = _call("input_grad", x_in.shape, (kernel, dy), strides, mode)
  dw = _call("kernel_grad", kernel.shape, (x_in, dy), strides, mode)
  if pre != _NO_PADDING:
    (top, _), (left, _) = pre
    dx_in = dx_in[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return _like(dx_in, x), dw


conv2d.defvjp(_forward, _backward)
