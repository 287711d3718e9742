"""VICReg (Bardes et al. 2022) as a method: the network is SimCLR's
(encoder, projection head), the loss the registered `vicreg`, with its
variance and covariance over the global batch, and there is no extra state
(docs/losses.md, "VICReg").

The recipes end the projector on its last Dense (model.proj_output_norm=
'none'), as the authors' projector does: a BatchNorm there would set the
standard deviation the variance term is about.
"""

from __future__ import annotations

from jaxclr import errors, losses
from jaxclr.methods import base, simclr

LOSS = "vicreg"
WEIGHTS = ("invariance_weight", "variance_weight", "covariance_weight")


class VICReg(base.Method):
  """VICReg: invariance, variance and covariance regularisation."""
  name = "vicreg"
  summary = ("VICReg: the views' mean squared difference, plus a hinge on "
             "each dimension's std and a penalty on the covariances, both "
             "over the global batch")
  doc = "docs/losses.md"

  def defaults(self):
    # lambda, mu, nu of the paper: 25, 25, 1.
    return dict(losses.get(LOSS).options)

  def loss_name(self, opts) -> str:
    del opts
    return LOSS

  def check(self, opts, config) -> None:
    for weight in WEIGHTS:
      if not opts[weight] >= 0:
        raise errors.ConfigError(
            f"vicreg.{weight}={opts[weight]!r} must be >= 0 (published: "
            "invariance 25, variance 25, covariance 1)")
    if config.batch_size < 2:
      raise errors.ConfigError(
          f"method='vicreg' with batch_size={config.batch_size}: the "
          "variance and covariance divide by batch_size - 1, so it must be "
          ">= 2")

  def train_step(self, opts, setup, state, batch):
    return simclr.contrastive_step(state, batch, setup=setup, loss=LOSS,
                                   options=opts, class_labels=False)
