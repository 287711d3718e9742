"""What a pretraining method is to the rest of jaxclr (docs/adding_a_method.md).

A method is one `Method` subclass in one module: its name, its config
section (`config.<name>`, defaults and rules), the model parts it adds (a
predictor), its extra state (an EMA target, a support set, a queue: a
`TrainState` subclass, so it is checkpointed and resumed with the rest) and
its step, built on `jaxclr.training.update.model_update`. The pretraining
job reads all of that through the registry (jaxclr/methods/__init__.py);
nothing else in jaxclr names a method.

A method receives its hyperparameters as `opts`, its config section frozen
(`ml_collections.FrozenConfigDict`: read-only, hashable), and what the job
decided once as a `Setup`. Both are plain Python values outside the traced
computation: a step reads them while tracing, never inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

from jaxclr.models import heads
from jaxclr.training import optim, update
from jaxclr.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the pretraining job builds once and every method's state and step
  are made from."""
  model: nn.Module  # The online network, with the method's parts.
  optimizer: optim.Optimizer
  mesh: Any  # jax.sharding.Mesh of the global batch ('data' axis).
  plan: optim.TrainingPlan  # Steps, steps per epoch, batch size.
  image_size: int
  embedding_dim: int  # The projection head's output width (z).
  weight_decay: float  # The online probe's L2 (model_update adds it).
  # (images [B, 2, H, W, 3], color_params) -> images: colour and blur on the
  # accelerator (augment.on_device), or None when the host did them.
  augment_fn: Callable | None
  # (predictor_hidden_dim=0, num_classes=0, prototypes=None) -> a network of
  # the run's architecture, e.g. a method's target network without
  # predictor or probe.
  build_network: Callable[..., nn.Module]


class Method:
  """Base class of the pretraining methods; subclasses set `name`,
  `summary` and `defaults`, and override `train_step` (and `init_state`,
  `check`, ... where they differ from the plain SimCLR-shaped network)."""
  name: str = ""  # Registry key and config section: config.<name>.
  summary: str = ""  # One line: the docs table and the CLI's errors.
  # Where the formula and recipe are documented (docs/...#anchor).
  doc: str = "docs/methods.md"

  def defaults(self) -> Mapping[str, Any]:
    """The config section `config.<name>` with its defaults."""
    return {}

  def check(self, opts, config) -> None:
    """Raises errors.ConfigError (one line naming the bad value and what is
    valid) for a bad value of this method's section; `config` is the whole
    (unfrozen) pretraining config, for rules across sections. Plain Python:
    runs before any data or compilation."""

  def upgrade_saved(self, saved: dict) -> dict:
    """This method's section as an older jaxclr saved it (config.json of a
    workdir), in today's fields and computing what that run computed: a
    field added since, whose default changes the method, gets the value the
    run had (config/legacy.py). Plain dicts; a section saved by today's
    jaxclr is returned as it is."""
    return saved

  def loss_name(self, opts) -> str:
    """What the logged `loss` is, for plots and reports."""
    del opts
    return self.name

  def reads_class_labels(self, opts) -> bool:
    """Whether the step reads batch['labels'] as positives (the training
    split must then be labelled)."""
    del opts
    return False

  def predictor_hidden_dim(self, opts) -> int:
    """> 0: the network gets a predictor (2-layer MLP to z's width) of this
    hidden width, as out['p']."""
    del opts
    return 0

  def prototypes(self, opts) -> heads.PrototypeSpec | None:
    """A prototype layer on z (SwAV, DINO): the network's
    out['prototype_scores'], cosines with this many prototypes."""
    del opts
    return None

  def reads_local_crops(self, opts) -> bool:
    """Whether the step reads multi-crop local views (augment.
    num_local_crops > 0): model_update then gives it views['local_*']
    [B, k, ...]. Validation refuses local crops for any other method."""
    del opts
    return False

  def init_state(self, opts, setup: Setup, rng) -> TrainState:
    """A fresh state (pure: the job jits it with out_shardings). Methods
    with extra state return a TrainState subclass holding it."""
    del opts
    return update.init_train_state(rng, model=setup.model,
                                   optimizer=setup.optimizer,
                                   image_size=setup.image_size)

  def train_step(self, opts, setup: Setup, state: TrainState, batch):
    """One update on the global batch: (state, batch) -> (state, metrics),
    pure in (state, batch); the job jits it with the state donated.

    batch: images [B, 2, H, W, 3] (float in [0, 1], or uint8), labels [B]
    (-1 = unlabelled), example_ids [B], and color_params with device
    augmentation; local_images [B, k, h, h, 3] (and local_color_params)
    with multi-crop. Build it on update.model_update; a refused (non-finite)
    update must leave the extra state as it was (state.where_applied).
    """
    raise NotImplementedError(f"method {self.name!r} has no train_step")
