"""`validate(config)`: every rule on every job's config, in one place.

Read it as `jaxclr.config.rules`. The rules run before any data is
read or anything is compiled; each failure is one ConfigError line naming
the bad value and what would be valid. Rules that need the pretraining
workdir's config.json or the dataset (ft_proj_selector against the
checkpoint's head, batch_size against the labelled subset) stay with the
jobs; rules that need the device layout are `check_batch_sizes`, a function
of plain numbers, so this module imports no JAX.
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections

from jaxclr import errors
from jaxclr.config import schema as config_schema
from jaxclr.config.checks import (
    check as _check, in_range as _range, non_negative as _non_negative,
    positive as _positive, probability as _probability)

ConfigError = errors.ConfigError

DEPTHS = (18, 34, 50, 101, 152, 200)
COMPUTE_DTYPES = ("float32", "bfloat16")
TFDS_DATASETS = ("imagenet2012", "imagenet2012_subset/1pct",
                 "imagenet2012_subset/10pct", "cifar10", "cifar100", "stl10")
BUILTIN_DATASETS = TFDS_DATASETS + ("digits", "synthetic")
DATASET_PREFIXES = ("folder:", "npz:", "tfds:")
# data_dir values that TFDS reads through tf.io.gfile (Cloud Storage, ...):
# checked when the dataset is opened, not here (no local path to stat).
REMOTE_PATH_PREFIXES = ("gs://", "s3://", "hdfs://")
# The hue delta is 0.2 * strength and tf.image.adjust_hue needs |delta| <= 0.5.
MAX_COLOR_JITTER_STRENGTH = 2.5
PROTOCOLS = ("fast", "paper", "knn")  # linear_eval.
OPTIMIZERS = ("momentum", "lars")  # finetune, distill.
PRETRAIN_OPTIMIZERS = ("lars", "sgd")
TEACHER_VIEWS = ("same", "clean")  # distill.
# TFDS datasets whose training split is itself the labelled subset.
SUBSET_DATASETS = ("imagenet2012_subset/1pct", "imagenet2012_subset/10pct")
# Per job: its entry point and the config file to start from.
ENTRY_POINTS = {"pretrain": ("jaxclr.main", "configs/default.py"),
                "linear_eval": ("jaxclr.linear_eval", "configs/linear_eval.py"),
                "finetune": ("jaxclr.finetune", "configs/finetune.py"),
                "distill": ("jaxclr.distill", "configs/distill.py")}


def tfds_data_dir(config) -> str | None:
  """Where a TFDS dataset is read from: config.data_dir, else $TFDS_DATA_DIR,
  else ~/tensorflow_datasets when it exists (the same order as the source)."""
  if config.data_dir:
    return config.data_dir
  if os.environ.get("TFDS_DATA_DIR"):
    return os.environ["TFDS_DATA_DIR"]
  default = os.path.expanduser("~/tensorflow_datasets")
  return default if os.path.isdir(default) else None


def subset_options(config) -> list[str]:
  """The label-subset options a finetune config sets, as 'name=value'."""
  chosen = []
  if config.label_fraction is not None:
    chosen.append(f"label_fraction={config.label_fraction!r}")
  if config.labels_per_class is not None:
    chosen.append(f"labels_per_class={config.labels_per_class!r}")
  if config.dataset in SUBSET_DATASETS:
    chosen.append(f"dataset={config.dataset!r}")
  return chosen


def check_batch_sizes(config, names: Sequence[str], *, num_devices: int,
                      num_processes: int) -> None:
  """ConfigError unless each config[name] splits over the processes and
  devices (checked before anything is read or compiled)."""
  for name in names:
    b = config[name]
    if b % num_devices or b % num_processes:
      prefix = "" if name == "batch_size" else f"{name}: "
      raise ConfigError(
          f"{prefix}batch_size={b} must be divisible by the number of devices "
          f"({num_devices}) and of processes ({num_processes}); nearest "
          f"valid: {max(num_devices, b // num_devices * num_devices)}")


def _flat_keys(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      yield from _flat_keys(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def validate(config: ml_collections.ConfigDict, job: str | None = None) -> None:
  """Checks every field a run reads, before any data loading or compilation.

  Args:
    config: a config built from one of the schemas (config_lib.
      pretrain_config(), linear_eval_config(), finetune_config()).
    job: the job the caller runs ('pretrain', 'linear_eval', 'finetune');
      a config for another job is refused. None: config.job's rules.

  Raises:
    ConfigError naming the bad value and what would be valid.
  """
  _check_job(config, job)
  _check_fields(config)
  _check_data(config)
  _check_model(config)
  _check_optimization(config)
  _check_loop(config)
  {"pretrain": _check_pretrain, "linear_eval": _check_linear_eval,
   "finetune": _check_finetune, "distill": _check_distill}[config.job](config)


def _check_job(config, job: str | None):
  if job is not None and job not in config_schema.JOBS:
    raise ValueError(f"validate(job={job!r}); valid: {config_schema.JOBS}")
  if "job" not in config:
    expected = f" {job}" if job else ""
    start = (f"config_lib.{job}_config() ({ENTRY_POINTS[job][1]})" if job else
             "config_lib.pretrain_config(), linear_eval_config() or "
             "finetune_config()")
    raise ConfigError(f"the{expected} config has no 'job' field; build it "
                      f"from {start}")
  _check(config.job in config_schema.JOBS,
         f"job={config.job!r} is unknown; valid: {config_schema.JOBS}")
  if job is not None and config.job != job:
    module, example = ENTRY_POINTS[job]
    raise ConfigError(
        f"this is a {config.job!r} config (job={config.job!r}); {module} "
        f"needs a {job} config such as {example}")


def _check_fields(config):
  """Neither unknown (a typo, a field of another job) nor missing fields."""
  expected = set(_flat_keys(config_schema.job_schema(config.job)))
  given = set(_flat_keys(config))
  builder = f"jaxclr/config/schema.py:{config.job}_config()"
  unknown = sorted(given - expected)
  _check(not unknown, f"unknown config field(s) {', '.join(unknown)} for "
         f"job={config.job!r}; the fields are those of {builder}")
  missing = sorted(expected - given)
  _check(not missing, f"missing config field(s) {', '.join(missing)} for "
         f"job={config.job!r}; start the config from {builder}")


def _is_tfds(ds: str) -> bool:
  return ds in TFDS_DATASETS or ds.startswith("tfds:")


def _check_data(config):
  """dataset, data_dir, image_size; None (eval jobs): the checkpoint's."""
  pretraining = config.job == "pretrain"
  ds = config.dataset
  if ds is not None or pretraining:
    _check(isinstance(ds, str) and (ds in BUILTIN_DATASETS or
                                    ds.startswith(DATASET_PREFIXES)),
           f"dataset={ds!r} is unknown; valid: {', '.join(BUILTIN_DATASETS)}, "
           "'folder:/path/to/images', 'npz:/path/to/file.npz' or "
           "'tfds:NAME' for any other TFDS dataset")
    _check(not ds.startswith(DATASET_PREFIXES) or len(ds.split(":", 1)[1]) > 0,
           f"dataset={ds!r} needs a "
           f"{'name' if ds.startswith('tfds:') else 'path'} after the colon")
  # An eval job without a data_dir reads the pretraining run's (unknown
  # here), unless it has none: a random-init baseline.
  random_init = (not pretraining and config.pretrained_workdir is not None and
                 config.pretrained_workdir.lower() == "none")
  if ds is not None and _is_tfds(ds) and (
      pretraining or random_init or config.data_dir):
    data_dir = tfds_data_dir(config)
    _check(data_dir is not None,
           f"dataset={ds!r} is read from a prepared TFDS build but data_dir "
           "is not set; pass --config.data_dir=DIR (or set TFDS_DATA_DIR)")
    _check(data_dir.startswith(REMOTE_PATH_PREFIXES) or os.path.isdir(data_dir),
           f"data_dir={data_dir!r} (for dataset={ds!r}) does not exist")
  f = config.holdout_fraction
  if f is not None:
    _check(0.0 <= f < 1.0, f"holdout_fraction={f!r} must be in [0, 1) (0 = "
           "no held-out split)")
    _check(f == 0 or ds is None or ds.startswith(("folder:", "npz:")),
           f"holdout_fraction={f!r} applies to folder:/npz: data only; "
           f"dataset={ds!r} has its own held-out split (set eval_split)")
  size = config.image_size
  if size is not None or pretraining:
    _check(isinstance(size, int) and size >= 8,
           f"image_size={size!r} must be >= 8 pixels")


