"""Shared config schema for jaxclr pretraining.

Every hyperparameter that SIMCLR_REFERENCE.md names has a field here with the
paper's default; the per-dataset files (imagenet.py, cifar10.py, default.py)
override what differs. Derived values (scaled learning rate, step counts) are
never stored here: `jaxclr.optim.training_plan` computes them in one place.
"""

from __future__ import annotations

import ml_collections


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
  ))

  # ---- Model (section 5) ----
  c.model = ml_collections.ConfigDict(dict(
      depth=50,
      width_multiplier=1,
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
  c.mesh_axis_type = "explicit"  # 'explicit' or 'auto' data axis.
  return c
