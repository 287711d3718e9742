"""Projection head and linear classifier (docs/simclr.md 5.5, 5.6)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxclr.models import precision
from jaxclr.models.resnet import make_batch_norm

# Both heads use N(0, 0.01) kernels, as the official code does.
head_kernel_init = nn.initializers.normal(stddev=0.01)


class ProjectionHead(nn.Module):
  """[Dense(no bias) -> BN -> ReLU] x (L-1) -> Dense(out, no bias) -> BN(no beta).

  num_layers=3 is SimCLRv2's head, 2 is SimCLRv1's. Returns every layer's
  output, [out_0, ..., out_{L-1}], so fine-tuning can pick an intermediate
  layer (SimCLRv2's ft_proj_selector); the last one is z. hidden_dim 0 keeps
  the input's width (SimCLR); BYOL's projector and predictor are 4096 wide.
  output_bn=False ends on the plain Dense (BYOL's predictor). In bfloat16
  the Dense layers compute in bfloat16 with float32 kernel gradients, and
  the last BatchNorm's output (z) is float32 (models/precision.py).
  """
  num_layers: int = 3
  out_dim: int = 128
  hidden_dim: int = 0
  output_bn: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, train: bool):
    norm = make_batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    outputs = []
    x = h
    mid_dim = self.hidden_dim or h.shape[-1]
    for j in range(self.num_layers - 1):
      x = precision.Dense(mid_dim, use_bias=False, dtype=self.dtype,
                          kernel_init=head_kernel_init, name=f"dense{j}")(x)
      x = nn.relu(norm(name=f"bn{j}")(x))
      outputs.append(x)
    last = self.num_layers - 1
    x = precision.Dense(self.out_dim, use_bias=False, dtype=self.dtype,
                        kernel_init=head_kernel_init, name=f"dense{last}")(x)
    if self.output_bn:
      # z leaves in FEATURE_DTYPE: no bfloat16 rounding of the embedding.
      x = norm(use_bias=False, dtype=precision.FEATURE_DTYPE,
               name=f"bn{last}")(x)
    outputs.append(x)
    return outputs


class LinearHead(nn.Module):
  """Dense(num_classes) with bias, no BN: the (online) linear probe."""
  num_classes: int
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.zero_init else head_kernel_init
    return nn.Dense(self.num_classes, kernel_init=init,
                    param_dtype=precision.PARAM_DTYPE,
                    dtype=precision.FEATURE_DTYPE)(
                        x.astype(precision.FEATURE_DTYPE))
