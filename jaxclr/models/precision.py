"""The mixed-precision policy, in one place (docs/simclr.md section 8).

With `model.compute_dtype='bfloat16'` (configs/imagenet.py):

* parameters, optimizer state (LARS momentum; its norms and the update
  read float32 parameters and gradients), BatchNorm moving statistics,
  a method's EMA target and queues: float32 (PARAM_DTYPE);
* convolutions and matmuls: bfloat16 operands, float32 accumulation,
  bfloat16 activations between layers (the compute dtype);
* their kernel gradients leave the convolution / matmul in float32
  (KERNEL_GRAD_DTYPE): each device's partial sum over its rows is not
  rounded to bfloat16 before the sum over devices, so the number of
  roundings does not depend on the device count (`conv`, `Dense`);
* BatchNorm statistics and normalisation: float32 (NORM_DTYPE), the output
  cast to the compute dtype, except the projection head's last BatchNorm,
  whose output z stays float32 (FEATURE_DTYPE);
* global average pooling: float32 (h is FEATURE_DTYPE);
* the embeddings that enter a loss, the columns all-gathered for it, the
  similarity logits (HIGHEST-precision matmul) and the loss: float32
  (LOSS_DTYPE, LOGITS_PRECISION).

The compiler is told to keep the roundings the program states
(`compiler_options`): XLA's default lets it skip a bfloat16 rounding
between two ops it computes in float32 anyway, and whether it can depends
on how the program was fused and partitioned, i.e. on the device layout
(benchmarks/RESULTS.md, "bfloat16 across device layouts").

Reference points: the official SimCLR code (google-research/simclr
`tf2/model.py`, `tf2/resnet.py`) has no mixed precision: everything is
float32. big_vision (google-research/big_vision `big_vision/models/vit.py`)
runs only the matmuls in bfloat16 (`dtype_mm`) and keeps normalisation,
the residual stream, the classification head and the loss in float32
(`big_vision/trainers/proj/image_text/siglip.py`: logits from float32
embeddings). jaxclr follows big_vision for the norms, the head's output and
the loss; it differs in keeping ResNet activations (residual adds, ReLU)
in bfloat16, because at 224 px those are the step's memory
(benchmarks/RESULTS.md, full-step memory).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

PARAM_DTYPE = jnp.float32
NORM_DTYPE = jnp.float32  # BatchNorm statistics and normalisation.
FEATURE_DTYPE = jnp.float32  # h (pooled features) and z (the head's output).
KERNEL_GRAD_DTYPE = jnp.float32  # Convolution and matmul kernel gradients.
LOSS_DTYPE = jnp.float32  # Loss inputs, gathered columns, logits, loss.
# The logits are the objective: on TPU the default float32 matmul precision
# would round them through bfloat16.
LOGITS_PRECISION = lax.Precision.HIGHEST


def compute_dtype(name: str):
  """The jnp dtype of model.compute_dtype `name` ('float32', 'bfloat16')."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype={name!r}; valid: "
                     f"{', '.join(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def is_reduced(dtype) -> bool:
  """Whether `dtype` computes below float32 (the policy's casts apply)."""
  return jnp.dtype(dtype).itemsize < 4


def compiler_options(dtype) -> dict[str, Any]:
  """XLA options for a step that computes in `dtype` (a name or a dtype).

  Reduced precision: `xla_allow_excess_precision=False`, so XLA rounds to
  bfloat16 wherever the program casts, on every layout. Its default (True)
  lets the compiler drop a float32 -> bfloat16 -> float32 pair of
  conversions, which on XLA:CPU (bfloat16 emulated in float32) it did in the
  one-device program and not in the SPMD-partitioned one: the same step then
  differed by 0.27 % in the loss between 1 and 2 devices before any update.
  float32 steps get no option, so their programs (and caches) are unchanged.
  """
  dtype = compute_dtype(dtype) if isinstance(dtype, str) else dtype
  return {"xla_allow_excess_precision": False} if is_reduced(dtype) else {}


def to_loss(x):
  """An embedding as a loss reads it (LOSS_DTYPE)."""
  return x.astype(LOSS_DTYPE)


def global_average_pool(x):
  """Mean over the spatial axes of [B, H, W, C], accumulated and returned
  in FEATURE_DTYPE: [B, C]."""
  return jnp.mean(x, axis=(1, 2), dtype=FEATURE_DTYPE)


