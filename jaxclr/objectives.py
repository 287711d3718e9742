"""The pretraining losses by name, and the sharded call the train step makes.

Names and their options are listed once here (LOSSES); config_validate
keeps the same names without importing JAX (tests/metric_losses_test.py
checks that the two agree). See docs/losses.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from jaxclr import losses, metric_losses


@dataclasses.dataclass(frozen=True)
class Loss:
  # fn(z1, z2, labels, *, axis_name, **options) -> (loss, metrics); z1, z2
  # [n, d] this shard's rows, labels [n] or None (instance pairs).
  fn: Callable
  options: tuple[str, ...]  # The keyword options fn reads.
  class_labels: bool  # Whether labels (same class = positive) are read.


def _nt_xent(z1, z2, labels, **kwargs):
  del labels  # Instance pairs only.
  return losses.nt_xent_with_metrics(z1, z2, **kwargs)


LOSSES = {
    "nt_xent": Loss(_nt_xent, ("temperature", "hidden_norm"), False),
    "supcon": Loss(metric_losses.supcon_with_metrics,
                   ("temperature", "hidden_norm"), True),
    "triplet_batch_hard": Loss(
        functools.partial(metric_losses.triplet_with_metrics,
                          mining="batch_hard"), ("margin", "hidden_norm"), True),
    "triplet_semi_hard": Loss(
        functools.partial(metric_losses.triplet_with_metrics,
                          mining="semi_hard"), ("margin", "hidden_norm"), True),
    "npair": Loss(metric_losses.npair_with_metrics, ("hidden_norm",), False),
    "infonce": Loss(metric_losses.infonce_with_metrics,
                    ("temperature", "hidden_norm", "queue"), False),
}


def sharded_contrastive_loss(name: str, z, labels=None, *, mesh,
                             temperature: float = 0.1,
                             hidden_norm: bool = True, margin: float = 0.2,
                             queue=None, data_axis: str = "data"):
  """LOSSES[name] over a batch-sharded global array, under jit.

  Args:
    name: a key of LOSSES.
    z: [B, 2, D] projections, rows (image, view), sharded over data_axis.
    labels: [B] class labels (-1: unlabelled) for the losses that read them
      (class_labels), or None: the two views of an image are the positives.
    mesh: the mesh of z.
    temperature, hidden_norm, margin, queue: the options (Loss.options) of
      the losses that read them; queue [K, D] is replicated.

  Returns:
    (loss, metrics), replicated: the global loss (differentiate it; do not
    average its gradients again) and metrics over the global batch.
  """
  if name not in LOSSES:
    raise ValueError(f"loss={name!r} is unknown; valid: {sorted(LOSSES)}")
  if name == "nt_xent":  # The original path, unchanged.
    return losses.sharded_nt_xent_with_metrics(
        z[:, 0], z[:, 1], mesh=mesh, temperature=temperature,
        hidden_norm=hidden_norm, data_axis=data_axis)
  loss = LOSSES[name]
  given = {"temperature": temperature, "hidden_norm": hidden_norm,
           "margin": margin}
  options = {k: given[k] for k in loss.options if k in given}
  labels = labels if loss.class_labels else None
  queue = queue if "queue" in loss.options else None
  args, specs = [z[:, 0], z[:, 1]], [P(data_axis), P(data_axis)]
  for extra, spec in ((labels, P(data_axis)), (queue, P())):
    if extra is not None:
      args.append(extra)
      specs.append(spec)

  def per_shard(z1, z2, *rest):
    rest = list(rest)
    shard_labels = rest.pop(0) if labels is not None else None
    shard_options = dict(options, **({"queue": rest.pop(0)} if queue is not None
                                     else {}))
    return loss.fn(z1, z2, shard_labels, axis_name=data_axis, **shard_options)

  return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                       out_specs=(P(), P()))(*args)


def replicated_rows(x, *, mesh, data_axis: str = "data"):
  """A batch-sharded global array, gathered whole onto every device (e.g. a
  global batch's keys for a replicated queue); Explicit and Auto meshes."""
  gather = functools.partial(jax.lax.all_gather, axis_name=data_axis,
                             tiled=True, to="invarying")
  return jax.shard_map(gather, mesh=mesh, in_specs=P(data_axis),
                       out_specs=P())(jax.lax.stop_gradient(x))
