"""The SimCLR network: encoder f, projection head g, optional online probe."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxclr.models import conv as conv_lib, precision
from jaxclr.models.heads import (LinearHead, ProjectionHead, Prototypes,
                                 PrototypeSpec)
from jaxclr.models.resnet import ResNet


class SimCLRModel(nn.Module):
  """images [B, H, W, 3] -> dict(h, proj (list per head layer), z, logits, p,
  prototype_scores).

  `logits` (the online linear probe, TF2's lineareval_while_pretraining) sees
  stop_gradient(h), so it never shapes the representation. `p` is the
  predictor's output q(z) of the methods that have one (BYOL, NNCLR).
  `prototype_scores` [B, K]: cosines of z with the prototypes of the
  methods that have them (SwAV, DINO).
  """
  encoder: ResNet
  projection_head: ProjectionHead
  num_classes: int = 0  # 0: no probe.
  predictor: ProjectionHead | None = None
  prototypes: Prototypes | None = None

  @nn.compact
  def __call__(self, images, train: bool):
    h = self.encoder(images, train=train)
    proj = self.projection_head(h, train=train)
    # h and z in FEATURE_DTYPE (float32) whatever the compute dtype
    # (models/precision.py); the casts are no-ops for the ResNet and head.
    out = {"h": h.astype(precision.FEATURE_DTYPE), "proj": proj,
           "z": proj[-1].astype(precision.FEATURE_DTYPE)}
    if self.num_classes > 0:
      out["logits"] = LinearHead(self.num_classes, name="linear_head")(
          jax.lax.stop_gradient(out["h"]))
    if self.predictor is not None:
      out["p"] = self.predictor(proj[-1], train=train)[-1].astype(
          precision.FEATURE_DTYPE)
    if self.prototypes is not None:
      out["prototype_scores"] = self.prototypes(out["z"])
    return out


def uses_cifar_stem(model_config, image_size: int) -> bool:
  if model_config.cifar_stem is None:
    return image_size <= 32
  return bool(model_config.cifar_stem)


def build_encoder(model_config, image_size: int,
                  conv: conv_lib.ConvFn | None = None) -> ResNet:
  """The ResNet of `model_config`; conv: the convolution to build it with
  (None: XLA's), decided by the job (jaxclr/cpu: job_convolution)."""
  return ResNet(depth=model_config.depth,
                width_multiplier=model_config.width_multiplier,
                cifar_stem=uses_cifar_stem(model_config, image_size),
                bn_momentum=model_config.bn_momentum,
                bn_epsilon=model_config.bn_epsilon,
                dtype=precision.compute_dtype(model_config.compute_dtype),
                # Absent from configs and exports older than the fields.
                sk_ratio=model_config.get("sk_ratio") or 0.0,
                se_ratio=model_config.get("se_ratio") or 0.0,
                remat=bool(model_config.get("remat") or False),
                conv=conv or conv_lib.conv2d,
                name="encoder")


def build_model(config, num_classes: int, predictor_hidden_dim: int = 0,
                conv: conv_lib.ConvFn | None = None,
                prototypes: PrototypeSpec | None = None) -> SimCLRModel:
  """The pretraining network for `config`; num_classes > 0 adds the probe,
  predictor_hidden_dim > 0 the predictor (a 2-layer MLP to proj_out_dim
  with no BN on its output, as BYOL's); conv as build_encoder's;
  prototypes: a prototype layer on z (SwAV, DINO)."""
  m = config.model
  dtype: Any = precision.compute_dtype(m.compute_dtype)
  # .get: configs written before the field keep the input's width.
  head = ProjectionHead(num_layers=m.num_proj_layers, out_dim=m.proj_out_dim,
                        hidden_dim=m.get("proj_hidden_dim") or 0,
                        output_norm=m.get("proj_output_norm") or "bn",
                        bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
                        dtype=dtype, name="projection_head")
  predictor = None
  if predictor_hidden_dim > 0:
    predictor = ProjectionHead(
        num_layers=2, out_dim=m.proj_out_dim, hidden_dim=predictor_hidden_dim,
        output_norm="none", bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
        dtype=dtype, name="predictor")
  proto = None
  if prototypes is not None:
    proto = Prototypes(num_prototypes=prototypes.count,
                       weight_norm=prototypes.weight_norm, name="prototypes")
  return SimCLRModel(encoder=build_encoder(m, config.image_size, conv),
                     projection_head=head,
                     num_classes=num_classes, predictor=predictor,
                     prototypes=proto)
