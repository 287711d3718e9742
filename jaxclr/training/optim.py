"""LARS with SimCLR's exclusions, and the warmup + cosine schedule.

Every derived optimisation number (peak learning rate after scaling, step
counts from epochs) is computed here, once, in `training_plan`, and logged by
the trainer.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  num_examples: int
  batch_size: int
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  peak_learning_rate: float


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
  if scaling == "linear":
    return base_lr * batch_size / 256.0
  if scaling == "sqrt":
    return base_lr * math.sqrt(batch_size)
  raise ValueError(f"learning_rate_scaling={scaling!r}; valid: 'linear', 'sqrt'")


def training_plan(config, num_examples: int) -> TrainingPlan:
  """Step counts and the peak learning rate, as the reference computes them.

  total = num_examples * epochs // B + 1 (the reference's +1 is kept, so the
  ImageNet B=4096 100-epoch run is 31,279 steps); warmup =
  round(warmup_epochs * num_examples // B), the floor division first.
  `num_train_steps > 0` overrides the epoch count.
  """
  b = config.batch_size
  if config.num_train_steps > 0:
    total = int(config.num_train_steps)
  else:
    total = int(num_examples * config.num_epochs // b + 1)
  warmup = int(round(config.warmup_epochs * num_examples // b))
  return TrainingPlan(
      num_examples=num_examples, batch_size=b,
      steps_per_epoch=max(1, num_examples // b), total_steps=total,
      warmup_steps=min(warmup, total),
      peak_learning_rate=scaled_learning_rate(
          config.learning_rate, b, config.learning_rate_scaling))


def learning_rate_schedule(plan: TrainingPlan) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to 0 at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=plan.peak_learning_rate,
      warmup_steps=plan.warmup_steps,
      decay_steps=max(plan.total_steps, plan.warmup_steps + 1), end_value=0.0)


def lars_mask(params):
  """True where LARS applies weight decay and trust-ratio adaptation.

  SimCLR excludes ['batch_normalization', 'bias', 'head_supervised']: here
  every 1-D parameter (BN scale/bias, dense biases; convs have none) and the
  whole linear probe head.
  """
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: (p.ndim > 1 and "linear_head" not in path)
          for path, p in flat.items()}
  return flax.traverse_util.unflatten_dict(mask)


def probe_l2_penalty(params, weight_decay: float):
  """wd * 0.5 * |W|^2 on the probe kernel, which LARS leaves undecayed.

  The reference adds this to the loss for its supervised head when the
  optimizer is LARS.
  """
  if "linear_head" not in params:
    return 0.0
  kernels = [p for path, p in flax.traverse_util.flatten_dict(
      params["linear_head"]).items() if path[-1] == "kernel"]
  return weight_decay * 0.5 * sum(jax.numpy.sum(k * k) for k in kernels)


# Updates with a non-finite gradient are never applied, however many come in
# a row (optax.apply_if_finite gives up after max_consecutive_errors).
_NEVER_GIVE_UP = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation whose learning rate is `schedule(state.step)`.

  optax schedules count the updates they were given; an update skipped for
  a non-finite gradient (optax.apply_if_finite keeps the old state) would
  then leave that count, and so the learning rate, behind the train step for
  the rest of the run. Here the learning rate is injected
  (optax.inject_hyperparams) from the step the caller passes, so the rate
  applied is always the scheduled (and logged) one.
  """
  tx: optax.GradientTransformation
  schedule: optax.Schedule

  def init(self, params):
    return self.tx.init(params)

  def update(self, grads, opt_state, params, step):
    """(updates, opt_state): zero updates and the old inner state when any
    gradient is non-finite."""
    inner = opt_state.inner_state
    hyper = inner.hyperparams
    lr = jnp.asarray(self.schedule(step), hyper["learning_rate"].dtype)
    opt_state = opt_state._replace(inner_state=inner._replace(
        hyperparams={**hyper, "learning_rate": lr}))
    return self.tx.update(grads, opt_state, params)


def nonfinite_count(opt_state) -> jax.Array:
  """int32 []: updates skipped so far for a non-finite gradient."""
  return opt_state.total_notfinite


def update_applied(opt_state) -> jax.Array:
  """bool []: whether the last update was applied (its gradient finite)."""
  return opt_state.last_finite


def applied_learning_rate(opt_state) -> jax.Array:
  """The learning rate of the last update (tests, logs)."""
  return opt_state.inner_state.hyperparams["learning_rate"]


def _guarded(factory, schedule, static_args=(), **hyperparams) -> Optimizer:
  inner = optax.inject_hyperparams(factory, static_args=static_args)(
      learning_rate=0.0, **hyperparams)
  return Optimizer(optax.apply_if_finite(inner, _NEVER_GIVE_UP), schedule)


def scale_by_clipped_trust_ratio(learning_rate, weight_decay,
                                 trust_coefficient,
                                 eps: float = 1e-8
                                 ) -> optax.GradientTransformation:
  """solo-learn's LARS scaling with clip_lr (vturrisi/solo-learn
  solo/utils/lars.py, `LARS.step`): g -> c (g + wd w) with

    c = min(r / lr, 1),   r = eta |w| / (|g| + wd |w| + eps),

  so that after the learning rate the layer moves at rate min(r, lr): the
  schedule only caps the trust ratio. Where |w| or |g| is 0, g passes
  unchanged (as there). Written here because optax has no trust ratio
  clipped against the learning rate, and optax.scale_by_trust_ratio divides
  by |g + wd w| (SimCLR's) where solo-learn divides by |g| + wd |w|.
  """
  def scale(g, w):
    w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    # At lr 0 (the warmup's first step) the ratio is 1: nothing moves anyway.
    clipped = jnp.where(ratio < learning_rate, ratio / learning_rate, 1.0)
    return jnp.where((w_norm > 0) & (g_norm > 0),
                     clipped * (g + weight_decay * w), g)

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("lars_clip_lr scales by the parameters' norms; pass "
                       "params to update()")
    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _lars_clip_lr(learning_rate, weight_decay, trust_coefficient, momentum):
  """optax.lars's chain with solo-learn's clipped scaling in place of its
  weight decay and trust ratio, on the same mask (lars_mask: elsewhere the
  gradient passes unscaled and undecayed, as with exclude_bias_n_norm)."""
  return optax.chain(
      optax.masked(scale_by_clipped_trust_ratio(
          learning_rate, weight_decay, trust_coefficient), lars_mask),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=False))


