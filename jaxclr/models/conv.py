"""2-D convolution (NHWC / HWIO) whose kernel gradient can be matmuls over
the input's windows: the CPU switch `model.conv_kernel_grad`.

Why this exists: XLA:CPU differentiates a convolution with respect to its
kernel as another convolution that contracts over the batch, and to run it
transposes the activations and the output gradient into a batch-minor
layout first; that gradient and its transposes were 60% of a ResNet step's
operation time on the 2-core CPU (benchmarks/RESULTS.md, "CPU speed").
Written instead as

  dW[i, j] = sum over (n, y, x) of dy[n, y, x, :]^T x_pad[n, y*s + i, x*s + j, :]

-- one [Cout, N*Ho*Wo] x [N*Ho*Wo, Cin] matmul per kernel tap (i, j), over
the window of the padded input that tap reads -- the R-18 / 32 px / B=256
step ran 1.55x faster there (same section). The taps run one after another
in a loop, so only one window copy is alive at a time (+13% temporary memory
on that step; unrolled, all nine were, and the extra memory cost more time
in page faults than the matmuls saved). On GPU and TPU the native gradient
is fast and needs no copies, so 'auto' picks 'patches' on the CPU backend
only, and there only for a one-device job (resolve_kernel_grad says why).

Both forms compute the same sum in a different order: they agree to float32
round-off (tests/conv_test.py), and each is deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr import errors
from jaxclr.config_schema import CONV_KERNEL_GRADS as KERNEL_GRADS
from jaxclr.config_schema import CONV_LIBRARIES as LIBRARIES
from jaxclr.models import onednn_conv
from jaxclr.parallel import sharding

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def resolve_kernel_grad(kernel_grad: str, backend: str | None = None,
                        num_devices: int | None = None) -> str:
  """'xla' or 'patches' for `kernel_grad`: 'auto' is 'patches' on a CPU
  backend with one device in all, 'xla' elsewhere.

  One device only: each tap's matmul sums over the batch, so on a
  batch-sharded mesh it ends in an all-reduce, and an all-reduce inside the
  taps' loop escapes XLA:CPU's ordering of collectives across local devices
  (an 8-device step deadlocked in the test suite, 2026-12-05).
  """
  if kernel_grad not in KERNEL_GRADS:
    raise errors.ConfigError(f"model.conv_kernel_grad={kernel_grad!r}; "
                             f"valid: {', '.join(KERNEL_GRADS)}")
  backend = jax.default_backend() if backend is None else backend
  num_devices = jax.device_count() if num_devices is None else num_devices
  if kernel_grad == "patches" and num_devices > 1:
    raise errors.ConfigError(
        f"model.conv_kernel_grad='patches' runs on one device, and this job "
        f"has {num_devices}; use 'auto' or 'xla'")
  if kernel_grad != "auto":
    return kernel_grad
  return "patches" if backend == "cpu" and num_devices == 1 else "xla"


def resolve_library(library: str, backend: str | None = None,
                    num_devices: int | None = None) -> str:
  """'xla' or 'onednn' for `library` (model.conv_library): 'auto' is
  'onednn' on a CPU backend with one device in all where TensorFlow's oneDNN
  kernels can run (jaxclr/models/onednn_conv.py), 'xla' elsewhere."""
  if library not in LIBRARIES:
    raise errors.ConfigError(f"model.conv_library={library!r}; "
                             f"valid: {', '.join(LIBRARIES)}")
  backend = jax.default_backend() if backend is None else backend
  num_devices = jax.device_count() if num_devices is None else num_devices
  if library == "onednn":
    if backend != "cpu":
      raise errors.ConfigError(
          f"model.conv_library='onednn' runs on the CPU backend, and this "
          f"job's is {backend!r}; use 'auto' or 'xla'")
    if num_devices > 1:
      raise errors.ConfigError(
          f"model.conv_library='onednn' runs on one device, and this job "
          f"has {num_devices}; use 'auto' or 'xla'")
    reason = onednn_conv.unavailable_reason()
    if reason:
      raise errors.ConfigError(
          f"model.conv_library='onednn' cannot run here: {reason}; use "
          f"'auto' or 'xla'")
  if library != "auto":
    return library
  if (backend == "cpu" and num_devices == 1
      and onednn_conv.unavailable_reason() is None):
    return "onednn"
  return "xla"


def conv2d(x, kernel, strides: int, padding: Padding, *,
           kernel_grad: str = "xla", library: str = "xla"):
  """conv(x, kernel) with explicit (low, high) padding per spatial dim.

  kernel_grad: 'xla' (XLA's own gradient) or 'patches' (the matmul above);
  resolve 'auto' with `resolve_kernel_grad` first. library: 'xla' or
  'onednn' (resolved by `resolve_library`); 'onednn' takes the float32
  convolutions, and kernel_grad then applies to the rest.
  """
  strides, padding = int(strides), tuple(tuple(map(int, p)) for p in padding)
  if library not in ("xla", "onednn"):
    raise ValueError(f"library={library!r}; valid: 'xla', 'onednn'")
  if library == "onednn" and onednn_conv.applies(x.dtype):
    return onednn_conv.conv2d(x, kernel, strides, padding)
  if kernel_grad == "patches":
    return _conv_with_patch_kernel_grad(x, kernel, strides, padding)
  if kernel_grad != "xla":
    raise ValueError(f"kernel_grad={kernel_grad!r}; valid: 'xla', 'patches'")
  return _conv(x, kernel, strides, padding)


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, (strides, strides), padding,
                                  dimension_numbers=_DIMENSIONS)


def kernel_grad_from_patches(x, dy, kernel_shape, strides: int,
                             padding: Padding):
  """d/dW of sum(conv(x, W) * dy), one matmul per kernel tap; float32.

  dy is the left operand: XLA:CPU's matmul wants its left operand
  contraction-minor, so dy is transposed once (the loop reuses it) and each
  window is read as it lies. A 1x1 kernel is one matmul: there the operand
  with fewer channels goes on the left. One matmul over all taps' windows
  side by side (im2col) was slower: the concatenation and its transpose
  copy an array kh*kw times the input's size (benchmarks/RESULTS.md).
  """
  kh, kw, cin, cout = kernel_shape
  summed = _summed_sharding(dy)
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
    # One matmul; its left operand gets transposed, so put there whichever
    # of the window and dy has fewer channels (a bottleneck's expanding 1x1
    # conv: the 64-channel input, not the 256-channel dy).
    window = x[:, ::strides, ::strides, :]
    window_left = cin < cout
    left, right = (window, dy) if window_left else (dy, window)
    dw = lax.dot_general(left, right, contract,
                         preferred_element_type=jnp.float32,
                         out_sharding=summed)
    return (dw if window_left else dw.T).reshape(1, 1, cin, cout)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, ho, wo, _ = dy.shape
  span_h, span_w = (ho - 1) * strides + 1, (wo - 1) * strides + 1
  # Transposed here, once: inside the loop XLA would redo it every tap.
  dy_t = jnp.transpose(dy, (3, 0, 1, 2))  # [Cout, N, Ho, Wo]

  def tap(t):
    i, j = t // kw, t % kw
    window = lax.dynamic_slice(xp, (0, i, j, 0), (n, span_h, span_w, cin))
    if strides > 1:
      window = window[:, ::strides, ::strides, :]
    return lax.dot_general(dy_t, window, (((1, 2, 3), (0, 1, 2)), ((), ())),
                           preferred_element_type=jnp.float32,
                           out_sharding=summed)  # [Cout, Cin]

  per_tap = lax.map(tap, jnp.arange(kh * kw))
  return per_tap.reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)


def _summed_sharding(x):
  """On a mesh with Explicit axes, a contraction over the sharded batch
  must state its (replicated) result sharding; elsewhere XLA decides."""
  mesh = sharding.explicit_mesh_of(x)
  return None if mesh is None else sharding.replicated(mesh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_patch_kernel_grad(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding), x)
  (dx,) = input_vjp(dy)
  dw = kernel_grad_from_patches(x, dy, kernel.shape, strides, padding)
  return dx, dw.astype(kernel.dtype)


_conv_with_patch_kernel_grad.defvjp(_forward, _backward)
