"""The pretraining job: the method's network, optimizer and step (from the
method registry), run by jaxclr/training/loop.py."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from jaxclr import config as config_lib, cpu, errors, methods

from jaxclr.data import input_pipeline, sources, splits, validate
from jaxclr.evaluation import periodic
from jaxclr.models import precision
from jaxclr.models.simclr import build_model
from jaxclr.parallel import sharding
from jaxclr.training import loop, optim, update, workdir as workdir_lib

# Kept importable from here: the errors this job raises.
NonFiniteError, Preempted = errors.NonFiniteError, errors.Preempted


def local_crops_note(num_local_crops: int) -> str:
  return f" + {num_local_crops} local crops" if num_local_crops else ""


def describe_run(config, plan: optim.TrainingPlan, mesh) -> str:
  n_proc = jax.process_count()
  n_dev = mesh.devices.size
  return (
      f"{sharding.describe_layout(mesh)}; global batch "
      f"{config.batch_size} images = {config.batch_size // n_proc} per process "
      f"= {config.batch_size // n_dev} per device (x2 views"
      f"{local_crops_note(config.augment.num_local_crops)}); "
      f"{plan.num_examples} examples, {plan.steps_per_epoch} steps/epoch, "
      f"{plan.total_steps} steps, warmup {plan.warmup_steps}; peak lr "
      f"{plan.peak_learning_rate:.4g} ({config.learning_rate} "
      f"{config.learning_rate_scaling}-scaled)")


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled pieces of a pretraining run on one mesh."""
  model: Any
  optimizer: optim.Optimizer
  init_fn: Callable  # rng -> TrainState, replicated over the mesh.
  step_fn: Callable  # (state, global batch) -> (state, metrics); donates state.


def create_trainer(config, mesh, plan: optim.TrainingPlan,
                   num_classes: int) -> Trainer:
  """The network, LARS on the plan's schedule, and the jitted init and step
  of the registered method config.method (jaxclr/methods)."""
  method, opts = config_lib.method_options(config)
  conv = cpu.job_convolution(config.model)

  def network(num_classes=0, predictor_hidden_dim=0, prototypes=None):
    return build_model(config, num_classes, predictor_hidden_dim, conv=conv,
                       prototypes=prototypes)

  model = network(num_classes=num_classes,
                  predictor_hidden_dim=method.predictor_hidden_dim(opts),
                  prototypes=method.prototypes(opts))
  optimizer = optim.create_optimizer(config, plan)
  augment_fn = None
  if config.augment.on_device:
    from jaxclr.data import (  # pylint: disable=g-import-not-at-top
        device_augment)
    augment_fn = functools.partial(device_augment.augment_views,
                                   params=config_lib.data_spec(config).augment)
  setup = methods.Setup(
      model=model, optimizer=optimizer, mesh=mesh, plan=plan,
      image_size=config.image_size,
      embedding_dim=config.model.proj_out_dim,
      weight_decay=config.weight_decay, augment_fn=augment_fn,
      build_network=network)
  repl = sharding.replicated(mesh)
  init_fn = jax.jit(functools.partial(method.init_state, opts, setup),
                    out_shardings=repl)
  step_fn = update.jit_step(
      functools.partial(method.train_step, opts, setup),
      state_sharding=repl, batch_sharding=sharding.batch_sharded(mesh),
      replicated_sharding=repl,
      # bfloat16: XLA keeps every rounding the policy states, on any layout.
      compiler_options=precision.compiler_options(
          config.model.compute_dtype))
  return Trainer(model=model, optimizer=optimizer, init_fn=init_fn,
                 step_fn=step_fn)


PREVIEW_EXAMPLES = 4
PREVIEW_SUMMARY = "train/augmented_views"


def augmentation_preview(batch: dict, num: int = PREVIEW_EXAMPLES
                         ) -> dict[str, np.ndarray]:
  """TensorBoard images of a pretraining batch's first `num` examples, each
  its two views side by side ([num, H, 2W, 3] in [0, 1])."""
  views = np.asarray(batch["images"][:num])
  if views.dtype == np.uint8:  # transfer_dtype='uint8'.
    views = views.astype(np.float32) / 255.0
  return {PREVIEW_SUMMARY: np.concatenate([views[:, 0], views[:, 1]], axis=2)}


def run(config, workdir: str) -> dict[str, float]:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics.

  Everything the user can get wrong is checked before anything is compiled,
  and before the workdir is written: the config and device layout, the
  workdir's path, then the data (opened, read only: data/validate.py), then
  the workdir (its lock and config, training/workdir.py). A bad dataset leaves no trace in the workdir.

  Raises:
    Preempted: after saving at the current step on SIGTERM / preemption.
    NonFiniteError: policy 'stop' and a NaN/Inf gradient.
  """
  config_lib.validate(config, job="pretrain")
  mesh = sharding.make_mesh(config.mesh_axis_type)
  config_lib.check_batch_sizes(config, ("batch_size",),
                               num_devices=mesh.devices.size,
                               num_processes=jax.process_count())
  workdir_lib.check_path(workdir)
  spec = config_lib.data_spec(config)
  train_source = input_pipeline.open_source(spec, "train")
  info = input_pipeline.dataset_info(train_source)
  config_lib.check_labels(config, info.num_classes)
  validate.check_batch_fits(info.name, info.num_train_examples,
                            config.batch_size)
  if config.eval_every_steps > 0 and info.num_classes > 0:  # Periodic kNN.
    splits.check_held_out(
        spec.dataset, sources.labelled_train_split(spec),
        sources.resolve_split(spec, None, "eval"),
        allow=config.allow_eval_on_train, what="the periodic kNN")
    for which in ("labelled_train", "eval"):  # Its splits open (or say why).
      input_pipeline.open_source(spec, which)
  workdir_lib.prepare(workdir, config, is_primary=jax.process_index() == 0)

  plan = optim.training_plan(config, info.num_train_examples)
  logging.info("jaxclr pretraining: %s", describe_run(config, plan, mesh))
  num_classes = info.num_classes if config.linear_probe else 0
  trainer = create_trainer(config, mesh, plan, num_classes)
  evaluator = periodic.PeriodicKnnEvaluator(
      spec, mesh, trainer.model, info.num_classes,
      every=config.eval_every_steps)
  init_rng = jax.random.key(config.seed)

  def batches(start_step):
    return input_pipeline.pretrain_batches(
        spec, train_source,
        batch_size=config.batch_size, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())

  job = loop.Job(
      name="pretraining", init_state=trainer.init_fn, init_args=(init_rng,),
      step=trainer.step_fn, batches=batches, total_steps=plan.total_steps,
      steps_per_epoch=plan.steps_per_epoch, batch_size=config.batch_size,
      evaluate=evaluator.maybe_evaluate,
      meta={"dataset": config.dataset, "num_classes": num_classes},
      # With on_device colour the host views are crop + flip only: not the
      # pixels the step trains on, so there is nothing honest to show.
      preview=None if config.augment.on_device else augmentation_preview)
  result = loop.run(job, workdir=workdir, mesh=mesh,
                    cadence=loop.Cadence.from_config(config))
  return result.last_logged