def _check_model(config):
  """Every architecture field that is set (eval jobs: None = checkpoint's)."""
  m = config.model
  if m.depth is not None:
    _check(m.depth in DEPTHS,
           f"model.depth={m.depth!r} is unknown; valid: {DEPTHS}")
  if m.width_multiplier is not None:
    _positive("model.width_multiplier", m.width_multiplier)
  if m.sk_ratio is not None:
    _check(m.sk_ratio >= 0, f"model.sk_ratio={m.sk_ratio!r} must be >= 0 "
           "(0 = plain ResNet, 0.0625 = SimCLRv2's selective kernels)")
  if m.se_ratio is not None:
    _check(0.0 <= m.se_ratio < 1.0,
           f"model.se_ratio={m.se_ratio!r} must be in [0, 1) (0 = no "
           "squeeze-excitation)")
  if m.num_proj_layers is not None:
    _check(m.num_proj_layers >= 1,
           f"model.num_proj_layers={m.num_proj_layers!r} must be >= 1 "
           "(2 = SimCLRv1 head, 3 = SimCLRv2 head)")
  if m.proj_out_dim is not None:
    _positive("model.proj_out_dim", m.proj_out_dim)
  if m.get("proj_hidden_dim") is not None:
    _check(m.proj_hidden_dim >= 0,
           f"model.proj_hidden_dim={m.proj_hidden_dim!r} must be >= 0 "
           "(0 = the encoder's output width)")
  if m.get("proj_output_norm") is not None:
    _check(m.proj_output_norm in config_schema.PROJ_OUTPUT_NORMS,
           f"model.proj_output_norm={m.proj_output_norm!r}; valid: "
           f"{', '.join(config_schema.PROJ_OUTPUT_NORMS)}")
  if m.compute_dtype is not None:
    _check(m.compute_dtype in COMPUTE_DTYPES,
           f"model.compute_dtype={m.compute_dtype!r}; valid: {COMPUTE_DTYPES}")
  if m.get("conv_kernel_grad") is not None:
    _check(m.conv_kernel_grad in config_schema.CONV_KERNEL_GRADS,
           f"model.conv_kernel_grad={m.conv_kernel_grad!r}; valid: "
           f"{', '.join(config_schema.CONV_KERNEL_GRADS)}")
  if m.get("conv_library") is not None:
    _check(m.conv_library in config_schema.CONV_LIBRARIES,
           f"model.conv_library={m.conv_library!r}; valid: "
           f"{', '.join(config_schema.CONV_LIBRARIES)}")
  if m.bn_momentum is not None:
    _check(0.0 <= m.bn_momentum < 1.0,
           f"model.bn_momentum={m.bn_momentum!r} must be in [0, 1)")
  if m.bn_epsilon is not None:
    _positive("model.bn_epsilon", m.bn_epsilon)


