"""Projection head and linear classifier (docs/simclr.md 5.5, 5.6)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclr.models import precision
from jaxclr.models.resnet import make_batch_norm

# Both heads use N(0, 0.01) kernels, as the official code does.
head_kernel_init = nn.initializers.normal(stddev=0.01)

# What ends the projection head (model.proj_output_norm): 'bn', BN with a
# learned scale and no offset (SimCLR); 'bn_no_affine', BN with neither
# (PyTorch's BatchNorm1d(affine=False): SimSiam's projector); 'none', the
# last Dense's output as it is (Barlow Twins, VICReg, whose losses read the
# scale of z; BYOL's predictor).
OUTPUT_NORMS = ("bn", "bn_no_affine", "none")


class ProjectionHead(nn.Module):
  """[Dense(no bias) -> BN -> ReLU] x (L-1) -> Dense(out, no bias) -> BN(no beta).

  num_layers=3 is SimCLRv2's head, 2 is SimCLRv1's. Returns every layer's
  output, [out_0, ..., out_{L-1}], so fine-tuning can pick an intermediate
  layer (SimCLRv2's ft_proj_selector); the last one is z. hidden_dim 0 keeps
  the input's width (SimCLR); BYOL's projector and predictor are 4096 wide.
  output_norm (OUTPUT_NORMS) is the last BN's kind, or 'none' to end on the
  plain Dense (BYOL's predictor). In bfloat16 the Dense layers compute in
  bfloat16 with float32 kernel gradients, and z leaves in float32
  (models/precision.py).
  """
  num_layers: int = 3
  out_dim: int = 128
  hidden_dim: int = 0
  output_norm: str = "bn"
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
    if self.output_norm not in OUTPUT_NORMS:
      raise ValueError(f"output_norm={self.output_norm!r}; valid: "
                       f"{OUTPUT_NORMS}")
    if self.output_norm == "none":
      x = x.astype(precision.FEATURE_DTYPE)
    else:
      # z leaves in FEATURE_DTYPE: no bfloat16 rounding of the embedding.
      x = norm(use_bias=False, use_scale=self.output_norm == "bn",
               dtype=precision.FEATURE_DTYPE,
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


@dataclasses.dataclass(frozen=True)
class PrototypeSpec:
  """What a method asks of the network's prototype layer (Method.prototypes):
  `count` prototypes; weight_norm as `Prototypes.weight_norm`."""
  count: int
  weight_norm: bool


# PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): how SwAV's
# prototypes and DINO's last layer start.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                     "uniform")


class Prototypes(nn.Module):
  """Cosine scores of the projections against K prototypes: unit(x) @ W.

  W [D, K] holds a prototype per column. weight_norm=True divides each
  column by its norm inside the layer, so gradients flow through the
  normalisation: DINO's weight-normalised last layer with its gain fixed
  at 1 (facebookresearch/dino vision_transformer.py DINOHead,
  norm_last_layer=True). False uses W as given: SwAV normalises the
  prototypes in place before each step instead (facebookresearch/swav
  main_swav.py), so they enter as unit vectors and the gradient is the
  plain linear layer's. Float32 at full precision, whatever the network's
  compute dtype: these scores are the losses' logits.
  """
  num_prototypes: int
  weight_norm: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    # F.normalize's x / max(|x|, 1e-12).
    x = x * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
    kernel = self.param("kernel", torch_linear_init,
                        (x.shape[-1], self.num_prototypes), jnp.float32)
    if self.weight_norm:
      kernel = kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0))
    return jnp.einsum("...d,dk->...k", x, kernel,
                      precision=jax.lax.Precision.HIGHEST)
