"""SimSiam (Chen & He 2021) as a method: the network is SimCLR's (encoder,
projection head) plus a predictor; each view's prediction is pulled to the
other view's projection, whose gradient is stopped; no momentum encoder,
no negatives, no extra state (docs/losses.md, "SimSiam").

The loss is a mean over images, so on global arrays under jit it is the
global batch's with no gather. What couples the images of a batch is
BatchNorm in the projector and predictor (SyncBatchNorm in the authors'
code): jaxclr's spans the global batch because the arrays are global, and
the layout test's negative control (tests/simsiam_test.py) shows that a
per-device BatchNorm would fail it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclr import errors, losses
from jaxclr.methods import base
from jaxclr.training import update


def simsiam_loss(p, z):
  """The symmetric negative cosine of the paper and the authors' code
  (facebookresearch/simsiam `main_simsiam.py`: -(cos(p1, z2).mean() +
  cos(p2, z1).mean()) / 2, with z = `.detach()` in `simsiam/builder.py`).

  p, z: [B, 2, D] predictions and projections of the global batch's two
  views; z's gradient is stopped here. Returns (loss, metrics):
  simsiam_output_std is the mean over dimensions of the std over the batch
  of the L2-normalised z (the paper's collapse monitor, Fig. 2: about
  1/sqrt(D) when the outputs spread, 0 when they collapse).
  """
  p = losses.l2_normalize(p.astype(jnp.float32))
  z = jax.lax.stop_gradient(losses.l2_normalize(z.astype(jnp.float32)))
  cos_12 = jnp.sum(p[:, 0] * z[:, 1], axis=-1)
  cos_21 = jnp.sum(p[:, 1] * z[:, 0], axis=-1)
  loss = -0.5 * (jnp.mean(cos_12) + jnp.mean(cos_21))
  spread = jnp.mean(jnp.std(z.reshape(-1, z.shape[-1]), axis=0))
  return loss, {"simsiam_output_std": spread}


def simsiam_step(state, batch, *, setup: base.Setup):
  """One SimSiam update on the global batch. Pure in (state, batch)."""
  def objective(views, inputs):
    del inputs
    return (*simsiam_loss(views["p"], views["z"]), ())

  new_state, metrics, _ = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn)
  return new_state, metrics


class SimSiam(base.Method):
  """SimSiam: a predictor and a stop-gradient, nothing else."""
  name = "simsiam"
  summary = ("SimSiam: each view's prediction regresses the other view's "
             "projection (stop-gradient); no momentum encoder, no negatives")
  doc = "docs/losses.md"

  def defaults(self):
    # The predictor's hidden width (a bottleneck: 512 for the paper's
    # 2048-d projections).
    return {"predictor_hidden_dim": 512}

  def check(self, opts, config) -> None:
    del config
    if not (isinstance(opts.predictor_hidden_dim, int)
            and opts.predictor_hidden_dim > 0):
      raise errors.ConfigError(
          f"simsiam.predictor_hidden_dim={opts.predictor_hidden_dim!r} must "
          "be an int > 0 (the paper's: 512)")

  def predictor_hidden_dim(self, opts) -> int:
    return opts.predictor_hidden_dim

  def train_step(self, opts, setup, state, batch):
    return simsiam_step(state, batch, setup=setup)