def lars(schedule, *, weight_decay: float, momentum: float,
         trust_coefficient: float, clip_lr: bool = False) -> Optimizer:
  """optax.lars with both masks: algebraically SimCLR's classic-momentum LARS.

  clip_lr: solo-learn's LARS instead (scale_by_clipped_trust_ratio), with
  the same classic momentum (the rate inside the momentum trace; solo-learn
  keeps PyTorch's, outside it: the same steps while the rate is constant).
  """
  if clip_lr:
    return _guarded(_lars_clip_lr, schedule, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient, momentum=momentum)
  return _guarded(
      optax.lars, schedule,
      static_args=("weight_decay_mask", "trust_ratio_mask", "nesterov"),
      weight_decay=weight_decay, weight_decay_mask=lars_mask,
      trust_ratio_mask=lars_mask, trust_coefficient=trust_coefficient,
      eps=0.0, momentum=momentum, nesterov=False)


def _sgd_nesterov(learning_rate, momentum, weight_decay):
  tx = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  if weight_decay > 0:  # L2 on kernels only, when asked (off in the paper).
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask), tx)
  return tx


def sgd_nesterov(schedule, *, momentum: float,
                 weight_decay: float = 0.0) -> Optimizer:
  """SGD with Nesterov momentum (the paper's linear-eval and fine-tuning
  optimiser); weight decay on kernels when weight_decay > 0."""
  # weight_decay is static: whether the decay transform exists depends on it.
  return _guarded(_sgd_nesterov, schedule, static_args=("weight_decay",),
                  momentum=momentum, weight_decay=weight_decay)


def _sgd_momentum(learning_rate, momentum, weight_decay):
  # Coupled L2 (added to the gradient before momentum, as LARS does and as
  # PyTorch's SGD(weight_decay=) does) on LARS's mask: SupCon's own code
  # decays every parameter; we keep SimCLR's exclusions (docs/losses.md).
  return optax.chain(optax.add_decayed_weights(weight_decay, lars_mask),
                     optax.sgd(learning_rate, momentum=momentum,
                               nesterov=False))


def sgd_momentum(schedule, *, momentum: float,
                 weight_decay: float) -> Optimizer:
  """SGD with heavy-ball momentum and L2 weight decay on kernels (SupCon's
  pretraining optimiser)."""
  return _guarded(_sgd_momentum, schedule, momentum=momentum,
                  weight_decay=weight_decay)


def create_optimizer(config, plan: TrainingPlan) -> Optimizer:
  """Pretraining's optimiser (LARS unless config.optimizer='sgd') on the
  warmup + cosine schedule of `plan`."""
  schedule = learning_rate_schedule(plan)
  if config.get("optimizer", "lars") == "sgd":
    return sgd_momentum(schedule, momentum=config.momentum,
                        weight_decay=config.weight_decay)
  return lars(schedule, weight_decay=config.weight_decay,
              momentum=config.momentum,
              trust_coefficient=config.trust_coefficient,
              # .get: configs saved before the field.
              clip_lr=bool(config.get("lars_clip_lr", False)))
