"""Distillation (SimCLRv2 section 2.3; docs/simclrv2.md): a teacher labels
unlabelled training images on the fly and a student fits its predictions.

Loss per image: -sum_c softmax(t/T)_c log softmax(s/T)_c, t and s the
teacher's and the student's logits on the same augmented view (crop + flip
only, as the paper; teacher_view='clean': the teacher sees the image as
evaluation preprocesses it), T = config.temperature; optionally plus
labelled_weight x the cross-entropy with the true label on a labelled
subset. The teacher runs in inference mode (moving BatchNorm statistics)
and gets no gradient; the student is a fine-tuning network
(jaxclr.jobs.finetune's encoder + head layers + zero-initialised
classifier), trained in full with global BatchNorm, on the same loop, mesh
and checkpoints as every other job.

Teachers (config.teacher_workdir):
  * a finished jaxclr.finetune or jaxclr.distill workdir: its classifier
    network, rebuilt from its results.json (architecture, classes,
    ft_proj_selector) and restored from its newest checkpoint;
  * a pretraining-format workdir whose checkpoint holds a supervised head
    (jaxclr.convert of an official SimCLR checkpoint, or a jaxclr pretraining
    run with linear_probe): the logits of that head on h.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxclr import config as config_lib, cpu, errors
from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.jobs import finetune, linear_eval as job
from jaxclr.models.simclr import build_model
from jaxclr.parallel import sharding
from jaxclr.training import (
    checkpoint, loop, metrics as metrics_lib, optim, state as state_lib,
    workdir as workdir_lib)
from jaxclr.training.state import TrainState

PROTOCOL = "distill"
CLASSIFIER_JOBS = ("finetune", "distill")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen classifier: apply(variables, images) -> float32 logits."""
  apply: Callable[[Any, jax.Array], jax.Array]
  variables: dict
  num_classes: int
  image_size: int
  kind: str  # 'finetune', 'distill' or 'pretraining'.
  source: str  # The workdir, absolute.
  checkpoint_step: int
  # Where the teacher's encoder was pretrained (the student's default start);
  # None when it was randomly initialised.
  encoder_workdir: str | None


def _newest_step(workdir: str, step: int) -> int:
  steps = workdir_lib.checkpoint_steps(workdir)
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  if not steps:
    raise workdir_lib.WorkdirError(
        f"teacher_workdir={workdir!r} has no checkpoint under {ckpt_dir}")
  if step < 0:
    return steps[-1]
  if step not in steps:
    raise workdir_lib.WorkdirError(
        f"teacher_checkpoint_step={step} is not in {ckpt_dir}; available: "
        f"{steps}")
  return step


def _restore_variables(workdir: str, step: int, abstract: dict) -> dict:
  return encoder_lib.restore_variables(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), step, abstract,
      what="network the teacher's workdir describes")


def _replicated_abstract(shapes, mesh) -> dict:
  repl = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      {"params": dict(shapes["params"]),
       "batch_stats": dict(shapes["batch_stats"])})


def _classifier_teacher(workdir: str, step: int, mesh, kind: str,
                        conv) -> Teacher:
  results_path = os.path.join(workdir, job.RESULTS_FILE)
  if not os.path.isfile(results_path):
    raise workdir_lib.WorkdirError(
        f"teacher_workdir={workdir!r} is a {kind} workdir without "
        f"{job.RESULTS_FILE}: its job has not finished (re-run it to the end "
        "first)")
  results = job.read_results(workdir)
  config = config_lib.base_config()
  config.model.update({k: v for k, v in results["model"].items()
                       if k in config.model
                       and k not in encoder_lib.PER_JOB_FIELDS})
  config.image_size = int(results["image_size"])
  net = finetune.FineTuneNetwork(
      backbone=build_model(config, num_classes=0, conv=conv),
      num_classes=int(results["num_classes"]),
      ft_proj_selector=int(results["ft_proj_selector"]))
  size = config.image_size
  shapes = jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((2, size, size, 3)), train=True))
  variables = _restore_variables(workdir, step,
                                 _replicated_abstract(shapes, mesh))
  encoder_workdir = results.get("pretrained_workdir")
  return Teacher(
      apply=lambda v, x: net.apply(v, x, train=False).astype(jnp.float32),
      variables=variables, num_classes=net.num_classes, image_size=size,
      kind=kind, source=workdir, checkpoint_step=step,
      encoder_workdir=(None if encoder_workdir in (None, "random_init")
                       else encoder_workdir))


