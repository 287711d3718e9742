"""jaxclr's configs: parsing config-file arguments, the schemas, validation.

The one import name for them: `parse_arg` and `load_config_file` (here), the
schemas `pretrain_config()` (also `base_config()`, the same thing),
`linear_eval_config()`, `finetune_config()` and `distill_config()`
(jaxclr/config/schema.py),
and `validate(config, job=None)`, `check_batch_sizes` and `ConfigError`
(jaxclr/config/rules.py). Every configs/*.py starts from one schema;
each schema's `job` field says which entry point it is for.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxclr import errors
from jaxclr.config.schema import (  # pylint: disable=unused-import
    cifar10_method_recipe, distill_config, finetune_config, JOBS,
    linear_eval_config, method_section_names, MODEL_FIELDS, pretrain_config,
    job_schema, set_digits_random_init)
from jaxclr.config.rules import (  # pylint: disable=unused-import
    BUILTIN_DATASETS, check_batch_sizes, check_labels, COMPUTE_DTYPES,
    DATASET_PREFIXES, DEPTHS, ENTRY_POINTS, method_options, OPTIMIZERS,
    PROTOCOLS, REMOTE_PATH_PREFIXES, SUBSET_DATASETS, subset_options,
    tfds_data_dir, TFDS_DATASETS, validate)

ConfigError = errors.ConfigError
# The pretraining schema, under the name most callers know it by.
base_config = pretrain_config


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


def data_spec(config):
  """The frozen `jaxclr.data.spec.DataSpec` of a config: the only place a
  ConfigDict becomes what jaxclr/data reads."""
  from jaxclr.data import spec  # pylint: disable=g-import-not-at-top
  a = config.augment
  return spec.DataSpec(
      dataset=config.dataset, data_dir=config.data_dir,
      train_split=config.train_split,
      eval_split=config.eval_split,
      holdout_fraction=float(config.holdout_fraction or 0.0),
      data_access=config.data_access,
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
          on_device=bool(a.on_device), transfer_dtype=str(a.transfer_dtype),
          num_local_crops=int(a.num_local_crops),
          local_crop_size=int(a.local_crop_size),
          local_crop_area_range=tuple(
              float(v) for v in a.local_crop_area_range)))
