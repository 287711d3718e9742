"""A frozen encoder for evaluation: restored from a pretraining workdir, or
randomly initialised (the baseline), and a sharded feature extractor.

The architecture comes from the workdir's config.json (rebuilt with
`build_model`), never from the evaluation config; a model field that the
evaluation config sets explicitly must agree with it. Only the encoder and
projection-head variables (params + BatchNorm statistics) are read from the
checkpoint: the optimizer state and the online probe are not restored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxclr import config as config_lib, errors
from jaxclr.models.simclr import build_model
from jaxclr.parallel import sharding
from jaxclr.training import checkpoint, workdir as workdir_lib

# Model fields an evaluation config may pin; they must match the checkpoint.
ARCH_FIELDS = ("depth", "width_multiplier", "cifar_stem", "sk_ratio",
               "se_ratio", "num_proj_layers", "proj_out_dim", "proj_hidden_dim",
               "proj_output_norm", "bn_momentum",
               "bn_epsilon", "compute_dtype")
VARIABLE_PARTS = ("encoder", "projection_head")
# Model fields that say how the writing job ran on its own devices, not what
# it built: a job that reads the run takes its own value (default 'auto'),
# so a one-device run's conv_kernel_grad='patches' or conv_library='onednn'
# does not stop an evaluation on 8 devices (jaxclr/cpu: one device only).
PER_JOB_FIELDS = ("conv_kernel_grad", "conv_library")


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  """A SimCLR network without its probe, and its variables for inference."""
  model: Any  # SimCLRModel with num_classes=0.
  variables: dict  # {"params": {...}, "batch_stats": {...}}
  model_config: dict
  image_size: int
  checkpoint_step: int | None  # None: random initialisation.
  source: str  # The workdir, or "random_init".


def pretraining_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was pretrained with; WorkdirError if it has none."""
  raw = workdir_lib.require_pretraining_workdir(workdir)
  config = config_lib.base_config()
  config.update_from_flattened_dict(
      {k: tuple(v) if isinstance(v, list) else v
       for k, v in workdir_lib.flatten(raw).items()
       if k in _flat_keys(config)
       and k.removeprefix("model.") not in PER_JOB_FIELDS})
  return config


def _flat_keys(config) -> set:
  return set(workdir_lib.flatten(workdir_lib.config_to_dict(config)))


def check_architecture(eval_model: dict | None, pretrained_model: dict,
                       workdir: str) -> None:
  """ConfigError naming every explicitly set model field that disagrees."""
  if not eval_model:
    return
  diffs = [f"model.{k}={eval_model[k]!r} (checkpoint has {pretrained_model.get(k)!r})"
           for k in ARCH_FIELDS
           if eval_model.get(k) is not None and k in pretrained_model
           and eval_model[k] != pretrained_model[k]]
  if diffs:
    raise errors.ConfigError(
        "eval config's model does not match the pretrained checkpoint in "
        f"{workdir}: " + "; ".join(diffs) + ". Drop these fields (the "
        "architecture is read from the workdir's config.json) or fix them.")


def _abstract_variables(model, image_size: int, mesh):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((2, image_size, image_size, 3)), train=True))
  repl = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      {"params": dict(shapes["params"]),
       "batch_stats": dict(shapes["batch_stats"])})


def restore_variables(ckpt_dir: str, step: int, abstract: dict, *,
                      what: str, hint: str = "") -> dict:
  """{params, batch_stats} named by `abstract` (a subtree of the checkpoint's
  variables) from the checkpoint at `step`; WorkdirError naming the first
  variable the checkpoint lacks (`what`: whose variables they are)."""
  with checkpoint.CheckpointStore(ckpt_dir, read_only=True) as store:
    restored = store.restore_subtree(step, abstract)
  variables = {"params": restored["params"],
               "batch_stats": restored["batch_stats"]}
  # A partial restore leaves abstract leaves where the checkpoint lacks a
  # variable of the current model: the code that wrote it named them otherwise.
  missing = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_leaves_with_path(variables)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise workdir_lib.WorkdirError(
        f"checkpoint {ckpt_dir}/{step} lacks {len(missing)} variable(s) of the "
        f"{what} (first: {missing[0]}){hint}")
  return variables