def conv_kernel_grad(x, g, kernel_shape, strides: int, padding,
                     kernel_sharding=None):
  """dL/dkernel of conv(x, kernel) (NHWC / HWIO, explicit padding) from the
  output cotangent g, accumulated and returned in KERNEL_GRAD_DTYPE.

  Written out because JAX's transpose rule returns the kernel's dtype
  (bfloat16) and, given a float32 output type, would convert x to float32.
  As a convolution over the batch: x with its batch as the contracted
  feature and its channels as the batch, g dilated by the stride as the
  kernel, padded at the end only as far as the forward read.
  """
  kh, kw = kernel_shape[:2]
  (top, _), (left, _) = padding
  out_h, out_w = g.shape[1:3]
  bottom = (out_h - 1) * strides + kh - x.shape[1] - top
  right = (out_w - 1) * strides + kw - x.shape[2] - left
  grad = lax.conv_general_dilated(
      x, g, window_strides=(1, 1), padding=((top, bottom), (left, right)),
      rhs_dilation=(strides, strides),
      dimension_numbers=("CHWN", "IHWO", "NHWC"),
      preferred_element_type=KERNEL_GRAD_DTYPE,
      out_sharding=kernel_sharding and _permuted(kernel_sharding,
                                                 (2, 0, 1, 3)))
  return grad.transpose(1, 2, 0, 3)  # [Cin, kh, kw, Cout] -> HWIO


def _permuted(named_sharding, perm):
  """The sharding of an array whose axes are named_sharding's, permuted."""
  spec = tuple(named_sharding.spec)
  spec += (None,) * (len(perm) - len(spec))
  return named_sharding.update(spec=P(*(spec[i] for i in perm)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _reduced_conv(conv_fn, x, kernel, strides, padding):
  return conv_fn(x, kernel.astype(x.dtype), strides, padding)


def _reduced_conv_fwd(conv_fn, x, kernel, strides, padding):
  kernel_c = kernel.astype(x.dtype)
  return conv_fn(x, kernel_c, strides, padding), (x, kernel_c)


def _reduced_conv_bwd(conv_fn, strides, padding, residuals, g):
  x, kernel_c = residuals
  # The input gradient is conv_fn's own (bfloat16, like the activations).
  _, input_vjp = jax.vjp(lambda y: conv_fn(y, kernel_c, strides, padding), x)
  dx, = input_vjp(g)
  return dx, conv_kernel_grad(x, g, kernel_c.shape, strides, padding,
                              jax.typeof(kernel_c).sharding)


_reduced_conv.defvjp(_reduced_conv_fwd, _reduced_conv_bwd)


def conv(conv_fn: Callable, x, kernel, strides: int, padding, dtype):
  """conv_fn(x, kernel, strides, padding) computed in `dtype` on a float32
  kernel: in reduced precision, bfloat16 operands and a float32 kernel
  gradient (conv_kernel_grad); in float32, conv_fn as it is (its own
  gradients, e.g. jaxclr/cpu's)."""
  x = x.astype(dtype)
  if not is_reduced(dtype):
    return conv_fn(x, kernel.astype(dtype), strides, padding)
  return _reduced_conv(conv_fn, x, kernel, strides, padding)


@jax.custom_vjp
def _reduced_matmul(x, kernel):
  return jnp.dot(x, kernel.astype(x.dtype))


def _reduced_matmul_fwd(x, kernel):
  kernel_c = kernel.astype(x.dtype)
  return jnp.dot(x, kernel_c), (x, kernel_c)


def _reduced_matmul_bwd(residuals, g):
  x, kernel_c = residuals
  dx = jnp.dot(g, kernel_c.T)
  dk = lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                       preferred_element_type=KERNEL_GRAD_DTYPE,
                       out_sharding=jax.typeof(kernel_c).sharding)
  return dx, dk


_reduced_matmul.defvjp(_reduced_matmul_fwd, _reduced_matmul_bwd)


def matmul(x, kernel, dtype):
  """x [N, I] @ kernel [I, O] in `dtype`: in reduced precision the kernel
  gradient is accumulated and returned in KERNEL_GRAD_DTYPE."""
  x = x.astype(dtype)
  if not is_reduced(dtype):
    return jnp.dot(x, kernel.astype(dtype))
  return _reduced_matmul(x, kernel)


class Dense(nn.Module):
  """flax.linen.Dense (same variables: kernel [I, O], bias [O]) computed by
  `matmul`, so a bfloat16 Dense has a float32 kernel gradient."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (x.shape[-1], self.features), PARAM_DTYPE)
    y = matmul(x.reshape((-1, x.shape[-1])), kernel, self.dtype)
    y = y.reshape(x.shape[:-1] + (self.features,))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), PARAM_DTYPE)
      y = y + bias.astype(self.dtype)
    return y