def _check_optimization(config):
  _positive("batch_size", config.batch_size)
  _positive("learning_rate", config.learning_rate)
  _check(config.learning_rate_scaling in ("linear", "sqrt"),
         f"learning_rate_scaling={config.learning_rate_scaling!r}; "
         "valid: 'linear', 'sqrt' (lr x B/256, lr x sqrt(B))")
  _non_negative("weight_decay", config.weight_decay)
  _check(0.0 <= config.momentum < 1.0,
         f"momentum={config.momentum!r} must be in [0, 1)")
  if "trust_coefficient" in config:  # LARS jobs.
    _positive("trust_coefficient", config.trust_coefficient)
  if config.num_train_steps <= 0:  # Else num_train_steps sets the length.
    _check(config.num_epochs > 0, f"num_epochs={config.num_epochs!r} must "
           "be > 0 (or set num_train_steps > 0)")
    _check(config.warmup_epochs < config.num_epochs,
           f"warmup_epochs={config.warmup_epochs!r} must be shorter than "
           f"num_epochs={config.num_epochs!r}")
  _non_negative("warmup_epochs", config.warmup_epochs)


def _check_loop(config):
  for name in ("log_every_steps", "checkpoint_every_steps",
               "max_checkpoints_to_keep"):
    _positive(name, config[name])
  _check(config.nonfinite_policy in ("stop", "skip"),
         f"nonfinite_policy={config.nonfinite_policy!r}; valid: 'stop', 'skip'")
  _check(config.mesh_axis_type in ("explicit", "auto"),
         f"mesh_axis_type={config.mesh_axis_type!r}; valid: 'explicit', 'auto'")


def method_options(config):
  """The chosen method and its options: (Method, its config section
  frozen). The one place a method's section is read from a config."""
  from jaxclr import methods  # pylint: disable=g-import-not-at-top
  try:
    method = methods.get(config.method)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return method, ml_collections.FrozenConfigDict(config[method.name])


def check_labels(config, num_classes: int) -> None:
  """ConfigError if the method reads class labels and the training split
  has none (num_classes == 0): checked once the source is open, before any
  compilation. validate() already refuses the cases known from the config."""
  method, opts = method_options(config)
  _check(not method.reads_class_labels(opts) or num_classes > 0,
         f"method={config.method!r} with class positives needs a labelled "
         f"dataset, but dataset={config.dataset!r} has no labels; use a "
         f"labelled dataset or --config.{method.name}.positives=instance "
         "(the two views of an image as positives)")