def restore_encoder(workdir: str, mesh, step: int | None = None,
                    eval_model: dict | None = None,
                    conv=None) -> FrozenEncoder:
  """The encoder + projection head of `workdir`'s newest (or `step`)
  checkpoint; conv: the convolution to build it with (None: XLA's)."""
  config = pretraining_config(workdir)
  model_dict = workdir_lib.config_to_dict(config.model)
  check_architecture(eval_model, model_dict, workdir)
  ckpt_dir = os.path.join(os.path.abspath(workdir), workdir_lib.CHECKPOINT_DIR)
  steps = workdir_lib.checkpoint_steps(workdir)
  if not steps:
    raise workdir_lib.WorkdirError(
        f"pretrained_workdir={workdir!r} has no checkpoint under {ckpt_dir}; "
        "pretrain first (python -m jaxclr.main ... --workdir "
        f"{workdir})")
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise workdir_lib.WorkdirError(
        f"checkpoint_step={step} is not in {ckpt_dir}; available: {steps}")
  model = build_model(config, num_classes=0, conv=conv)
  abstract = _abstract_variables(model, config.image_size, mesh)
  item = {"params": {k: abstract["params"][k] for k in VARIABLE_PARTS},
          "batch_stats": {k: abstract["batch_stats"][k]
                          for k in VARIABLE_PARTS}}
  variables = restore_variables(
      ckpt_dir, step, item,
      what="model that config.json describes",
      hint="; it was written by a jaxclr version with other variable names")
  return FrozenEncoder(model=model, variables=variables,
                       model_config=model_dict, image_size=config.image_size,
                       checkpoint_step=step, source=os.path.abspath(workdir))


def random_encoder(eval_config, mesh, conv=None) -> FrozenEncoder:
  """A randomly initialised encoder of the eval config's architecture
  (config_lib.validate has checked that it is set); conv as
  restore_encoder's."""
  config = config_lib.base_config()
  config.model.update({k: v for k, v in eval_config.model.items()
                       if v is not None})
  config.image_size = eval_config.image_size
  config.dataset = "synthetic"  # Validate the architecture fields only.
  config_lib.validate(config)
  model = build_model(config, num_classes=0, conv=conv)
  init = jax.jit(lambda rng: model.init(
      rng, jnp.zeros((2, config.image_size, config.image_size, 3)),
      train=True), out_shardings=sharding.replicated(mesh))
  variables = init(jax.random.key(eval_config.seed))
  variables = {"params": variables["params"],
               "batch_stats": variables["batch_stats"]}
  return FrozenEncoder(model=model, variables=variables,
                       model_config=workdir_lib.config_to_dict(config.model),
                       image_size=config.image_size, checkpoint_step=None,
                       source="random_init")


def feature_names(num_proj_layers: int) -> list[str]:
  """'h' (feature_layer 0) and 'proj<k>' for head layer k = 1..L."""
  return ["h"] + [f"proj{k}" for k in range(1, num_proj_layers + 1)]


def select_features(out: dict, feature_layer: int):
  """feature_layer 0: h; k >= 1: output of projection-head layer k."""
  if feature_layer == 0:
    return out["h"]
  return out["proj"][feature_layer - 1].astype(jnp.float32)


def make_feature_fn(model, mesh, feature_layer: int = 0):
  """Jitted (variables, images [B, H, W, 3] batch-sharded) -> features
  [B, D], batch-sharded, in inference mode (BatchNorm moving statistics).
  `model` is a SimCLRModel; feature_layer as in select_features."""
  n_layers = model.projection_head.num_layers
  if not 0 <= feature_layer <= n_layers:
    raise errors.ConfigError(
        f"feature_layer={feature_layer} is invalid for a {n_layers}-layer "
        f"projection head; valid: 0 (h) to {n_layers}")

  def features(variables, images):
    out = model.apply(variables, images.astype(jnp.float32), train=False)
    return select_features(out, feature_layer)

  return sharding.jit_over_batch(features, mesh)


def extract_features(feature_fn, variables, mesh, batches
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Runs `feature_fn` over process-local eval batches (dicts with images,
  labels, mask: `input_pipeline.eval_batches`); returns the whole split's
  (features [N, D], labels [N]) on EVERY process, in dataset order.

  The global batch's features are all-gathered to every host
  (process_allgather), because the probes that follow (L-BFGS, kNN) run the
  same program on every process from host copies of the features.
  """
  feats, labels = [], []
  for b in batches:
    g = sharding.global_batch(mesh, {k: b[k] for k in ("images", "labels",
                                                        "mask")})
    f = feature_fn(variables, g["images"])
    mask = multihost_utils.process_allgather(g["mask"], tiled=True)
    feats.append(multihost_utils.process_allgather(f, tiled=True)[mask])
    labels.append(multihost_utils.process_allgather(g["labels"],
                                                    tiled=True)[mask])
  return np.concatenate(feats), np.concatenate(labels)
