"""CPU only: a 2-D convolution (NHWC / HWIO) whose kernel gradient is one
matmul per kernel tap over the input's windows (`model.conv_kernel_grad=
'patches'`).

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
only, and there only for a one-device float32 job on a tested jaxlib
(jaxclr/cpu/__init__.py: resolve_kernel_grad says why).

Both forms compute the same sum in a different order: they agree to float32
round-off (tests/conv_test.py), and each is deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxclr.models import conv as conv_lib
from jaxclr.parallel import sharding

Padding = conv_lib.Padding
_conv = conv_lib.conv2d


def kernel_grad_from_patches(x, dy, kernel_shape, strides: int,
                             padding: Padding):
  """d/dW of sum(conv(x, W) * dy), one matmul per kernel tap; float32.

  The operands are taken in float32: XLA:CPU has no bfloat16 x bfloat16 ->
  float32 matmul (DotThunk: 'Unsupported element type'), and the sum over
  the batch is the kind of reduction the mixed-precision policy keeps in
  float32 (docs/simclr.md).

  dy is the left operand: XLA:CPU's matmul wants its left operand
  contraction-minor, so dy is transposed once (the loop reuses it) and each
  window is read as it lies. A 1x1 kernel is one matmul: there the operand
  with fewer channels goes on the left. One matmul over all taps' windows
  side by side (im2col) was slower: the concatenation and its transpose
  copy an array kh*kw times the input's size (benchmarks/RESULTS.md).
  """
  kh, kw, cin, cout = kernel_shape
  x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
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
def conv2d(x, kernel, strides: int, padding: Padding):
  """conv_lib.conv2d, with the per-tap kernel gradient in the backward."""
  return _conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding), x)
  (dx,) = input_vjp(dy)
  dw = kernel_grad_from_patches(x, dy, kernel.shape, strides, padding)
  return dx, dw.astype(kernel.dtype)


conv2d.defvjp(_forward, _backward)
