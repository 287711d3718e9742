"""SimCLR and SupCon: a contrastive loss from the loss registry over the
global batch (docs/simclr.md 1, docs/losses.md).

`simclr` trains with any registered loss (`simclr.loss`, NT-Xent by
default) on instance positives (an image's two views), or on class
positives for the losses that read labels. `supcon` is the same step with
the supervised contrastive loss (L_out, or with `supcon.form='in'` the
positives' sum inside the log) and class positives. With
`simclr.queue_size > 0` (loss 'infonce') the state holds a FIFO of past
view-2 projections of the online network, used as extra negatives: a queue
without a momentum encoder, not MoCo (docs/losses.md, "InfoNCE").
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxclr import errors, losses
from jaxclr.methods import base
from jaxclr.training import state as state_lib, update
from jaxclr.training.state import TrainState

POSITIVES = ("instance", "class")
# The supcon method's `form`: the registered loss it trains with.
SUPCON_FORMS = {"out": "supcon", "in": "supcon_in"}


class QueueTrainState(TrainState):
  """InfoNCE with a negatives queue: the queue is state (and checkpointed)."""
  queue: Any  # float32 [K, D] past view-2 projections, oldest first; 0 = empty.


def _check(ok: bool, message: str):
  if not ok:
    raise errors.ConfigError(message)


def contrastive_step(state, batch, *, setup: base.Setup, loss: str,
                     options, class_labels: bool):
  """One update with the registered `loss` on the global batch; a
  QueueTrainState's queue supplies extra negatives and takes this batch's
  view-2 projections. Pure in (state, batch)."""
  queue = getattr(state, "queue", None)

  def objective(views, inputs):
    del inputs
    loss_value, metrics = losses.sharded(
        loss, views["z"], batch["labels"] if class_labels else None,
        mesh=setup.mesh, options=options, queue=queue)
    if queue is None:
      return loss_value, metrics, ()
    keys = losses.replicated_rows(views["z"][:, 1], mesh=setup.mesh)
    return loss_value, metrics, losses.update_queue(queue, keys)

  new_state, metrics, new_queue = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn)
  if queue is not None:  # A refused update keeps the old queue too.
    new_state = new_state.replace(queue=state_lib.where_applied(
        new_state.opt_state, new_queue, queue))
  return new_state, metrics


class SimCLR(base.Method):
  """SimCLR (Chen et al. 2020) with a loss chosen from the registry."""
  name = "simclr"
  summary = ("SimCLR: two views of each image are positives, the rest of "
             "the global batch negatives; loss from the loss registry")
  doc = "docs/simclr.md"

  def defaults(self):
    return {
        "loss": "nt_xent",  # A registered loss (jaxclr.losses.names()).
        # Positives: 'instance' (an image's two views) or 'class' (views of
        # the same label; losses that read labels, on labelled data).
        "positives": "instance",
        # InfoNCE's FIFO of past view-2 projections (state, checkpointed);
        # 0 = none. No momentum encoder: see the module docstring.
        "queue_size": 0,
        # Every registered loss's options: temperature, hidden_norm, margin.
        **losses.option_defaults(),
    }

  def loss_name(self, opts) -> str:
    return opts.loss

  def upgrade_saved(self, saved: dict) -> dict:
    if "embedding_l2" in saved:
      return saved
    # Before embedding_l2, N-pair had no L2 term and normalised the
    # embeddings with hidden_norm (True by default): that loss is InfoNCE at
    # temperature 1 now that N-pair follows its reference (docs/losses.md).
    upgraded = {**saved, "embedding_l2": 0.0}
    if saved.get("loss") == "npair" and saved.get("hidden_norm", True):
      upgraded.update(loss="infonce", temperature=1.0)
    return upgraded

  def reads_class_labels(self, opts) -> bool:
    return opts.positives == "class"

  def check(self, opts, config) -> None:
    del config
    section = self.name
    name = self.loss_name(opts)
    _check(name in losses.names(), f"{section}.loss={name!r} is unknown; "
           f"valid: {', '.join(losses.names())}")
    loss = losses.get(name)
    _check(opts.positives in POSITIVES,
           f"{section}.positives={opts.positives!r}; valid: {POSITIVES}")
    _check(opts.positives != "class" or loss.class_labels,
           f"{section}.positives='class' needs a loss that reads labels; "
           f"loss={name!r} pairs the two views of an image only (valid: "
           + ", ".join(n for n in losses.names() if losses.get(n).class_labels)
           + ")")
    for option in ("temperature", "margin", "barlow_scale"):
      if option in opts:
        _check(opts[option] > 0,
               f"{section}.{option}={opts[option]!r} must be > 0")
    for option in ("barlow_lambda", "invariance_weight", "variance_weight",
                   "covariance_weight"):
      if option in opts:
        _check(opts[option] >= 0,
               f"{section}.{option}={opts[option]!r} must be >= 0")
    if "embedding_l2" in opts:
      _check(opts.embedding_l2 >= 0, f"{section}.embedding_l2="
             f"{opts.embedding_l2!r} must be >= 0 (0 = no L2 term)")
    queue = opts.get("queue_size", 0)
    _check(isinstance(queue, int) and queue >= 0,
           f"{section}.queue_size={queue!r} must be an int >= 0 (0 = no "
           "queue)")
    _check(queue == 0 or loss.queue,
           f"{section}.queue_size={queue!r} is a queue of past keys, which "
           f"loss={name!r} does not read; valid with: "
           + ", ".join(n for n in losses.names() if losses.get(n).queue))

  def init_state(self, opts, setup, rng):
    state = super().init_state(opts, setup, rng)
    size = opts.get("queue_size", 0)
    if size <= 0:
      return state
    return state_lib.extend(
        state, QueueTrainState,
        queue=jnp.zeros((size, setup.embedding_dim), jnp.float32))

  def train_step(self, opts, setup, state, batch):
    return contrastive_step(
        state, batch, setup=setup, loss=self.loss_name(opts),
        options=opts, class_labels=self.reads_class_labels(opts))


class SupCon(SimCLR):
  """Supervised contrastive learning (Khosla et al. 2020), L_out: every view
  of the same class in the global batch is a positive."""
  name = "supcon"
  summary = ("SupCon: views of the same class are positives (reads the "
             "labels; not self-supervised)")
  doc = "docs/losses.md"

  def defaults(self):
    supcon = losses.get("supcon")
    # form: 'out' (L_out, the paper's, loss 'supcon') or 'in' (the
    # positives' sum inside the log, as solo-learn trains: loss 'supcon_in').
    return {"positives": "class", "form": "out", **supcon.options}

  def check(self, opts, config) -> None:
    _check(opts.form in SUPCON_FORMS,
           f"{self.name}.form={opts.form!r}; valid: "
           f"{', '.join(repr(f) for f in SUPCON_FORMS)}")
    super().check(opts, config)

  def upgrade_saved(self, saved: dict) -> dict:
    return saved  # form's default, 'out', is what SupCon always computed.

  def loss_name(self, opts) -> str:
    return SUPCON_FORMS[opts.form]
