"""The pretraining losses, registered by name (docs/losses.md).

Each loss is a pure function of the two views' projections (and class
labels where it reads them) over the global batch, written once for the
per-shard case: `fn(z1, z2, labels, *, axis_name, **options)`. `sharded`
runs any registered loss over a batch-sharded global array in `shard_map`
(local rows against all-gathered columns, gradients through the gather),
on Explicit and Auto meshes alike. `names()` is the one list of names:
config validation, the CLI's errors and the docs table read it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import jax
from jax.sharding import PartitionSpec as P

from jaxclr.losses import barlow_twins, infonce, npair, supcon, triplet, vicreg
# The public functions, read as losses.nt_xent_with_metrics etc.
from jaxclr.losses.common import (  # pylint: disable=unused-import
    contrast_metrics, gather_rows, l2_normalize, LARGE_NUM, matmul_t)
from jaxclr.losses.infonce import (  # pylint: disable=unused-import
    infonce_with_metrics, update_queue)
from jaxclr.losses.npair import (  # pylint: disable=unused-import
    npair_with_metrics)
from jaxclr.losses.nt_xent import (  # pylint: disable=unused-import
    nt_xent, nt_xent_with_metrics)
from jaxclr.losses.supcon import (  # pylint: disable=unused-import
    supcon_in_with_metrics, supcon_with_metrics)
from jaxclr.losses.triplet import (  # pylint: disable=unused-import
    mine_batch_hard, mine_semi_hard, mined_triplets, MININGS,
    triplet_distances, triplet_with_metrics)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A registered loss.

  fn(z1, z2, labels, *, axis_name, **options) -> (loss, metrics): z1, z2
  [n, d] this shard's rows (the global batch when axis_name is None),
  labels [n] or None (instance pairs). The loss is the global batch's,
  replicated over the shards; differentiate it and do not average its
  gradients again.
  """
  name: str
  fn: Callable
  # The keyword options fn reads, with their defaults (a method's config
  # section holds them; see methods/simclr.py).
  options: Mapping[str, Any]
  # Whether it can read class labels (views of the same class are positives).
  class_labels: bool
  summary: str  # One line, for the docs table and error messages.
  # Whether fn takes `queue`: a replicated [K, d] array of past keys.
  queue: bool = False

  def __post_init__(self):
    object.__setattr__(self, "options",
                       types.MappingProxyType(dict(self.options)))


def _nt_xent(z1, z2, labels, **kwargs):
  del labels  # Instance pairs only.
  return nt_xent_with_metrics(z1, z2, **kwargs)


_BUILTIN = (
    Loss("nt_xent", _nt_xent, {"temperature": 0.1, "hidden_norm": True},
         class_labels=False,
         summary="SimCLR's normalised temperature-scaled cross-entropy"),
    Loss("supcon", supcon.supcon_with_metrics,
         {"temperature": 0.1, "hidden_norm": True}, class_labels=True,
         summary="supervised contrastive L_out: same-class views are "
         "positives"),
    Loss("supcon_in", supcon.supcon_in_with_metrics,
         {"temperature": 0.1, "hidden_norm": True}, class_labels=True,
         summary="supervised contrastive with the positives' sum inside "
         "the log (solo-learn's)"),
    Loss("triplet_batch_hard",
         functools.partial(triplet.triplet_with_metrics, mining="batch_hard"),
         {"margin": 0.2, "hidden_norm": True}, class_labels=True,
         summary="triplet hinge, hardest positive and negative per anchor"),
    Loss("triplet_semi_hard",
         functools.partial(triplet.triplet_with_metrics, mining="semi_hard"),
         {"margin": 0.2, "hidden_norm": True}, class_labels=True,
         summary="triplet hinge, FaceNet's semi-hard negatives"),
    Loss("npair", npair.npair_with_metrics, {"embedding_l2": 0.002},
         class_labels=False, summary="multi-class N-pair (Sohn 2016) on "
         "unnormalised embeddings, with their L2 regulariser"),
    Loss("infonce", infonce.infonce_with_metrics,
         {"temperature": 0.1, "hidden_norm": True}, class_labels=False,
         summary="one-directional InfoNCE, optionally with a queue of past "
         "keys", queue=True),
    Loss("barlow_twins", barlow_twins.barlow_twins_with_metrics,
         {"barlow_lambda": 0.0051, "barlow_scale": 1.0}, class_labels=False,
         summary="Barlow Twins: cross-correlation of the views, each "
         "standardised over the global batch, pushed to the identity"),
    Loss("vicreg", vicreg.vicreg_with_metrics,
         {"invariance_weight": 25.0, "variance_weight": 25.0,
          "covariance_weight": 1.0}, class_labels=False,
         summary="VICReg: invariance, plus variance and covariance over the "
         "global batch"),
)
_REGISTRY: dict[str, Loss] = {loss.name: loss for loss in _BUILTIN}