def _check_method(config):
  method, opts = method_options(config)
  method.check(opts, config)
  if not method.reads_class_labels(opts):
    return
  # The unlabelled training sets known from the config alone; the others
  # are refused by check_labels once the source is open.
  from jaxclr.data import sources  # pylint: disable=g-import-not-at-top
  if config.dataset == "synthetic":
    check_labels(config, config.synthetic.num_classes)
  elif config.dataset in sources.TFDS_DEFAULT_SPLITS:
    split = config.train_split or sources.TFDS_DEFAULT_SPLITS[config.dataset][0]
    _check((config.dataset, split) not in sources.LABELLED_INSTEAD_OF,
           f"method={config.method!r} with class positives needs labelled "
           f"training examples, but dataset={config.dataset!r} split "
           f"{split!r} is unlabelled; set train_split to a labelled split or "
           f"--config.{method.name}.positives=instance")


def _check_pretrain(config):
  _check_method(config)
  _check(config.optimizer in PRETRAIN_OPTIMIZERS,
         f"optimizer={config.optimizer!r}; valid for pretraining: "
         f"{PRETRAIN_OPTIMIZERS} ('sgd': momentum SGD, as SupCon's recipe)")
  a = config.augment
  _range("augment.crop_area_range", a.crop_area_range, 1e-3, 1.0)
  _range("augment.crop_aspect_ratio_range", a.crop_aspect_ratio_range, 1e-2, 1e2)
  _probability("augment.crop_min_object_covered", a.crop_min_object_covered)
  s = a.color_jitter_strength
  _check(0 <= s <= MAX_COLOR_JITTER_STRENGTH,
         f"augment.color_jitter_strength={s!r}; valid: 0 to "
         f"{MAX_COLOR_JITTER_STRENGTH} (hue delta 0.2*s must stay <= 0.5)")
  for name in ("color_jitter_prob", "grayscale_prob", "blur_prob"):
    _probability(f"augment.{name}", a[name])
  _check(a.brightness_impl in ("simclrv1", "simclrv2"),
         f"augment.brightness_impl={a.brightness_impl!r}; "
         "valid: 'simclrv1' (additive), 'simclrv2' (multiplicative)")
  _range("augment.blur_sigma_range", a.blur_sigma_range, 1e-6, 1e3)
  _check(a.transfer_dtype in ("float32", "uint8"),
         f"augment.transfer_dtype={a.transfer_dtype!r}; valid: 'float32', "
         "'uint8'")
  _check_local_crops(config)


def _check_local_crops(config):
  """Multi-crop: counts and sizes, and a method that reads the local crops
  (another would compute them for nothing)."""
  a = config.augment
  k = a.num_local_crops
  _check(isinstance(k, int) and k >= 0,
         f"augment.num_local_crops={k!r} must be an int >= 0 (0 = the two "
         "global views only)")
  if k == 0:
    return
  method, opts = method_options(config)
  if not method.reads_local_crops(opts):
    from jaxclr import methods  # pylint: disable=g-import-not-at-top
    readers = [m.name for m in methods.registered() if m.reads_local_crops(
        ml_collections.FrozenConfigDict(config[m.name]))]
    _check(False, f"augment.num_local_crops={k} but method={config.method!r} "
           "trains on the two global views only; set it to 0, or use a "
           f"method that reads local crops ({', '.join(readers) or 'none'})")
  size = a.local_crop_size
  _check(isinstance(size, int) and 1 <= size <= config.image_size,
         f"augment.local_crop_size={size!r} must be an int in [1, "
         f"image_size={config.image_size}] (local crops are the small ones; "
         "SwAV and DINO: 96 px beside 224)")
  _range("augment.local_crop_area_range", a.local_crop_area_range, 1e-3, 1.0)


def _check_encoder_source(config, example: str, required_model: tuple):
  """pretrained_workdir, checkpoint_step, eval_batch_size; a random-init
  baseline needs the architecture (the `required_model` fields; the others
  default to pretrain_config()'s), dataset and image size in the config."""
  _check(config.pretrained_workdir is not None,
         "pretrained_workdir is required: a pretraining --workdir, or 'none' "
         "for a random-init baseline")
  _check(config.checkpoint_step >= -1,
         f"checkpoint_step={config.checkpoint_step!r} must be -1 (the newest) "
         "or a step >= 0")
  _positive("eval_batch_size", config.eval_batch_size)
  if config.pretrained_workdir.lower() == "none":
    unset = [f"model.{k}" for k in required_model
             if config.model[k] is None]
    unset += [k for k in ("dataset", "image_size") if config[k] is None]
    _check(not unset,
           "pretrained_workdir='none' (random init) needs the architecture, "
           f"dataset and image size in the config; unset: {', '.join(unset)} "
           f"(set model.depth, model.width_multiplier, ..., e.g. {example})")


