"""The pretraining objective's config rules (docs/losses.md): method, loss,
positives, and each method's own fields. Part of `config_lib.validate`;
imports no JAX."""

from __future__ import annotations

from jaxclr.config_checks import check as _check
from jaxclr.config_checks import positive as _positive

# Pretraining objectives (docs/losses.md). LOSS_NAMES are the keys of
# jaxclr.objectives.LOSSES, kept here so that validation imports no JAX.
METHODS = ("simclr", "supcon", "byol", "nnclr")
LOSS_NAMES = ("nt_xent", "supcon", "triplet_batch_hard", "triplet_semi_hard",
              "npair", "infonce")
CLASS_LABEL_LOSSES = ("supcon", "triplet_batch_hard", "triplet_semi_hard")
LOSS_LABELS = ("instance", "class")


def loss_setup(config) -> tuple[str, bool]:
  """(loss name, whether it reads class labels) of a valid pretrain config.

  method='supcon' trains with loss 'supcon' (loss may stay at its default
  'nt_xent'); loss_labels=None means 'class' for supcon, else 'instance'.
  """
  loss = "supcon" if config.method == "supcon" else config.loss
  labels = config.loss_labels or ("class" if loss == "supcon" else "instance")
  return loss, labels == "class"


def check_loss_labels(config, num_classes: int) -> None:
  """ConfigError if the loss needs class labels and the training split has
  none (num_classes == 0): checked once the source is open, before any
  compilation. validate() already refuses the cases known from the config."""
  loss, class_labels = loss_setup(config)
  _check(not class_labels or num_classes > 0,
         f"loss={loss!r} with class labels needs a labelled dataset, but "
         f"dataset={config.dataset!r} has no labels; use a labelled dataset "
         "or --config.loss_labels=instance (the two views of an image as "
         "positives)")


def check_objective(config):
  method, loss = config.method, config.loss
  _check(method in METHODS,
         f"method={method!r} is unknown; valid: {METHODS}")
  _check(loss in LOSS_NAMES, f"loss={loss!r} is unknown; valid: {LOSS_NAMES}")
  if method in ("byol", "nnclr"):
    _check_predictor_method(config)
  _check(method != "supcon" or loss in ("nt_xent", "supcon"),
         f"method='supcon' trains with loss 'supcon', not loss={loss!r}; "
         "leave loss at its default or use method='simclr'")
  _check(config.loss_labels is None or config.loss_labels in LOSS_LABELS,
         f"loss_labels={config.loss_labels!r}; valid: None, {LOSS_LABELS}")
  loss, class_labels = loss_setup(config)
  _check(not class_labels or loss in CLASS_LABEL_LOSSES,
         f"loss={loss!r} pairs the two views of an image only; "
         f"loss_labels='class' works with {CLASS_LABEL_LOSSES}")
  _positive("temperature", config.temperature)
  _positive("triplet_margin", config.triplet_margin)
  queue = config.infonce_queue_size
  _check(isinstance(queue, int) and queue >= 0,
         f"infonce_queue_size={queue!r} must be an int >= 0 (0 = no queue)")
  _check(queue == 0 or loss == "infonce",
         f"infonce_queue_size={queue!r} is InfoNCE's negatives queue, but "
         f"loss={loss!r}; set loss='infonce' or infonce_queue_size=0")
  if class_labels:
    _check_has_labels(config, loss)


def _check_predictor_method(config):
  """BYOL and NNCLR have their own objectives: the loss fields must stay at
  their defaults."""
  method = config.method
  _check(config.loss == "nt_xent" and config.loss_labels is None,
         f"method={method!r} has its own loss, not loss={config.loss!r} / "
         f"loss_labels={config.loss_labels!r}; leave both at their defaults "
         "or use method='simclr'")
  _positive("predictor_hidden_dim", config.predictor_hidden_dim)
  if method == "byol":
    _check(0.0 <= config.byol_tau_base <= 1.0,
           f"byol_tau_base={config.byol_tau_base!r} must be in [0, 1] (BYOL: "
           "0.99 at B=256, 0.996 at B=4096)")
  else:
    k, b = config.nnclr_queue_size, config.batch_size
    _check(isinstance(k, int) and k > 0 and k % b == 0,
           f"nnclr_queue_size={k!r} must be a positive multiple of "
           f"batch_size={b} (the support set is a FIFO of whole global "
           f"batches), e.g. {max(1, 65536 // b) * b}")


def _check_has_labels(config, loss: str):
  """The unlabelled training sets known from the config alone; the others
  are refused by check_loss_labels once the source is open."""
  from jaxclr.data import sources  # pylint: disable=g-import-not-at-top
  if config.dataset == "synthetic":
    check_loss_labels(config, config.synthetic.num_classes)
  elif config.dataset in sources.TFDS_DEFAULT_SPLITS:
    split = config.train_split or sources.TFDS_DEFAULT_SPLITS[config.dataset][0]
    _check((config.dataset, split) not in sources.LABELLED_INSTEAD_OF,
           f"loss={loss!r} with class labels needs labelled training "
           f"examples, but dataset={config.dataset!r} split {split!r} is "
           "unlabelled; set train_split to a labelled split or "
           "--config.loss_labels=instance")
