"""Semi-supervised fine-tuning of all layers (SIMCLR_REFERENCE.md 6.1, 6.3-6.5).

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

The state is checkpointed under OUT/checkpoints, so re-running the command
resumes; the data order is a function of (seed, step), so a resumed run ends
where an uninterrupted one does.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxclr import checkpoint, config_lib, metrics as metrics_lib, optim
from jaxclr import workdir as workdir_lib
from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.evaluation import job, linear
from jaxclr.models.heads import LinearHead
from jaxclr.parallel import sharding

PROTOCOL = "finetune"
OPTIMIZERS = ("momentum", "lars")
# TFDS datasets whose training split is itself the labelled subset.
SUBSET_DATASETS = ("imagenet2012_subset/1pct", "imagenet2012_subset/10pct")


def _check(ok: bool, message: str):
  if not ok:
    raise config_lib.ConfigError(message)


def subset_options(config) -> list[str]:
  """The label-subset options the config sets, as 'name=value'."""
  chosen = []
  if config.label_fraction is not None:
    chosen.append(f"label_fraction={config.label_fraction!r}")
  if config.labels_per_class is not None:
    chosen.append(f"labels_per_class={config.labels_per_class!r}")
  if config.dataset in SUBSET_DATASETS:
    chosen.append(f"dataset={config.dataset!r}")
  return chosen


def validate(config) -> None:
  """ConfigError naming the first bad value; reads no data or checkpoint."""
  _check(config.pretrained_workdir is not None,
         "pretrained_workdir is required: a pretraining --workdir, or 'none' "
         "for a random-init baseline")
  chosen = subset_options(config)
  _check(len(chosen) == 1,
         f"set exactly one label subset, got {len(chosen)}"
         + (f" ({', '.join(chosen)})" if chosen else "")
         + ": label_fraction (0 < f <= 1, class-balanced; 1.0 = all labels), "
         "labels_per_class (k >= 1 per class), or dataset one of "
         f"{SUBSET_DATASETS} (its train split as it is)")
  f, k = config.label_fraction, config.labels_per_class
  _check(f is None or 0 < f <= 1, f"label_fraction={f!r} must be in (0, 1]")
  _check(k is None or k >= 1, f"labels_per_class={k!r} must be >= 1")
  _check(config.ft_proj_selector >= 0,
         f"ft_proj_selector={config.ft_proj_selector!r} must be >= 0 (0 = h, "
         "k = after projection-head layer k)")
  _check(config.optimizer in OPTIMIZERS,
         f"optimizer={config.optimizer!r}; valid: {OPTIMIZERS}")
  _check(config.learning_rate_scaling in ("linear", "sqrt"),
         f"learning_rate_scaling={config.learning_rate_scaling!r}; valid: "
         "'linear' (lr x B/256), 'sqrt' (lr x sqrt(B))")
  positive = ["batch_size", "learning_rate", "eval_batch_size",
              "log_every_steps", "checkpoint_every_steps",
              "max_checkpoints_to_keep", "trust_coefficient"]
  if config.num_train_steps <= 0:  # Else num_train_steps sets the length.
    positive.append("num_epochs")
  for name in positive:
    _check(config[name] > 0, f"{name}={config[name]!r} must be > 0")
  for name in ("warmup_epochs", "weight_decay"):
    _check(config[name] >= 0, f"{name}={config[name]!r} must be >= 0")
  _check(0 <= config.momentum < 1,
         f"momentum={config.momentum!r} must be in [0, 1)")


def check_selector(config) -> None:
  """ft_proj_selector against the head depth (read from the pretraining
  workdir's config.json only, so a bad value fails in a second)."""
  if config.pretrained_workdir.lower() == "none":
    _check(config.model.num_proj_layers is not None,
           "pretrained_workdir='none' (random init) needs the architecture "
           "in the config: set model.depth, model.num_proj_layers, ... (e.g. "
           "configs/finetune.py:random_init)")
    n = int(config.model.num_proj_layers)
  else:
    n = int(encoder_lib.pretraining_config(
        config.pretrained_workdir).model.num_proj_layers)
  _check(0 <= config.ft_proj_selector <= n,
         f"ft_proj_selector={config.ft_proj_selector} is invalid for a "
         f"{n}-layer projection head; valid: 0 (h, head discarded) to {n} "
         "(1 = SimCLRv2's choice for 1% / 10% labels)")


def train_labels(src) -> np.ndarray:
  """int32 [N] labels of the training split (-1 unlabelled)."""
  if src.labels is not None:
    return np.asarray(src.labels)
  if src.kind != "encoded":
    raise input_pipeline.DataError(
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


class FineTuneState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 [], finished updates.
  params: Any  # {"backbone": {encoder, projection_head}, "linear_head": ...}
  batch_stats: Any  # {"backbone": ...}
  opt_state: Any


def create_optimizer(config, plan: optim.TrainingPlan, schedule):
  """SGD + Nesterov (paper) or SimCLR's LARS (SimCLRv2 README)."""
  if config.optimizer == "lars":  # Its own copy of the same schedule.
    return optim.create_optimizer(config, plan)
  tx = optax.sgd(schedule, momentum=config.momentum, nesterov=True)
  if config.weight_decay > 0:  # Off in the paper; L2 on kernels when asked.
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask), tx)
  return tx