def names() -> tuple[str, ...]:
  """Every registered loss's name, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Loss:
  """The loss called `name`; ValueError listing the registered ones."""
  if name not in _REGISTRY:
    raise ValueError(f"loss={name!r} is unknown; valid: {names()}")
  return _REGISTRY[name]


def option_defaults() -> dict[str, Any]:
  """Every registered loss's options with their (shared) defaults."""
  out: dict[str, Any] = {}
  for loss in _REGISTRY.values():
    out.update(loss.options)
  return out


def register(loss: Loss) -> Loss:
  """Adds `loss` to the registry (explicitly: nothing registers on import).

  An option another loss also reads must have the same default, since a
  method's config section holds one value per option name.
  """
  if not loss.name.isidentifier() or loss.name in _REGISTRY:
    raise ValueError(f"cannot register loss {loss.name!r}: the name must be "
                     f"a new identifier; registered: {names()}")
  shared = option_defaults()
  for option, default in loss.options.items():
    if option in shared and shared[option] != default:
      raise ValueError(
          f"loss {loss.name!r}: option {option}={default!r}, but other losses "
          f"read {option} with default {shared[option]!r}")
  _REGISTRY[loss.name] = loss
  return loss


def unregister(name: str) -> None:
  """Removes a loss added by `register` (tests; the built-in ones stay)."""
  if any(loss.name == name for loss in _BUILTIN):
    raise ValueError(f"loss {name!r} is built in")
  _REGISTRY.pop(name, None)


def sharded(name: str, z, labels=None, *, mesh, options: Mapping[str, Any],
            queue=None, data_axis: str = "data"):
  """The loss `name` over a batch-sharded global array, under jit.

  Args:
    name: a registered loss.
    z: [B, 2, D] projections, rows (image, view), sharded over data_axis;
      or the two views (z1, z2), each [B, D].
    labels: [B] class labels (-1: unlabelled) for a loss with class_labels,
      or None: the two views of an image are the positives.
    mesh: the mesh of z.
    options: option values; those the loss reads (Loss.options) are passed.
    queue: [K, D] replicated past keys, for a loss with `queue`.

  Returns:
    (loss, metrics), replicated: the global loss (differentiate it; do not
    average its gradients again) and metrics over the global batch.
  """
  loss = get(name)
  kwargs = {k: options[k] for k in loss.options}
  labels = labels if loss.class_labels else None
  queue = queue if loss.queue else None
  z1, z2 = z if isinstance(z, tuple) else (z[:, 0], z[:, 1])
  args, specs = [z1, z2], [P(data_axis), P(data_axis)]
  for extra, spec in ((labels, P(data_axis)), (queue, P())):
    if extra is not None:
      args.append(extra)
      specs.append(spec)

  def per_shard(z1, z2, *rest):
    rest = list(rest)
    shard_labels = rest.pop(0) if labels is not None else None
    extra = {"queue": rest.pop(0)} if queue is not None else {}
    return loss.fn(z1, z2, shard_labels, axis_name=data_axis, **kwargs,
                   **extra)

  return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                       out_specs=(P(), P()))(*args)


def replicated_rows(x, *, mesh, data_axis: str = "data"):
  """A batch-sharded global array, gathered whole onto every device (e.g. a
  global batch's keys for a replicated queue); Explicit and Auto meshes."""
  gather = functools.partial(jax.lax.all_gather, axis_name=data_axis,
                             tiled=True, to="invarying")
  return jax.shard_map(gather, mesh=mesh, in_specs=P(data_axis),
                       out_specs=P())(jax.lax.stop_gradient(x))
