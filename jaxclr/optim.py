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


def create_optimizer(config, plan: TrainingPlan) -> optax.GradientTransformation:
  """optax.lars with both masks: algebraically SimCLR's classic-momentum LARS."""
  return optax.lars(
      learning_rate=learning_rate_schedule(plan),
      weight_decay=config.weight_decay, weight_decay_mask=lars_mask,
      trust_ratio_mask=lars_mask, trust_coefficient=config.trust_coefficient,
      eps=0.0, momentum=config.momentum, nesterov=False)
