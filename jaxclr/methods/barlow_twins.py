"""Barlow Twins (Zbontar et al. 2021) as a method: the network is SimCLR's
(encoder, projection head), the loss the registered `barlow_twins`, over
the global batch, and there is no extra state (docs/losses.md, "Barlow
Twins").

The recipes end the projector on its last Dense (model.proj_output_norm=
'none'), as the authors' projector does: the loss standardises each view
itself, over the global batch.
"""

from __future__ import annotations

from jaxclr import errors, losses
from jaxclr.methods import base, simclr

LOSS = "barlow_twins"


class BarlowTwins(base.Method):
  """Barlow Twins: the views' cross-correlation is pushed to the identity."""
  name = "barlow_twins"
  summary = ("Barlow Twins: the cross-correlation of the two views, each "
             "standardised over the global batch, pushed to the identity")
  doc = "docs/losses.md"

  def defaults(self):
    # barlow_lambda: weight of the off-diagonal terms (0.0051, the authors'
    # code at d = 8192); barlow_scale: multiplies the loss (1 in the
    # authors' code, 0.1 in solo-learn's CIFAR recipe).
    return dict(losses.get(LOSS).options)

  def loss_name(self, opts) -> str:
    del opts
    return LOSS

  def check(self, opts, config) -> None:
    if not opts.barlow_lambda >= 0:
      raise errors.ConfigError(
          f"barlow_twins.barlow_lambda={opts.barlow_lambda!r} must be >= 0 "
          "(the authors': 0.0051)")
    if not opts.barlow_scale > 0:
      raise errors.ConfigError(
          f"barlow_twins.barlow_scale={opts.barlow_scale!r} must be > 0 "
          "(the authors': 1.0)")
    if config.batch_size < 2:
      raise errors.ConfigError(
          f"method='barlow_twins' with batch_size={config.batch_size}: the "
          "loss standardises over the batch, which needs batch_size >= 2")

  def train_step(self, opts, setup, state, batch):
    return simclr.contrastive_step(state, batch, setup=setup, loss=LOSS,
                                   options=opts, class_labels=False)