def _check_linear_eval(config):
  _check_encoder_source(config, "configs/linear_eval.py:random_init",
                        required_model=("depth",))
  _check(config.protocol in PROTOCOLS,
         f"protocol={config.protocol!r}; valid: {PROTOCOLS}")
  _check(config.feature_layer >= 0,
         f"feature_layer={config.feature_layer!r} must be >= 0 (0 = h)")
  for name in ("knn_k", "knn_temperature", "fast_max_iters"):
    _positive(name, config[name])
  _non_negative("fast_l2", config.fast_l2)
  _check(all(int(k) >= 1 for k in config.labels_per_class),
         f"labels_per_class={tuple(config.labels_per_class)!r}: each must "
         "be >= 1")
  _check(config.num_label_draws >= 1,
         f"num_label_draws={config.num_label_draws!r} must be >= 1")


def _check_distill(config):
  _check(config.teacher_workdir is not None,
         "teacher_workdir is required: a jaxclr.finetune or jaxclr.distill "
         "--workdir, or a pretraining-format workdir with a supervised head "
         "(jaxclr.convert)")
  _check(config.teacher_checkpoint_step >= -1,
         f"teacher_checkpoint_step={config.teacher_checkpoint_step!r} must be "
         "-1 (the newest) or a step >= 0")
  _check(config.pretrained_workdir is not None,
         "pretrained_workdir is required: 'teacher' (the teacher's "
         "pretrained encoder), a pretraining --workdir, or 'none' (random "
         "init of the model fields set in the config)")
  _check(config.checkpoint_step >= -1,
         f"checkpoint_step={config.checkpoint_step!r} must be -1 (the newest) "
         "or a step >= 0")
  _positive("eval_batch_size", config.eval_batch_size)
  if config.pretrained_workdir.lower() == "none":
    unset = [f"model.{k}" for k in ("depth", "num_proj_layers")
             if config.model[k] is None]
    _check(not unset, "pretrained_workdir='none' (a random-init student) "
           f"needs its architecture in the config; unset: {', '.join(unset)}"
           " (e.g. --config.model.depth=18 --config.model.num_proj_layers=2)")
  _check(config.ft_proj_selector >= 0,
         f"ft_proj_selector={config.ft_proj_selector!r} must be >= 0 (0 = h, "
         "k = after projection-head layer k)")
  _positive("temperature", config.temperature)
  _check(config.teacher_view in TEACHER_VIEWS,
         f"teacher_view={config.teacher_view!r}; valid: {TEACHER_VIEWS}")
  _non_negative("labelled_weight", config.labelled_weight)
  f, k = config.label_fraction, config.labels_per_class
  _check(f is None or 0 < f <= 1, f"label_fraction={f!r} must be in (0, 1]")
  _check(k is None or k >= 1, f"labels_per_class={k!r} must be >= 1")
  # Only these two: a subset dataset would replace the unlabelled images.
  chosen = [o for o in subset_options(config) if not o.startswith("dataset")]
  if config.labelled_weight > 0:
    _check(len(chosen) == 1,
           f"labelled_weight={config.labelled_weight!r} needs exactly one "
           f"label subset, got {len(chosen)}"
           + (f" ({', '.join(chosen)})" if chosen else "")
           + ": label_fraction (0 < f <= 1) or labels_per_class (k >= 1)")
  else:
    _check(not chosen, f"{', '.join(chosen)} has no effect with "
           "labelled_weight=0 (the student sees no labels); set "
           "labelled_weight > 0 or drop it")
  _check(config.optimizer in OPTIMIZERS,
         f"optimizer={config.optimizer!r}; valid: {OPTIMIZERS}")


def _check_finetune(config):
  # ft_proj_selector is checked against num_proj_layers below.
  _check_encoder_source(config, "configs/finetune.py:random_init",
                        required_model=("depth", "num_proj_layers"))
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
  if config.pretrained_workdir.lower() == "none":  # Else the checkpoint's.
    n = int(config.model.num_proj_layers)
    _check(config.ft_proj_selector <= n,
           f"ft_proj_selector={config.ft_proj_selector} is invalid for a "
           f"{n}-layer projection head; valid: 0 (h, head discarded) to {n} "
           "(1 = SimCLRv2's choice for 1% / 10% labels)")
