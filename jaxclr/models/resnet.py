"""ResNet v1.5 encoder as SimCLR builds it (docs/simclr.md section 5.1).

Post-activation blocks with the stride on the 3x3 conv, no conv biases,
fan-in truncated-normal init (scale 1, not He's 2), the last BN of every
residual branch initialised with gamma = 0, and a projection shortcut in the
first block of every group (also group 1 of the basic-block nets, unlike
torchvision). BatchNorm computes its statistics over whatever batch it sees:
under jit with a batch-sharded global array that is the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

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
  # Two-pass variance: the default E[x^2]-E[x]^2 cancels on image-like
  # activations and makes the step depend on the device layout.
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype,
                           param_dtype=jnp.float32, use_fast_variance=False)


class FixedPaddingConv(nn.Module):
  """Conv without bias; pads (k-1)//2 before and the rest after, then VALID.

  Matches conv2d_fixed_padding for strided convs (so the output grid does not
  depend on the input size's parity) and equals 'SAME' for stride 1.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
    return lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        (self.strides, self.strides), (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BasicBlock(nn.Module):
  filters: int
  strides: int
  use_projection: bool
  norm: Callable[..., nn.Module]
  conv: Callable[..., nn.Module]  # FixedPaddingConv with dtype bound.

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.use_projection:
      shortcut = self.conv(self.filters, 1, self.strides, name="proj_conv")(x)
      shortcut = self.norm(name="proj_bn")(shortcut)
    y = self.conv(self.filters, 3, self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, 3, 1, name="conv2")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  use_projection: bool
  norm: Callable[..., nn.Module]
  conv: Callable[..., nn.Module]  # FixedPaddingConv with dtype bound.

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.use_projection:
      shortcut = self.conv(4 * self.filters, 1, self.strides,
                           name="proj_conv")(x)
      shortcut = self.norm(name="proj_bn")(shortcut)
    y = self.conv(self.filters, 1, 1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, 3, self.strides, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(4 * self.filters, 1, 1, name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Returns h, the globally average-pooled final features [B, C]."""
  depth: int = 50
  width_multiplier: float = 1.0
  cifar_stem: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depth not in BLOCKS_PER_GROUP:
      raise ValueError(f"ResNet depth {self.depth} not in "
                       f"{sorted(BLOCKS_PER_GROUP)}")
    norm = make_batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    conv_layer = functools.partial(FixedPaddingConv, dtype=self.dtype)
    block_cls = BasicBlock if self.depth < 50 else BottleneckBlock
    width = lambda f: max(1, int(round(f * self.width_multiplier)))
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv_layer(width(64), 3, 1, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    else:
      x = conv_layer(width(64), 7, 2, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for g, (num_blocks, stride) in enumerate(
        zip(BLOCKS_PER_GROUP[self.depth], GROUP_STRIDES)):
      for b in range(num_blocks):
        x = block_cls(width(64 * 2**g), stride if b == 0 else 1,
                      use_projection=(b == 0), norm=norm, conv=conv_layer,
                      name=f"group{g + 1}_block{b + 1}")(x)
    return jnp.mean(x, axis=(1, 2))


def feature_dim(depth: int, width_multiplier: float) -> int:
  base = max(1, int(round(512 * width_multiplier)))
  return base * (4 if depth >= 50 else 1)
