"""DINO (Caron et al. 2021) as a plug-in of the pretraining job: the student
matches an EMA teacher's centred, sharpened distribution over K prototypes,
across multi-crop views (docs/methods.md, "DINO").

Student: the online network (encoder, projection head, and a prototype
layer weight-normalised with its gain fixed at 1, DINO's last layer);
its params are the state's, so evaluation and export read the student's
encoder unchanged. Teacher: the same three parts in DinoTrainState.target,
an exponential moving average of the student's weights on BYOL's cosine
schedule (byol.target_tau, equal to main_dino.py's cosine_scheduler from
tau_base to 1); it sees the two global crops only and runs in training
mode, so its BatchNorm uses the global batch's statistics and its running
statistics come from its own passes, as in the reference.

The centre (DinoTrainState.center, [K]) is an EMA of the teacher's mean
output over the global batch: each shard's sum is all-reduced (psum) inside
the loss's shard_map, as main_dino.py's DINOLoss.update_center all-reduces
it. Both are checkpointed with the state: exact resume holds.

Reference: facebookresearch/dino main_dino.py (DINOLoss, train_one_epoch),
utils.py (cosine_scheduler, cancel_gradients_last_layer),
vision_transformer.py (DINOHead); cross-checked with vturrisi/solo-learn
solo/losses/dino.py.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxclr import errors
from jaxclr.methods import base, byol, prototypes as prototypes_lib
from jaxclr.models import heads
from jaxclr.training import state as state_lib, update
from jaxclr.training.state import TrainState

# The parts of the student the teacher mirrors.
TEACHER_PARTS = byol.TARGET_PARTS + (prototypes_lib.PART,)


class DinoTrainState(TrainState):
  # {"params": {encoder, projection_head, prototypes},
  #  "batch_stats": {encoder, projection_head}}.
  target: Any
  center: Any  # float32 [K].


def teacher_temperature(step, *, steps_per_epoch: int, warmup: float,
                        final: float, warmup_epochs: int):
  """main_dino.py's schedule: np.linspace(warmup, final, W)[epoch] during
  the first W = warmup_epochs epochs, then final (it changes per epoch, not
  per step)."""
  epoch = jnp.asarray(step, jnp.int32) // max(int(steps_per_epoch), 1)
  ramp = warmup + (final - warmup) * epoch / max(warmup_epochs - 1, 1)
  return jnp.where(epoch < warmup_epochs, ramp, final).astype(jnp.float32)


def batch_center(teacher, axis_name):
  """The teacher's mean output over the global batch's global crops:
  [n, 2, K] -> [K]; this shard's sum is all-reduced over axis_name."""
  total = jnp.sum(teacher, axis=(0, 1))
  count = teacher.shape[0] * teacher.shape[1]
  if axis_name is not None:
    total = lax.psum(total, axis_name)
    count = count * lax.axis_size(axis_name)
  return total / count


def dino_loss(student, teacher, center, temperature, *,
              student_temperature: float, center_momentum: float,
              axis_name=None):
  """DINO's loss and the new centre, for one shard's rows.

  Args:
    student: [n, V, K] student scores of the V = 2 + k crops of each image,
      the two global crops first.
    teacher: [n, 2, K] teacher scores of the two global crops.
    center: [K] the centre before this step (replicated).
    temperature: the teacher's temperature at this step (a scalar).
    axis_name: the data axis inside shard_map (rows are this shard's), or
      None (the arrays are the global batch).

  Returns:
    (loss, metrics, new centre), each the global batch's: the mean over
    every (teacher global crop t, student crop v != t) pair of the mean over
    images of H(softmax((teacher_t - c) / temperature),
    softmax(student_v / student_temperature)).
  """
  student = student.astype(jnp.float32)
  teacher = lax.stop_gradient(teacher.astype(jnp.float32))
  num_views = student.shape[1]
  log_p = jax.nn.log_softmax(student / student_temperature, axis=-1)
  log_q = jax.nn.log_softmax((teacher - center) / temperature, axis=-1)
  q = jnp.exp(log_q)  # [n, 2, K]
  # [2, V]: the cross-entropy of each (teacher crop, student crop) pair,
  # averaged over this shard's images.
  ce = -jnp.einsum("ntk,nvk->tv", q, log_p,
                   precision=lax.Precision.HIGHEST) / student.shape[0]
  pairs = 1.0 - jnp.eye(2, num_views)  # Not a crop against itself.
  loss = jnp.sum(ce * pairs) / jnp.sum(pairs)
  entropy = -jnp.mean(jnp.sum(q * log_q, axis=-1))
  new_center = (center * center_momentum +
                batch_center(teacher, axis_name) * (1.0 - center_momentum))
  if axis_name is not None:  # Equal shards: the mean of means is global.
    loss, entropy = lax.pmean((loss, entropy), axis_name)
  return loss, {"dino_teacher_entropy": entropy}, new_center


def sharded_dino_loss(student, teacher, center, temperature, *, mesh,
                      student_temperature: float, center_momentum: float,
                      data_axis: str = "data"):
  """dino_loss over batch-sharded global arrays, under jit; Explicit and
  Auto meshes alike (shard_map states its own sharding)."""
  fn = functools.partial(dino_loss, student_temperature=student_temperature,
                         center_momentum=center_momentum, axis_name=data_axis)
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(P(data_axis), P(data_axis), P(), P()),
      out_specs=(P(), P(), P()))(student, teacher, center, temperature)