def _supervised_head_teacher(workdir: str, step: int, mesh,
                             conv) -> Teacher:
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  with checkpoint.CheckpointStore(ckpt_dir, read_only=True) as store:
    num_classes = int(store.restore_meta(step).get("num_classes", 0))
  config = encoder_lib.pretraining_config(workdir)
  if num_classes <= 0 or not config.linear_probe:
    raise errors.ConfigError(
        f"teacher_workdir={workdir!r} is a pretraining checkpoint without a "
        "supervised head (linear_probe off or an unlabelled dataset); "
        "fine-tune it first (python -m jaxclr.finetune) and pass that "
        "workdir as the teacher")
  model = build_model(config, num_classes=num_classes, conv=conv)
  size = config.image_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, size, size, 3)), train=True))
  variables = _restore_variables(workdir, step,
                                 _replicated_abstract(shapes, mesh))
  return Teacher(
      apply=lambda v, x: model.apply(v, x, train=False)["logits"].astype(
          jnp.float32),
      variables=variables, num_classes=num_classes, image_size=size,
      kind="pretraining", source=workdir, checkpoint_step=step,
      encoder_workdir=workdir)


def load_teacher(workdir: str, mesh, step: int = -1, conv=None) -> Teacher:
  """The teacher in `workdir` (see the module docstring for the kinds)."""
  if not os.path.isdir(workdir):
    raise workdir_lib.WorkdirError(
        f"teacher_workdir={workdir!r} does not exist")
  workdir = os.path.abspath(workdir)
  raw = workdir_lib.load_config(workdir)
  if raw is None:
    raise workdir_lib.WorkdirError(
        f"teacher_workdir={workdir!r} is not a jaxclr workdir (no "
        f"{workdir_lib.CONFIG_FILE})")
  step = _newest_step(workdir, step)
  kind = raw.get("job", "pretrain")
  if kind in CLASSIFIER_JOBS:
    return _classifier_teacher(workdir, step, mesh, kind, conv)
  if kind == "pretrain":
    return _supervised_head_teacher(workdir, step, mesh, conv)
  raise errors.ConfigError(
      f"teacher_workdir={workdir!r} holds a {kind!r} job; valid teachers: a "
      "finetune or distill workdir, or a pretraining workdir with a "
      "supervised head")


def distillation_loss(student_logits, teacher_logits, *, temperature: float,
                      scale_by_temperature_squared: bool = False):
  """Mean over the batch of -sum_c softmax(t/T)_c log softmax(s/T)_c.

  The SimCLRv2 colab multiplies by T^2 (Hinton et al.'s gradient-scale
  correction); the paper's text and jaxclr's default do not. At T = 1 the
  two are the same.
  """
  teacher_probs = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  loss = optax.softmax_cross_entropy(student_logits / temperature,
                                     teacher_probs).mean()
  if scale_by_temperature_squared:
    loss = loss * temperature**2
  return loss


def labelled_loss(logits, labels):
  """Mean cross-entropy over the rows with a label (labels >= 0); 0 when
  the batch has none."""
  known = labels >= 0
  per_row = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.maximum(labels, 0))
  return (jnp.sum(jnp.where(known, per_row, 0.0)) /
          jnp.maximum(jnp.sum(known), 1))


