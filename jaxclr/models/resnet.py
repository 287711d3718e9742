"""ResNet v1.5 encoder as SimCLR builds it (docs/simclr.md section 5.1).

Post-activation blocks with the stride on the 3x3 conv, no conv biases,
fan-in truncated-normal init (scale 1, not He's 2), the last BN of every
residual branch initialised with gamma = 0, and a projection shortcut in the
first block of every group (also group 1 of the basic-block nets, unlike
torchvision). BatchNorm computes its statistics over whatever batch it sees:
under jit with a batch-sharded global array that is the global batch.

SimCLRv2's options (docs/simclr.md 5.3): `sk_ratio` > 0 gives the bottleneck's
3x3 conv selective kernels and turns on the ResNet-D changes the official
code makes with them (a stem of three 3x3 convs; average-pool + 1x1 conv
projection shortcuts); `se_ratio` > 0 adds squeeze-excitation at the end of
every residual branch. At 0 (the defaults) neither adds a variable.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxclr.models import conv as conv_lib, precision

BLOCKS_PER_GROUP = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
GROUP_STRIDES = (1, 2, 2, 2)

# TF's variance_scaling_initializer(): scale 1.0, fan_in, truncated normal.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in",
                                                    "truncated_normal")


def make_batch_norm(train: bool, momentum: float, epsilon: float, dtype):
  """BatchNorm whose statistics and normalisation are computed in
  precision.NORM_DTYPE (float32) and whose output is `dtype`."""
  # Two-pass variance: the default E[x^2]-E[x]^2 cancels on image-like
  # activations and makes the step depend on the device layout.
  # force_float32_reductions (flax's default, stated): statistics in float32
  # (NORM_DTYPE) whatever the input; the normalisation then runs in float32
  # too, since the float32 mean promotes x - mean.
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype,
                           param_dtype=precision.PARAM_DTYPE,
                           use_fast_variance=False,
                           force_float32_reductions=True)


class FixedPaddingConv(nn.Module):
  """Conv without bias; pads (k-1)//2 before and the rest after, then VALID.

  Matches conv2d_fixed_padding for strided convs (so the output grid does not
  depend on the input size's parity) and equals 'SAME' for stride 1.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  # conv(x, kernel, strides, padding): XLA's, or one a job passed in.
  conv: Callable = conv_lib.conv2d

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init,
                        (k, k, x.shape[-1], self.features),
                        precision.PARAM_DTYPE)
    pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
    # In bfloat16: bfloat16 operands, a float32 kernel gradient.
    return precision.conv(self.conv, x, kernel, self.strides, (pad, pad),
                          self.dtype)


def avg_pool_shortcut(x, strides: int):
  """ResNet-D's shortcut pooling: 2x2 average, stride `strides`.

  Stride 2 zero-pads one row and column at the end and then pools 'VALID'
  (the padding counts in the average, as the official FixedPadding(2) +
  AveragePooling2D(VALID) do); stride 1 pools 'SAME', which in TF pads at the
  end and averages over the real pixels only.
  """
  if strides > 1:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.avg_pool(x, (2, 2), (strides, strides), padding="VALID")
  return nn.avg_pool(x, (2, 2), (1, 1), padding=((0, 1), (0, 1)),
                     count_include_pad=False)


def projection_shortcut(x, features: int, strides: int, resnet_d: bool,
                        norm, conv):
  """1x1 conv + BN to `features` (call inside a block: the submodules are
  the block's proj_conv and proj_bn). With resnet_d (ResNet-D,
  arXiv:1812.01187) an average pool does the striding and the conv has
  stride 1; else the conv is strided."""
  if resnet_d:
    x = conv(features, 1, 1, name="proj_conv")(avg_pool_shortcut(x, strides))
  else:
    x = conv(features, 1, strides, name="proj_conv")(x)
  return norm(name="proj_bn")(x)


class SelectiveKernelConv(nn.Module):
  """SimCLRv2's selective-kernel 3x3 conv (arXiv:1903.06586), BN-ReLU included.

  Two 3x3 streams computed as one conv with 2x the channels and split (both
  3x3, as the official code); their sum, average-pooled, goes through a
  1x1 conv to max(filters * sk_ratio, 32) channels, BN-ReLU and a 1x1 conv
  to 2 x filters, whose softmax over the two streams mixes them.
  """
  filters: int
  strides: int
  sk_ratio: float
  norm: Callable[..., nn.Module]
  conv: Callable[..., nn.Module]
  min_dim: int = 32

  @nn.compact
  def __call__(self, x):
    y = self.conv(2 * self.filters, 3, self.strides, name="conv")(x)
    y = nn.relu(self.norm(name="bn")(y))
    streams = jnp.stack(jnp.split(y, 2, axis=-1))  # [2, B, H, W, F]
    pooled = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2),
                      keepdims=True)  # [B, 1, 1, F]
    mid_dim = max(int(self.filters * self.sk_ratio), self.min_dim)
    g = self.conv(mid_dim, 1, 1, name="fc1")(pooled)
    g = nn.relu(self.norm(name="fc1_bn")(g))
    mixing = self.conv(2 * self.filters, 1, 1, name="fc2")(g)  # [B, 1, 1, 2F]
    mixing = nn.softmax(jnp.stack(jnp.split(mixing, 2, axis=-1)), axis=0)
    return jnp.sum(streams * mixing, axis=0)  # [B, H, W, F]


