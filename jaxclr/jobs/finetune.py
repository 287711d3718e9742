"""Semi-supervised fine-tuning of all layers (docs/simclr.md 6.1, 6.3-6.5).

The network is the pretrained encoder, the first `ft_proj_selector` layers of
its projection head (0: none, the classifier sees h; 1: SimCLRv2's choice for
1% / 10% labels, after the first head layer's BN + ReLU) and a new linear
classifier whose kernel and bias start at zero (zero_init_logits_layer).
Every one of those layers is trained, with BatchNorm in training mode over the
global batch and its moving statistics updated. That follows the paper and
the maintainer ("fine-tuning the whole network ... we keep the first layer of
projection head", simclr#109) and the TF2 code, which trains the kept head
layer; TF1's finetune mode leaves it untrained (a quirk, not the protocol).

Labels: a class-balanced fraction or k per class of the training split, drawn
from the seed, or a subset dataset (TFDS imagenet2012_subset/1pct, /10pct)
used as it is. Optimiser (P1 B.5): SGD, Nesterov momentum 0.9, lr 0.05 x
B/256, no warmup, cosine decay, no weight decay; or SimCLRv2's LARS (lr 0.005
x sqrt(B)). Views: random crop + flip only. Evaluation: centre crop,
inference-mode BatchNorm, top-1/top-5 -> OUT/results.json.

Training runs through jaxclr.training.loop: the state is checkpointed under
OUT/checkpoints, so re-running the command resumes; the data order is a
function of (seed, step), so a resumed run ends where an uninterrupted one
does.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxclr import config as config_lib, errors
from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib, linear
from jaxclr.jobs import linear_eval as job
from jaxclr.models.heads import LinearHead
from jaxclr.parallel import sharding
from jaxclr.training import (
    loop, metrics as metrics_lib, optim, state as state_lib,
    workdir as workdir_lib)
from jaxclr.training.state import TrainState

PROTOCOL = "finetune"


def check_selector(config) -> None:
  """ft_proj_selector against the head depth (read from the pretraining
  workdir's config.json only, so a bad value fails in a second)."""
  if config.pretrained_workdir.lower() == "none":
    if config.model.num_proj_layers is None:
      raise errors.ConfigError(
          "pretrained_workdir='none' (random init) needs the architecture in "
          "the config: set model.depth, model.num_proj_layers, ... (e.g. "
          "configs/finetune.py:random_init)")
    n = int(config.model.num_proj_layers)
  else:
    n = int(encoder_lib.pretraining_config(
        config.pretrained_workdir).model.num_proj_layers)
  if not 0 <= config.ft_proj_selector <= n:
    raise errors.ConfigError(
        f"ft_proj_selector={config.ft_proj_selector} is invalid for a "
        f"{n}-layer projection head; valid: 0 (h, head discarded) to {n} "
        "(1 = SimCLRv2's choice for 1% / 10% labels)")


def train_labels(src) -> np.ndarray:
  """int32 [N] labels of the training split (-1 unlabelled)."""
  if src.labels is not None:
    return np.asarray(src.labels)
  if src.kind != "encoded":
    raise errors.DataError(
        f"{src.name} is a streamed build without random access; label "
        "subsets need an array_record build (tfds build --file_format="
        "array_record)")
  logging.info("Reading the %d labels of %s (no label index)...",
               src.num_examples, src.name)
  return np.array([src.get_encoded(i)[1] for i in range(src.num_examples)],
                  np.int32)


def labelled_subset(config, labels: np.ndarray) -> tuple[np.ndarray, dict]:
  """Sorted indices of the labelled training examples, and their spec.

  Deterministic in (seed, labels): the same config gives the same subset.
  """
  labels = np.asarray(labels)
  if config.label_fraction is not None:
    idx = linear.label_fraction_subset(labels, config.label_fraction,
                                       config.seed)
    spec = {"kind": "label_fraction", "label_fraction": config.label_fraction,
            "seed": config.seed}
  elif config.labels_per_class is not None:
    idx = linear.class_balanced_subset(labels, config.labels_per_class,
                                       config.seed)
    spec = {"kind": "labels_per_class",
            "labels_per_class": config.labels_per_class, "seed": config.seed}
  else:  # A subset dataset (validate allows nothing else): as it is.
    idx = np.flatnonzero(labels >= 0)
    spec = {"kind": "dataset", "dataset": config.dataset}
  return idx, spec


class FineTuneNetwork(nn.Module):
  """images -> logits: backbone (encoder + projection head) -> classifier.

  The whole head is built, as in the reference (checkpoint compatibility);
  layers after `ft_proj_selector` get no gradient and stay as restored.
  """
  backbone: nn.Module  # SimCLRModel without its online probe.
  num_classes: int
  ft_proj_selector: int

  @nn.compact
  def __call__(self, images, train: bool):
    out = self.backbone(images, train=train)
    features = encoder_lib.select_features(out, self.ft_proj_selector)
    # Named like the pretraining probe, so optim.lars_mask excludes it from
    # LARS adaptation and weight decay as SimCLR does 'head_supervised'.
    return LinearHead(self.num_classes, zero_init=True,
                      name="linear_head")(features)


def create_optimizer(config, plan: optim.TrainingPlan) -> optim.Optimizer:
  """SGD + Nesterov (paper) or SimCLR's LARS (SimCLRv2 README)."""
  if config.optimizer == "lars":
    return optim.create_optimizer(config, plan)
  return optim.sgd_nesterov(optim.learning_rate_schedule(plan),
                            momentum=config.momentum,
                            weight_decay=config.weight_decay)


def init_state(backbone_variables, rng, *, net: FineTuneNetwork,
               optimizer: optim.Optimizer, feature_dim: int) -> TrainState:
  """Pure: the restored backbone plus a zero classifier (jit with shardings)."""
  head = LinearHead(net.num_classes, zero_init=True).init(
      rng, jnp.zeros((1, feature_dim), jnp.float32))["params"]
  params = {"backbone": backbone_variables["params"], "linear_head": head}
  return state_lib.create(
      params, {"backbone": backbone_variables["batch_stats"]}, optimizer)


def train_step(state: TrainState, batch, *, net, optimizer):
  """One update of every layer on the global batch; BN in training mode.

  batch["images"] [B, H, W, 3] and batch["labels"] [B] are batch-sharded
  global arrays, so the BatchNorm statistics and the mean loss span the
  global batch.
  """
  labels = batch["labels"]

  def loss_fn(params):
    logits, new_vars = net.apply(
        {"params": params, "batch_stats": state.batch_stats},
        batch["images"].astype(jnp.float32), train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()
    return loss, (new_vars["batch_stats"], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state, metrics = state_lib.apply_gradients(state, grads, batch_stats,
                                                 optimizer)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return new_state, {"loss": loss, "train_acc": accuracy, **metrics}


def evaluate(net, state: TrainState, mesh, spec, batch_size: int) -> dict:
  """top-1/top-5 on the centre-cropped eval split, inference-mode BN."""
  return evaluate_logits(
      lambda variables, images: net.apply(variables, images, train=False),
      {"params": state.params, "batch_stats": state.batch_stats}, mesh, spec,
      batch_size)


def evaluate_logits(apply_fn, variables, mesh, spec, batch_size: int) -> dict:
  """top-1/top-5 of apply_fn(variables, images) -> logits on the
  centre-cropped eval split."""
  logits_fn = sharding.jit_over_batch(apply_fn, mesh)
  src = input_pipeline.open_source(spec, "eval")
  logits, labels = encoder_lib.extract_features(
      logits_fn, variables, mesh,
      input_pipeline.eval_batches(spec.image_size, src, batch_size,
                                  jax.process_index(), jax.process_count()))
  return {"top1": linear.top_k_accuracy(logits, labels, 1),
          "top5": linear.top_k_accuracy(logits, labels, 5),
          "num_eval_examples": int(len(labels))}


def _last_logged(workdir: str, key: str):
  records = [r for r in metrics_lib.read_records(workdir) if key in r]
  return records[-1][key] if records else None


def _labelled_data(config):
  """(data spec, (train split, eval split), training source, labels,
  subset indices, subset spec); ConfigError when the eval split is the
  training split (unless allowed) or the batch is larger than the subset."""
  # The linear-eval job's reading of dataset/split/size overrides.
  data_spec = job.labelled_data_spec(config)
  split_names = job.checked_splits(config, data_spec, "fine-tuning")
  src = input_pipeline.open_source(data_spec, "train")
  if src.num_classes <= 0:
    raise errors.DataError(
        f"dataset={data_spec.dataset!r} has no labels; fine-tuning needs a "
        "labelled training split")
  labels = train_labels(src)
  indices, subset = labelled_subset(config, labels)
  if config.batch_size > len(indices):
    raise errors.ConfigError(
        f"batch_size={config.batch_size} exceeds the {len(indices)} labelled "
        f"examples ({', '.join(config_lib.subset_options(config))}); use "
        f"batch_size <= {len(indices)}")
  return data_spec, split_names, src, labels, indices, subset


def compile_network(config, encoder, net, plan, mesh, image_size: int, *,
                    step=train_step, num_step_args: int = 0):
  """(init_fn, step_fn, feature_dim): jitted with shardings, state
  donated; init_fn(encoder variables, rng). `step`(state, batch, *args, net=,
  optimizer=) is fine-tuning's train_step or another job's (distillation);
  its num_step_args extra arguments are replicated."""
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  feature_dim = jax.eval_shape(
      lambda v, x: encoder_lib.select_features(
          encoder.model.apply(v, x, train=False), config.ft_proj_selector),
      encoder.variables, jax.ShapeDtypeStruct(
          (1, image_size, image_size, 3), jnp.float32)).shape[-1]
  optimizer = create_optimizer(config, plan)
  init_fn = jax.jit(functools.partial(init_state, net=net, optimizer=optimizer,
                                      feature_dim=feature_dim),
                    out_shardings=repl)
  step_fn = jax.jit(
      functools.partial(step, net=net, optimizer=optimizer),
      in_shardings=(repl, batch_sh) + (repl,) * num_step_args,
      out_shardings=(repl, repl), donate_argnums=0)
  return init_fn, step_fn, feature_dim


def run(config, workdir: str, mesh=None) -> dict:
  """Fine-tunes (or resumes) in `workdir`; writes and returns results.json.

  Every user error (config, workdir, data, batch vs subset size) is raised
  before anything is compiled or written.
  """
  config_lib.validate(config, job="finetune")
  workdir_lib.check_path(workdir)
  t_start = time.time()
  mesh = sharding.make_mesh(config.mesh_axis_type) if mesh is None else mesh
  config_lib.check_batch_sizes(config, ("batch_size", "eval_batch_size"),
                               num_devices=mesh.devices.size,
                               num_processes=jax.process_count())
  check_selector(config)
  data_spec, split_names, src, labels, indices, subset = _labelled_data(
      config)
  encoder = job.load_encoder(config, mesh)
  workdir_lib.prepare(workdir, config, is_primary=jax.process_index() == 0)
  plan = optim.training_plan(config, len(indices))
  logging.info(
      "jaxclr finetune: %d labelled examples (%s) of %d, %d classes; "
      "ft_proj_selector=%d; %s, batch %d, %d steps (%d/epoch), peak lr %.4g; "
      "%s", len(indices), subset, src.num_examples, src.num_classes,
      config.ft_proj_selector, config.optimizer, config.batch_size,
      plan.total_steps, plan.steps_per_epoch, plan.peak_learning_rate,
      sharding.describe_layout(mesh))
  net = FineTuneNetwork(backbone=encoder.model, num_classes=src.num_classes,
                        ft_proj_selector=config.ft_proj_selector)
  init_fn, step_fn, feature_dim = compile_network(config, encoder, net, plan,
                                                  mesh, data_spec.image_size)

  def batches(start_step):
    return input_pipeline.labelled_batches(
        data_spec, src, batch_size=config.batch_size, start_step=start_step,
        indices=indices, process_index=jax.process_index(),
        process_count=jax.process_count())

  times = {"setup_s": time.time() - t_start}
  t = time.time()
  result = loop.run(
      loop.Job(name="fine-tuning", init_state=init_fn,
               init_args=(encoder.variables, jax.random.key(config.seed)),
               step=step_fn,
               batches=batches, total_steps=plan.total_steps,
               steps_per_epoch=plan.steps_per_epoch,
               batch_size=config.batch_size),
      workdir=workdir, mesh=mesh, cadence=loop.Cadence.from_config(config))
  times["train_s"] = time.time() - t
  t = time.time()
  metrics = evaluate(net, result.state, mesh, data_spec,
                     config.eval_batch_size)
  times["eval_s"] = time.time() - t
  times["total_s"] = time.time() - t_start

  results = {
      "protocol": PROTOCOL, "top1": metrics["top1"], "top5": metrics["top5"],
      # The linear-eval schema's other fields, empty: fine-tuning has none.
      "knn_top1": None, "few_label_top1": {}, "few_label_top1_std": {},
      "checkpoint_step": encoder.checkpoint_step,
      "pretrained_workdir": encoder.source,
      "random_init": encoder.source == "random_init",
      "dataset": data_spec.dataset, "label_subset": subset,
      "num_labelled_examples": int(len(indices)),
      "labelled_per_class": np.bincount(
          labels[indices], minlength=src.num_classes).tolist(),
      "num_train_examples": int(src.num_examples),
      "num_eval_examples": metrics["num_eval_examples"],
      **job.split_fields(*split_names),
      "num_classes": int(src.num_classes), "feature_dim": int(feature_dim),
      **{k: config[k] for k in (
          "ft_proj_selector", "optimizer", "learning_rate",
          "learning_rate_scaling", "momentum", "weight_decay", "batch_size")},
      "peak_learning_rate": plan.peak_learning_rate,
      "steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
      "epochs": (config.num_epochs if config.num_train_steps <= 0 else
                 plan.total_steps / plan.steps_per_epoch),
      "final_train_loss": _last_logged(workdir, "loss"),
      "model": encoder.model_config, "image_size": encoder.image_size,
      "num_devices": int(mesh.devices.size),
      "resumed_from_step": result.start_step, "wall_times": times,
  }
  job.write_results(workdir, results)
  return results