def init_state(backbone_variables, rng, *, net: FineTuneNetwork, tx,
               feature_dim: int) -> FineTuneState:
  """Pure: the restored backbone plus a zero classifier (jit with shardings)."""
  head = LinearHead(net.num_classes, zero_init=True).init(
      rng, jnp.zeros((1, feature_dim), jnp.float32))["params"]
  params = {"backbone": backbone_variables["params"], "linear_head": head}
  return FineTuneState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats={"backbone": backbone_variables["batch_stats"]},
      opt_state=tx.init(params))


def train_step(state: FineTuneState, images, labels, *, net, tx, schedule):
  """One update of every layer on the global batch; BN in training mode.

  images [B, H, W, 3] and labels [B] are batch-sharded global arrays, so the
  BatchNorm statistics and the mean loss span the global batch.
  """
  def loss_fn(params):
    logits, new_vars = net.apply(
        {"params": params, "batch_stats": state.batch_stats},
        images.astype(jnp.float32), train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()
    return loss, (new_vars["batch_stats"], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return new_state, {"loss": loss, "train_acc": accuracy,
                     "grad_norm": optax.tree.norm(grads),
                     "learning_rate": schedule(state.step)}


def evaluate(net, state: FineTuneState, mesh, data_config,
             batch_size: int) -> dict:
  """top-1/top-5 on the centre-cropped eval split, inference-mode BN."""
  logits_fn = jax.jit(
      lambda variables, images: net.apply(variables, images, train=False),
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
      out_shardings=sharding.batch_sharded(mesh))
  data = config_lib.data_spec(data_config)
  logits, labels = encoder_lib.extract_features(
      logits_fn, {"params": state.params, "batch_stats": state.batch_stats},
      mesh, input_pipeline.eval_batches(
          data.image_size, input_pipeline.open_source(data, "eval"),
          batch_size, jax.process_index(), jax.process_count()))
  return {"top1": linear.top_k_accuracy(logits, labels, 1),
          "top5": linear.top_k_accuracy(logits, labels, 5),
          "num_eval_examples": int(len(labels))}


def _restore_or_init(store, init_fn, backbone_variables, rng, repl):
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      jax.eval_shape(init_fn, backbone_variables, rng))
  restored = store.restore(abstract)
  if restored is None:
    return init_fn(backbone_variables, rng), 0
  state, _, step = restored
  logging.info("Resumed fine-tuning from %s.", store.path(step))
  return state, step


def _train(config, state, step_fn, *, mesh, data_config, indices, plan, store,
           workdir, start_step):
  """The step loop: host syncs only at log and checkpoint steps."""
  from jaxclr import pretrain  # pylint: disable=g-import-not-at-top
  if start_step >= plan.total_steps:  # Finished before: evaluate only.
    return state
  logger = metrics_lib.MetricsLogger(
      workdir, is_primary=jax.process_index() == 0,
      total_steps=plan.total_steps, batch_size=config.batch_size,
      start_step=start_step)
  preemption = pretrain.PreemptionFlag()
  batches = pretrain.prefetch(
      sharding.global_batch(mesh, b) for b in input_pipeline.labelled_batches(
          config_lib.data_spec(data_config),
          input_pipeline.open_source(config_lib.data_spec(data_config),
                                     "train"),
          batch_size=config.batch_size, start_step=start_step,
          indices=indices, process_index=jax.process_index(),
          process_count=jax.process_count()))
  try:
    for step in range(start_step, plan.total_steps):
      b = next(batches)
      state, metrics = step_fn(state, b["images"], b["labels"])
      done = step + 1
      if step == start_step:
        logger.reset_timer(done)  # Exclude compilation from throughput.
      if done % config.log_every_steps == 0 or done == plan.total_steps:
        logger.log_train(done, {**jax.device_get(metrics),
                                "epoch": done / plan.steps_per_epoch})
      preempted = preemption.reached(store, done)
      if (done % config.checkpoint_every_steps == 0 or
          done == plan.total_steps or preempted):
        store.save(done, state, {"step": done}, force=True)
      if preempted:
        store.wait_until_finished()
        raise pretrain.Preempted(done, store.path(done))
    store.wait_until_finished()
  finally:
    preemption.restore()
    logger.close()
  return state


def _last_logged(workdir: str, key: str):
  records = [r for r in metrics_lib.read_records(workdir) if key in r]
  return records[-1][key] if records else None


def _labelled_data(config, encoder):
  """(data config, training source, labels, subset indices, subset spec);
  ConfigError when the batch is larger than the subset."""
  # The linear-eval job's reading of dataset/split/size overrides.
  data_config = job.labelled_data_config(config, encoder)
  src = input_pipeline.open_source(config_lib.data_spec(data_config), "train")
  if src.num_classes <= 0:
    raise input_pipeline.DataError(
        f"dataset={data_config.dataset!r} has no labels; fine-tuning needs a "
        "labelled training split")
  labels = train_labels(src)
  indices, spec = labelled_subset(config, labels)
  _check(config.batch_size <= len(indices),
         f"batch_size={config.batch_size} exceeds the {len(indices)} labelled "
         f"examples ({', '.join(subset_options(config))}); use batch_size <= "
         f"{len(indices)}")
  return data_config, src, labels, indices, spec


def _load_encoder(config, mesh) -> encoder_lib.FrozenEncoder:
  if config.pretrained_workdir.lower() == "none":
    return encoder_lib.random_encoder(config, mesh)
  step = config.checkpoint_step if config.checkpoint_step >= 0 else None
  fields = job.eval_model_fields(config)
  return encoder_lib.restore_encoder(config.pretrained_workdir, mesh,
                                     step=step, eval_model=fields)


def _compile(config, encoder, net, plan, mesh, image_size: int):
  """(init_fn, step_fn, feature_dim): jitted with shardings, state donated."""
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  feature_dim = jax.eval_shape(
      lambda v, x: encoder_lib.select_features(
          encoder.model.apply(v, x, train=False), config.ft_proj_selector),
      encoder.variables, jax.ShapeDtypeStruct(
          (1, image_size, image_size, 3), jnp.float32)).shape[-1]
  schedule = optim.learning_rate_schedule(plan)
  tx = create_optimizer(config, plan, schedule)
  init_fn = jax.jit(functools.partial(init_state, net=net, tx=tx,
                                      feature_dim=feature_dim),
                    out_shardings=repl)
  step_fn = jax.jit(
      functools.partial(train_step, net=net, tx=tx, schedule=schedule),
      in_shardings=(repl, batch_sh, batch_sh), out_shardings=(repl, repl),
      donate_argnums=0)
  return init_fn, step_fn, feature_dim


def run(config, workdir: str, mesh=None) -> dict:
  """Fine-tunes (or resumes) in `workdir`; writes and returns results.json.

  Every user error (config, workdir, data, batch vs subset size) is raised
  before anything is compiled or written.
  """
  validate(config)
  t_start = time.time()
  mesh = sharding.make_mesh("auto") if mesh is None else mesh
  job.check_batch_sizes(config, mesh, ("batch_size", "eval_batch_size"))
  check_selector(config)
  encoder = _load_encoder(config, mesh)
  data_config, src, labels, indices, spec = _labelled_data(config, encoder)
  workdir_lib.prepare(workdir, config, is_primary=jax.process_index() == 0)
  plan = optim.training_plan(config, len(indices))
  logging.info(
      "jaxclr finetune: %d labelled examples (%s) of %d, %d classes; "
      "ft_proj_selector=%d; %s, batch %d, %d steps (%d/epoch), peak lr %.4g; "
      "%s", len(indices), spec, src.num_examples, src.num_classes,
      config.ft_proj_selector, config.optimizer, config.batch_size,
      plan.total_steps, plan.steps_per_epoch, plan.peak_learning_rate,
      sharding.describe_layout(mesh))
  net = FineTuneNetwork(backbone=encoder.model, num_classes=src.num_classes,
                        ft_proj_selector=config.ft_proj_selector)
  init_fn, step_fn, feature_dim = _compile(config, encoder, net, plan, mesh,
                                           data_config.image_size)

  times = {"setup_s": time.time() - t_start}
  t = time.time()
  store = checkpoint.CheckpointStore(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
      save_every_steps=config.checkpoint_every_steps,
      max_to_keep=config.max_checkpoints_to_keep)
  try:
    state, start = _restore_or_init(store, init_fn, encoder.variables,
                                    jax.random.key(config.seed),
                                    sharding.replicated(mesh))
    state = _train(config, state, step_fn, mesh=mesh, data_config=data_config,
                   indices=indices, plan=plan, store=store, workdir=workdir,
                   start_step=start)
  finally:
    store.close()
  times["train_s"] = time.time() - t
  t = time.time()
  metrics = evaluate(net, state, mesh, data_config, config.eval_batch_size)
  times["eval_s"] = time.time() - t
  times["total_s"] = time.time() - t_start

  results = {
      "protocol": PROTOCOL, "top1": metrics["top1"], "top5": metrics["top5"],
      # The linear-eval schema's other fields, empty: fine-tuning has none.
      "knn_top1": None, "few_label_top1": {}, "few_label_top1_std": {},
      "checkpoint_step": encoder.checkpoint_step,
      "pretrained_workdir": encoder.source,
      "random_init": encoder.source == "random_init",
      "dataset": data_config.dataset, "label_subset": spec,
      "num_labelled_examples": int(len(indices)),
      "labelled_per_class": np.bincount(
          labels[indices], minlength=src.num_classes).tolist(),
      "num_train_examples": int(src.num_examples),
      "num_eval_examples": metrics["num_eval_examples"],
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
      "resumed_from_step": start, "wall_times": times,
  }
  job.write_results(workdir, results)
  return results