def train_step(state: TrainState, batch, teacher_variables, *, net, optimizer,
               teacher_apply, temperature: float,
               scale_by_temperature_squared: bool, labelled_weight: float):
  """One student update on the global batch (batch-sharded arrays, so the
  BatchNorm statistics and the mean loss span it); the teacher's logits on
  the same images come first, in inference mode, with no gradient."""
  images = batch["images"].astype(jnp.float32)
  teacher_images = batch.get("eval_images", batch["images"])
  teacher_logits = jax.lax.stop_gradient(
      teacher_apply(teacher_variables, teacher_images.astype(jnp.float32)))

  def loss_fn(params):
    logits, new_vars = net.apply(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    distill = distillation_loss(
        logits, teacher_logits, temperature=temperature,
        scale_by_temperature_squared=scale_by_temperature_squared)
    parts = {"distill_loss": distill}
    loss = distill
    if labelled_weight > 0:  # Static: no label reaches the step otherwise.
      parts["labelled_loss"] = labelled_loss(logits, batch["labels"])
      loss = loss + labelled_weight * parts["labelled_loss"]
    return loss, (new_vars["batch_stats"], logits, parts)

  (loss, (batch_stats, logits, parts)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state, metrics = state_lib.apply_gradients(state, grads, batch_stats,
                                                 optimizer)
  agreement = jnp.mean((jnp.argmax(logits, -1) ==
                        jnp.argmax(teacher_logits, -1)).astype(jnp.float32))
  return new_state, {"loss": loss, "teacher_agreement": agreement, **parts,
                     **metrics}


def _student_config(config, teacher: Teacher):
  """The config with the student's start and data resolved from the
  teacher: pretrained_workdir 'teacher' -> the teacher's encoder workdir;
  a random-init student's dataset and image size -> the teacher's."""
  config = config.copy_and_resolve_references()
  if config.pretrained_workdir == "teacher":
    if teacher.encoder_workdir is None:
      raise errors.ConfigError(
          f"pretrained_workdir='teacher', but the teacher in "
          f"{teacher.source} was trained from a random-init encoder; set "
          "pretrained_workdir to a pretraining workdir or 'none'")
    config.pretrained_workdir = teacher.encoder_workdir
  if config.pretrained_workdir.lower() == "none":
    teacher_data = (encoder_lib.pretraining_config(teacher.encoder_workdir)
                    if teacher.encoder_workdir else None)
    if config.dataset is None:
      if teacher_data is None:
        raise errors.ConfigError(
            "a random-init student of a random-init teacher needs dataset "
            "and image_size in the config")
      config.dataset, config.data_dir = (teacher_data.dataset,
                                         config.data_dir or
                                         teacher_data.data_dir)
    if config.image_size is None:
      config.image_size = teacher.image_size
  return config


def _student_data(config, teacher: Teacher):
  """(data spec, (train split, eval split), training source with labels
  outside the labelled subset set to -1, subset spec or None, number of
  labelled examples); ConfigError when the eval split is the training split
  (unless allowed)."""
  data_spec = job.labelled_data_spec(config)
  split_names = job.checked_splits(config, data_spec, "distillation")
  if data_spec.image_size != teacher.image_size:
    raise errors.ConfigError(
        f"image_size={data_spec.image_size} differs from the teacher's "
        f"{teacher.image_size}: both must see the same images")
  src = input_pipeline.open_source(data_spec, "train")
  if src.num_classes > 0 and src.num_classes != teacher.num_classes:
    raise errors.DataError(
        f"dataset={data_spec.dataset!r} has {src.num_classes} classes, the "
        f"teacher {teacher.num_classes}")
  if config.batch_size > src.num_examples:
    raise errors.ConfigError(
        f"batch_size={config.batch_size} exceeds the {src.num_examples} "
        "training images")
  subset, num_labelled = None, 0
  if config.labelled_weight > 0:
    if src.labels is None:
      raise errors.DataError(
          f"{src.name} has no label index in memory; labelled_weight > 0 "
          "needs one (an in-memory or array_record dataset)")
    labels = np.asarray(src.labels)
    indices, subset = finetune.labelled_subset(config, labels)
    masked = np.full_like(labels, -1)
    masked[indices] = labels[indices]
    src, num_labelled = dataclasses.replace(src, labels=masked), len(indices)
  elif src.labels is not None:  # The student never sees a label.
    src = dataclasses.replace(src, labels=np.full(src.num_examples, -1,
                                                  np.int32))
  return data_spec, split_names, src, subset, num_labelled


def run(config, workdir: str, mesh=None) -> dict:
  """Distils (or resumes) in `workdir`; writes and returns results.json.

  Every user error (config, teacher, student, data) is raised before
  anything is compiled or written.
  """
  config_lib.validate(config, job="distill")
  workdir_lib.check_path(workdir)
  t_start = time.time()
  mesh = sharding.make_mesh(config.mesh_axis_type) if mesh is None else mesh
  config_lib.check_batch_sizes(config, ("batch_size", "eval_batch_size"),
                               num_devices=mesh.devices.size,
                               num_processes=jax.process_count())
  teacher = load_teacher(config.teacher_workdir, mesh,
                         config.teacher_checkpoint_step,
                         conv=cpu.job_convolution(config.model, log=False))
  config = _student_config(config, teacher)
  finetune.check_selector(config)
  data_spec, split_names, src, subset, num_labelled = _student_data(config,
                                                                    teacher)
  encoder = job.load_encoder(config, mesh)
  workdir_lib.prepare(workdir, config, is_primary=jax.process_index() == 0)
  plan = optim.training_plan(config, src.num_examples)
  logging.info(
      "jaxclr distill: teacher %s (%s, step %d, %d classes); student from "
      "%s; %d training images (%d labelled, weight %g); T=%g; %s, batch %d, "
      "%d steps (%d/epoch), peak lr %.4g; %s", teacher.source, teacher.kind,
      teacher.checkpoint_step, teacher.num_classes, encoder.source,
      src.num_examples, num_labelled, config.labelled_weight,
      config.temperature, config.optimizer, config.batch_size,
      plan.total_steps, plan.steps_per_epoch, plan.peak_learning_rate,
      sharding.describe_layout(mesh))
  net = finetune.FineTuneNetwork(backbone=encoder.model,
                                 num_classes=teacher.num_classes,
                                 ft_proj_selector=config.ft_proj_selector)
  step = functools.partial(
      train_step, teacher_apply=teacher.apply,
      temperature=config.temperature,
      scale_by_temperature_squared=config.scale_by_temperature_squared,
      labelled_weight=config.labelled_weight)
  init_fn, step_fn, feature_dim = finetune.compile_network(
      config, encoder, net, plan, mesh, data_spec.image_size, step=step,
      num_step_args=1)

  def batches(start_step):
    return input_pipeline.labelled_batches(
        data_spec, src, batch_size=config.batch_size, start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(), require_labels=False,
        with_eval_view=config.teacher_view == "clean")

  times = {"setup_s": time.time() - t_start}
  t = time.time()
  result = loop.run(
      loop.Job(name="distillation", init_state=init_fn,
               init_args=(encoder.variables, jax.random.key(config.seed)),
               step=step_fn, step_args=(teacher.variables,),
               batches=batches, total_steps=plan.total_steps,
               steps_per_epoch=plan.steps_per_epoch,
               batch_size=config.batch_size,
               meta={"teacher_workdir": teacher.source,
                     "teacher_checkpoint_step": teacher.checkpoint_step}),
      workdir=workdir, mesh=mesh, cadence=loop.Cadence.from_config(config))
  times["train_s"] = time.time() - t
  t = time.time()
  student = finetune.evaluate(net, result.state, mesh, data_spec,
                              config.eval_batch_size)
  teacher_eval = finetune.evaluate_logits(teacher.apply, teacher.variables,
                                          mesh, data_spec,
                                          config.eval_batch_size)
  times["eval_s"] = time.time() - t
  times["total_s"] = time.time() - t_start

  records = [r for r in metrics_lib.read_records(workdir) if "loss" in r]
  results = {
      "protocol": PROTOCOL, "top1": student["top1"], "top5": student["top5"],
      # The linear-eval schema's other fields, empty: distillation has none.
      "knn_top1": None, "few_label_top1": {}, "few_label_top1_std": {},
      "teacher_workdir": teacher.source, "teacher_kind": teacher.kind,
      "teacher_checkpoint_step": teacher.checkpoint_step,
      "teacher_top1": teacher_eval["top1"],
      "teacher_top5": teacher_eval["top5"],
      "checkpoint_step": encoder.checkpoint_step,
      "pretrained_workdir": encoder.source,
      "random_init": encoder.source == "random_init",
      "dataset": data_spec.dataset,
      "num_train_examples": int(src.num_examples),
      "num_eval_examples": student["num_eval_examples"],
      **job.split_fields(*split_names),
      "label_subset": subset, "num_labelled_examples": int(num_labelled),
      "num_classes": int(teacher.num_classes),
      "feature_dim": int(feature_dim),
      **{k: config[k] for k in (
          "ft_proj_selector", "temperature", "scale_by_temperature_squared",
          "teacher_view",
          "labelled_weight", "optimizer", "learning_rate",
          "learning_rate_scaling", "momentum", "weight_decay", "batch_size")},
      "peak_learning_rate": plan.peak_learning_rate,
      "steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
      "epochs": (config.num_epochs if config.num_train_steps <= 0 else
                 plan.total_steps / plan.steps_per_epoch),
      "final_train_loss": records[-1]["loss"] if records else None,
      "final_teacher_agreement": (records[-1].get("teacher_agreement")
                                  if records else None),
      "model": encoder.model_config, "image_size": encoder.image_size,
      "num_devices": int(mesh.devices.size),
      "resumed_from_step": result.start_step, "wall_times": times,
  }
  job.write_results(workdir, results)
  return results