class SqueezeExcitation(nn.Module):
  """x * sigmoid(expand(relu(reduce(mean_hw(x))))), 1x1 convs with bias;
  reduce to max(1, int(filters * se_ratio)) channels (the official SE_Layer,
  which sizes it by the block's `filters`, not by x's channels)."""
  filters: int
  se_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(PointwiseConv, dtype=self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    s = nn.relu(conv(max(1, int(self.filters * self.se_ratio)),
                     name="reduce")(s))
    s = conv(x.shape[-1], name="expand")(s)
    return nn.sigmoid(s) * x


class PointwiseConv(nn.Module):
  """nn.Conv(kernel_size=(1, 1), use_bias=True) on [B, 1, 1, C] (same
  variables: kernel [1, 1, C, F], bias [F]) as a precision.matmul, so that
  in bfloat16 its kernel gradient is float32 like every other layer's."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_kernel_init,
                        (1, 1, x.shape[-1], self.features),
                        precision.PARAM_DTYPE)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      precision.PARAM_DTYPE)
    y = precision.matmul(x.reshape((-1, x.shape[-1])), kernel[0, 0],
                         self.dtype)
    return (y + bias.astype(self.dtype)).reshape(x.shape[:-1] +
                                                 (self.features,))


class BasicBlock(nn.Module):
  filters: int
  strides: int
  use_projection: bool
  norm: Callable[..., nn.Module]
  conv: Callable[..., nn.Module]  # FixedPaddingConv with dtype bound.
  sk_ratio: float = 0.0  # Basic blocks have no SK conv: > 0 means ResNet-D.
  se_ratio: float = 0.0

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.use_projection:
      shortcut = projection_shortcut(x, self.filters, self.strides,
                                     self.sk_ratio > 0, self.norm, self.conv)
    y = self.conv(self.filters, 3, self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, 3, 1, name="conv2")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
    if self.se_ratio > 0:
      y = SqueezeExcitation(self.filters, self.se_ratio, y.dtype, name="se")(y)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  use_projection: bool
  norm: Callable[..., nn.Module]
  conv: Callable[..., nn.Module]  # FixedPaddingConv with dtype bound.
  sk_ratio: float = 0.0
  se_ratio: float = 0.0

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.use_projection:
      shortcut = projection_shortcut(x, 4 * self.filters, self.strides,
                                     self.sk_ratio > 0, self.norm, self.conv)
    y = self.conv(self.filters, 1, 1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    if self.sk_ratio > 0:
      y = SelectiveKernelConv(self.filters, self.strides, self.sk_ratio,
                              self.norm, self.conv, name="sk_conv2")(y)
    else:
      y = self.conv(self.filters, 3, self.strides, name="conv2")(y)
      y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(4 * self.filters, 1, 1, name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
    if self.se_ratio > 0:
      y = SqueezeExcitation(self.filters, self.se_ratio, y.dtype, name="se")(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Returns h, the globally average-pooled final features [B, C], in
  precision.FEATURE_DTYPE (float32) whatever the compute dtype."""
  depth: int = 50
  width_multiplier: float = 1.0
  cifar_stem: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  sk_ratio: float = 0.0  # > 0: selective kernels + ResNet-D (SimCLRv2 SK1: 0.0625).
  se_ratio: float = 0.0  # > 0: squeeze-excitation in every block.
  # Recompute each residual block's activations in the backward instead of
  # keeping them (flax nn.remat): same parameters and values, less memory
  # where the compiler honours it (benchmarks/RESULTS.md, memory sections).
  remat: bool = False
  # The convolution, passed in once by the job that builds the model:
  # XLA's (models/conv.py) unless a CPU path applies (jaxclr/cpu).
  conv: Callable = conv_lib.conv2d

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depth not in BLOCKS_PER_GROUP:
      raise ValueError(f"ResNet depth {self.depth} not in "
                       f"{sorted(BLOCKS_PER_GROUP)}")
    norm = make_batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    conv_layer = functools.partial(FixedPaddingConv, dtype=self.dtype,
                                   conv=self.conv)
    block_cls = BasicBlock if self.depth < 50 else BottleneckBlock
    if self.remat:
      block_cls = nn.remat(block_cls)
    width = lambda f: max(1, int(round(f * self.width_multiplier)))
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv_layer(width(64), 3, 1, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    elif self.sk_ratio > 0:  # ResNet-D stem: three 3x3 convs.
      half = max(1, width(64) // 2)
      x = conv_layer(half, 3, 2, name="stem_conv1")(x)
      x = nn.relu(norm(name="stem_bn1")(x))
      x = conv_layer(half, 3, 1, name="stem_conv2")(x)
      x = nn.relu(norm(name="stem_bn2")(x))
      x = conv_layer(width(64), 3, 1, name="stem_conv3")(x)
      x = nn.relu(norm(name="stem_bn3")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    else:
      x = conv_layer(width(64), 7, 2, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for g, (num_blocks, stride) in enumerate(
        zip(BLOCKS_PER_GROUP[self.depth], GROUP_STRIDES)):
      for b in range(num_blocks):
        x = block_cls(width(64 * 2**g), stride if b == 0 else 1,
                      use_projection=(b == 0), norm=norm, conv=conv_layer,
                      sk_ratio=self.sk_ratio, se_ratio=self.se_ratio,
                      name=f"group{g + 1}_block{b + 1}")(x)
    return precision.global_average_pool(x)  # float32 [B, C]


def feature_dim(depth: int, width_multiplier: float) -> int:
  base = max(1, int(round(512 * width_multiplier)))
  return base * (4 if depth >= 50 else 1)