def dino_step(state: DinoTrainState, batch, *, setup: base.Setup,
              teacher_model: nn.Module, opts):
  """One DINO update on the global batch. Pure in (state, batch)."""
  plan = setup.plan
  num_images = batch["labels"].shape[0]
  temperature = teacher_temperature(
      state.step, steps_per_epoch=plan.steps_per_epoch,
      warmup=opts.warmup_teacher_temperature,
      final=opts.teacher_temperature,
      warmup_epochs=opts.warmup_teacher_temperature_epochs)

  def objective(views, inputs):
    teacher_out, teacher_vars = teacher_model.apply(
        state.target, inputs, train=True, mutable=["batch_stats"])
    teacher = teacher_out["prototype_scores"].reshape((num_images, 2, -1))
    loss, metrics, center = sharded_dino_loss(
        update.all_crops(views, "prototype_scores"), teacher, state.center,
        temperature, mesh=setup.mesh,
        student_temperature=opts.student_temperature,
        center_momentum=opts.center_momentum)
    return loss, metrics, (center, teacher_vars["batch_stats"])

  new_state, metrics, (center, teacher_stats) = update.model_update(
      state, batch, model=setup.model, optimizer=setup.optimizer,
      weight_decay=setup.weight_decay, objective=objective,
      augment_fn=setup.augment_fn)
  # The last layer stays as it was for the first epoch(s).
  new_state = prototypes_lib.keep_part(
      new_state, state, state.step < prototypes_lib.frozen_steps(
          opts.freeze_last_layer_epochs, plan.steps_per_epoch))
  tau = byol.target_tau(state.step, plan.total_steps, opts.tau_base)
  student = byol.target_part({"params": new_state.params, "batch_stats": {}},
                             TEACHER_PARTS)["params"]
  target = {"params": byol.ema_update(state.target["params"], student, tau),
            "batch_stats": teacher_stats}
  # A refused (non-finite) update leaves the teacher and centre too.
  target, center = state_lib.where_applied(
      new_state.opt_state, (target, center), (state.target, state.center))
  return new_state.replace(target=target, center=center), {
      **metrics, "dino_tau": tau, "dino_teacher_temperature": temperature}


def _check(ok: bool, message: str):
  if not ok:
    raise errors.ConfigError(message)


class DINO(base.Method):
  """DINO: self-distillation from an EMA teacher, centred and sharpened."""
  name = "dino"
  summary = ("DINO: the student matches an EMA teacher's centred, sharpened "
             "softmax over prototypes across multi-crop views; no negatives")
  doc = "docs/losses.md"

  def defaults(self):
    # The DINO paper's values (section 3.1 and appendix): main_dino.py's own
    # defaults differ for the teacher temperature (0.04 without warm-up).
    return {
        "num_prototypes": 65536,  # K, main_dino.py's out_dim.
        "student_temperature": 0.1,
        # Linear warm-up per epoch from warmup_teacher_temperature to
        # teacher_temperature over the first warmup_..._epochs epochs.
        "teacher_temperature": 0.07,
        "warmup_teacher_temperature": 0.04,
        "warmup_teacher_temperature_epochs": 30,
        "center_momentum": 0.9,
        # Teacher EMA rate, cosine from tau_base to 1 over the run.
        "tau_base": 0.996,
        # Epochs during which the prototype (last) layer is frozen.
        "freeze_last_layer_epochs": 1.0,
    }

  def check(self, opts, config) -> None:
    del config
    k = opts.num_prototypes
    _check(isinstance(k, int) and k > 0,
           f"dino.num_prototypes={k!r} must be an int > 0 (DINO: 65536)")
    for name in ("student_temperature", "teacher_temperature",
                 "warmup_teacher_temperature"):
      _check(opts[name] > 0, f"dino.{name}={opts[name]!r} must be > 0")
    w = opts.warmup_teacher_temperature_epochs
    _check(isinstance(w, int) and w >= 0,
           f"dino.warmup_teacher_temperature_epochs={w!r} must be an int >= "
           "0 (epochs; 0 = teacher_temperature from the start)")
    for name in ("center_momentum", "tau_base"):
      _check(0.0 <= opts[name] <= 1.0,
             f"dino.{name}={opts[name]!r} must be in [0, 1]")
    _check(opts.freeze_last_layer_epochs >= 0,
           f"dino.freeze_last_layer_epochs={opts.freeze_last_layer_epochs!r}"
           " must be >= 0")

  def prototypes(self, opts) -> heads.PrototypeSpec:
    return heads.PrototypeSpec(count=opts.num_prototypes, weight_norm=True)

  def reads_local_crops(self, opts) -> bool:
    del opts
    return True

  def init_state(self, opts, setup, rng) -> DinoTrainState:
    """The student, the teacher as its copy (main_dino.py loads the
    student's state dict into the teacher), and a zero centre."""
    base_state = super().init_state(opts, setup, rng)
    teacher = byol.target_part({"params": base_state.params,
                                "batch_stats": base_state.batch_stats},
                               TEACHER_PARTS)
    return state_lib.extend(
        base_state, DinoTrainState, target=teacher,
        center=jnp.zeros((opts.num_prototypes,), jnp.float32))

  def train_step(self, opts, setup, state, batch):
    return dino_step(state, batch, setup=setup,
                     teacher_model=setup.build_network(
                         prototypes=self.prototypes(opts)),
                     opts=opts)
