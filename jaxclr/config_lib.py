"""The config schema for jaxclr pretraining, shared by every configs/*.py.

Every hyperparameter that SIMCLR_REFERENCE.md names has a field here with the
paper's default; the files in configs/ (imagenet.py, cifar10.py, default.py)
override what differs. Derived values (scaled learning rate, step counts) are
never stored here: `jaxclr.optim.training_plan` computes them in one place.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxclr import errors


def parse_arg(arg: str | None, **defaults):
  """Parses 'key=value,flag' config arguments into a ConfigDict of defaults.

  `python -m jaxclr.main --config configs/imagenet.py:depth=101,tiny` sets
  depth to 101 and tiny to True. Values take the type of their default; an
  unknown key is an error, so typos do not pass silently.
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      value = True
    elif isinstance(default, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={raw!r} must be true/false")
      value = raw.lower() in ("true", "1")
    elif default is None:
      value = raw
    else:
      value = type(default)(raw)
    parsed[key] = value
  return parsed


def load_config_file(path: str, arg: str | None = None):
  """get_config(arg) of a config file, as `--config path:arg` would load it."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config() -> ml_collections.ConfigDict:
  """All pretraining fields with SimCLR's defaults (ImageNet, R-50)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- Data ----
  # 'imagenet2012', 'imagenet2012_subset/1pct', 'cifar10', 'cifar100', 'stl10',
  # 'digits' (embedded), 'synthetic', 'folder:/path', 'npz:/path.npz'.
  c.dataset = "imagenet2012"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  # None: the dataset's own default (pretraining 'train', or 'unlabelled' for
  # stl10; eval 'validation' for ImageNet, 'test' for CIFAR/STL-10/digits).
  c.train_split = ml_collections.config_dict.placeholder(str)
  c.eval_split = ml_collections.config_dict.placeholder(str)
  # TFDS access: 'auto' (array_record -> random access; tfrecord -> in memory
  # when small, else a layout-dependent stream), 'random', 'memory', 'stream'.
  c.data_access = "auto"
  c.image_size = 224
  c.batch_size = 4096  # Global, in images (each image gives two views).
  c.shuffle_buffer_multiplier = 10  # tf.data streaming fallback only.
  c.synthetic = ml_collections.ConfigDict(dict(
      num_examples=1024, num_classes=10))

  # ---- Augmentation (SIMCLR_REFERENCE.md section 4) ----
  c.augment = ml_collections.ConfigDict(dict(
      crop_area_range=(0.08, 1.0),
      crop_min_object_covered=0.1,
      crop_aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      flip=True,
      color_jitter_strength=1.0,
      color_jitter_prob=0.8,
      grayscale_prob=0.2,
      brightness_impl="simclrv2",  # 'simclrv2' multiplicative, 'simclrv1' additive.
      use_blur=True,
      blur_prob=0.5,
      blur_sigma_range=(0.1, 2.0),
      on_device=False,  # Colour/grayscale/blur in JAX on the accelerator.
      # Host -> device views: 'float32' (exact), or 'uint8' (rounded to the
      # nearest 1/255 on the host, scaled back on device): 4x fewer bytes to
      # batch, copy and transfer, which roughly doubles host throughput at
      # 224 px (benchmarks/RESULTS.md).
      transfer_dtype="float32",
  ))

  # ---- Model (section 5) ----
  c.model = ml_collections.ConfigDict(dict(
      depth=50,
      width_multiplier=1.0,
      cifar_stem=ml_collections.config_dict.placeholder(bool),  # None: image_size <= 32.
      num_proj_layers=3,  # 3 = SimCLRv2 head; 2 = SimCLRv1.
      proj_out_dim=128,
      bn_momentum=0.9,
      bn_epsilon=1e-5,
      compute_dtype="float32",  # 'bfloat16': bf16 compute, float32 params.
  ))

  # ---- Objective ----
  c.temperature = 0.1
  c.hidden_norm = True
  # Online linear probe on stop_gradient(h) (TF2 lineareval_while_pretraining);
  # only active when the dataset has labels.
  c.linear_probe = True

  # ---- Optimisation (sections 2, 3) ----
  c.num_epochs = 100
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.learning_rate = 0.3
  c.learning_rate_scaling = "linear"  # 'linear': lr*B/256; 'sqrt': lr*sqrt(B).
  c.warmup_epochs = 10.0
  c.weight_decay = 1e-6
  c.momentum = 0.9
  c.trust_coefficient = 1e-3

  # ---- Loop, logging, checkpoints ----
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.max_checkpoints_to_keep = 3
  c.eval_every_steps = -1  # > 0: periodic kNN evaluation (labelled data only).
  c.nonfinite_policy = "stop"  # 'stop' or 'skip' the update.
  # Tests only: > 0 multiplies the loss of the update that produces step N
  # by NaN inside the jitted step (absent from the program when -1).
  c.debug_inject_nan_at_step = -1
  c.mesh_axis_type = "explicit"  # 'explicit' or 'auto' data axis.
  # Resume a workdir whose config.json differs in fields that change results.
  c.allow_config_mismatch = False
  return c


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


def tfds_data_dir(config) -> str | None:
  """Where a TFDS dataset is read from: config.data_dir, else $TFDS_DATA_DIR,
  else ~/tensorflow_datasets when it exists (the same order as the source)."""
  if config.get("data_dir"):
    return config.data_dir
  if os.environ.get("TFDS_DATA_DIR"):
    return os.environ["TFDS_DATA_DIR"]
  default = os.path.expanduser("~/tensorflow_datasets")
  return default if os.path.isdir(default) else None


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _positive(config, name: str, value):
  _check(value > 0, f"{name}={value!r} must be > 0")


def _probability(name: str, value):
  _check(0.0 <= value <= 1.0, f"{name}={value!r} must be a probability in [0, 1]")


def _range(name: str, value, lo: float, hi: float):
  _check(len(value) == 2 and lo <= value[0] <= value[1] <= hi,
         f"{name}={tuple(value)!r} must be (min, max) with "
         f"{lo} <= min <= max <= {hi}")


def _flat_keys(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      yield from _flat_keys(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field a run reads, before any data loading or compilation.

  Raises:
    ConfigError naming the bad value and what would be valid.
  """
  unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(base_config())))
  _check(not unknown, f"unknown config field(s) {', '.join(unknown)}; the "
         "fields are those of jaxclr/config_lib.py:base_config()")
  ds = config.dataset
  _check(isinstance(ds, str) and (ds in BUILTIN_DATASETS or
                                  ds.startswith(DATASET_PREFIXES)),
         f"dataset={ds!r} is unknown; valid: {', '.join(BUILTIN_DATASETS)}, "
         "'folder:/path/to/images', 'npz:/path/to/file.npz' or "
         "'tfds:NAME' for any other TFDS dataset")
  _check(not ds.startswith(DATASET_PREFIXES) or len(ds.split(":", 1)[1]) > 0,
         f"dataset={ds!r} needs a "
         f"{'name' if ds.startswith('tfds:') else 'path'} after the colon")
  if ds in TFDS_DATASETS or ds.startswith("tfds:"):
    data_dir = tfds_data_dir(config)
    _check(data_dir is not None,
           f"dataset={ds!r} is read from a prepared TFDS build but data_dir "
           "is not set; pass --config.data_dir=DIR (or set TFDS_DATA_DIR)")
    _check(data_dir.startswith(REMOTE_PATH_PREFIXES) or os.path.isdir(data_dir),
           f"data_dir={data_dir!r} (for dataset={ds!r}) does not exist")
  m = config.model
  _check(m.depth in DEPTHS, f"model.depth={m.depth!r} is unknown; valid: {DEPTHS}")
  _positive(config, "model.width_multiplier", m.width_multiplier)
  _check(m.num_proj_layers >= 1,
         f"model.num_proj_layers={m.num_proj_layers!r} must be >= 1 "
         "(2 = SimCLRv1 head, 3 = SimCLRv2 head)")
  _positive(config, "model.proj_out_dim", m.proj_out_dim)
  _check(m.compute_dtype in COMPUTE_DTYPES,
         f"model.compute_dtype={m.compute_dtype!r}; valid: {COMPUTE_DTYPES}")
  _check(0.0 <= m.bn_momentum < 1.0,
         f"model.bn_momentum={m.bn_momentum!r} must be in [0, 1)")
  _positive(config, "model.bn_epsilon", m.bn_epsilon)
  _check(isinstance(config.image_size, int) and config.image_size >= 8,
         f"image_size={config.image_size!r} must be >= 8 pixels")
  _positive(config, "batch_size", config.batch_size)
  _positive(config, "temperature", config.temperature)
  _positive(config, "learning_rate", config.learning_rate)
  _check(config.learning_rate_scaling in ("linear", "sqrt"),
         f"learning_rate_scaling={config.learning_rate_scaling!r}; "
         "valid: 'linear', 'sqrt'")
  _check(config.weight_decay >= 0,
         f"weight_decay={config.weight_decay!r} must be >= 0")
  _check(0.0 <= config.momentum < 1.0,
         f"momentum={config.momentum!r} must be in [0, 1)")
  _positive(config, "trust_coefficient", config.trust_coefficient)
  if config.num_train_steps <= 0:
    _check(config.num_epochs > 0, f"num_epochs={config.num_epochs!r} must "
           "be > 0 (or set num_train_steps > 0)")
    _check(config.warmup_epochs < config.num_epochs,
           f"warmup_epochs={config.warmup_epochs!r} must be shorter than "
           f"num_epochs={config.num_epochs!r}")
  _check(config.warmup_epochs >= 0,
         f"warmup_epochs={config.warmup_epochs!r} must be >= 0")
  for name in ("log_every_steps", "checkpoint_every_steps",
               "max_checkpoints_to_keep"):
    _positive(config, name, config[name])
  _check(config.debug_inject_nan_at_step == -1 or
         config.debug_inject_nan_at_step >= 1,
         f"debug_inject_nan_at_step={config.debug_inject_nan_at_step!r} must "
         "be -1 (off) or a step >= 1")
  _check(config.nonfinite_policy in ("stop", "skip"),
         f"nonfinite_policy={config.nonfinite_policy!r}; valid: 'stop', 'skip'")
  _check(config.mesh_axis_type in ("explicit", "auto"),
         f"mesh_axis_type={config.mesh_axis_type!r}; valid: 'explicit', 'auto'")
  a = config.augment
  _range("augment.crop_area_range", a.crop_area_range, 1e-3, 1.0)
  _range("augment.crop_aspect_ratio_range", a.crop_aspect_ratio_range, 1e-2, 1e2)
  _probability("augment.crop_min_object_covered", a.crop_min_object_covered)
  _check(a.color_jitter_strength >= 0,
         f"augment.color_jitter_strength={a.color_jitter_strength!r} must be >= 0")
  for name in ("color_jitter_prob", "grayscale_prob", "blur_prob"):
    _probability(f"augment.{name}", a[name])
  _check(a.brightness_impl in ("simclrv1", "simclrv2"),
         f"augment.brightness_impl={a.brightness_impl!r}; "
         "valid: 'simclrv1' (additive), 'simclrv2' (multiplicative)")
  _range("augment.blur_sigma_range", a.blur_sigma_range, 1e-6, 1e3)
  _check(a.transfer_dtype in ("float32", "uint8"),
         f"augment.transfer_dtype={a.transfer_dtype!r}; valid: 'float32', "
         "'uint8'")


def data_spec(config):
  """The frozen `jaxclr.data.spec.DataSpec` of a config: the only place a
  ConfigDict becomes what jaxclr/data reads."""
  from jaxclr.data import spec  # pylint: disable=g-import-not-at-top
  a = config.augment
  return spec.DataSpec(
      dataset=config.dataset, data_dir=config.get("data_dir"),
      train_split=config.get("train_split"),
      eval_split=config.get("eval_split"),
      data_access=config.get("data_access", "auto"),
      image_size=int(config.image_size), seed=int(config.seed),
      synthetic_num_examples=int(config.synthetic.num_examples),
      synthetic_num_classes=int(config.synthetic.num_classes),
      shuffle_buffer_multiplier=int(config.shuffle_buffer_multiplier),
      augment=spec.AugmentParams(
          crop_area_range=tuple(float(v) for v in a.crop_area_range),
          crop_min_object_covered=float(a.crop_min_object_covered),
          crop_aspect_ratio_range=tuple(
              float(v) for v in a.crop_aspect_ratio_range),
          flip=bool(a.flip),
          color_jitter_strength=float(a.color_jitter_strength),
          color_jitter_prob=float(a.color_jitter_prob),
          grayscale_prob=float(a.grayscale_prob),
          brightness_impl=str(a.brightness_impl),
          use_blur=bool(a.use_blur), blur_prob=float(a.blur_prob),
          blur_sigma_range=tuple(float(v) for v in a.blur_sigma_range),
          on_device=bool(a.on_device), transfer_dtype=str(a.transfer_dtype)))
