"""What the data code reads, as frozen (hashable) values: no ConfigDict.

`config_lib.data_spec(config)` is the one conversion from a config. The
values are static Python: safe to close over in tf.data and jit-traced code,
and `AugmentParams` can be a static argument of a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# Layout of the per-view colour parameters, "color_params" float32 [b, 2, P]
# in an augment.on_device=True batch. The host draws them (augment.py,
# `draw_color_params`) and either applies them itself (on_device=False) or
# ships them to `device_augment.augment_views`: one random stream.
#   JITTER    1.0 if the colour jitter is applied (p = color_jitter_prob)
#   ORDER     4 slots: the jitter op applied at position 0..3, as a float
#             op index (0 brightness, 1 contrast, 2 saturation, 3 hue)
#   BRIGHT    brightness factor ('simclrv2') or additive delta ('simclrv1')
#   CONTRAST  contrast factor
#   SAT       saturation factor
#   HUE       hue delta, in turns
#   GRAY      1.0 if converted to grayscale (p = grayscale_prob)
#   BLUR      1.0 if blurred (p = blur_prob)
#   SIGMA     blur sigma in pixels
JITTER, ORDER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA = (
    0, 1, 5, 6, 7, 8, 9, 10, 11)
NUM_COLOR_PARAMS = 12  # P


def blur_kernel_radius(image_size: int) -> int:
  """SimCLR's kernel: 2 * ((size // 10) // 2) + 1 taps (23 at 224, 3 at 32)."""
  return (image_size // 10) // 2


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """SimCLR's augmentation (docs/simclr.md section 4); the fields of
  `config.augment` in config_lib.base_config(), ranges as tuples."""
  crop_area_range: tuple[float, float]
  crop_min_object_covered: float
  crop_aspect_ratio_range: tuple[float, float]
  flip: bool
  color_jitter_strength: float
  color_jitter_prob: float
  grayscale_prob: float
  brightness_impl: str  # 'simclrv2' multiplicative, 'simclrv1' additive.
  use_blur: bool
  blur_prob: float
  blur_sigma_range: tuple[float, float]
  on_device: bool  # Colour/grayscale/blur applied by the device step.
  transfer_dtype: str  # 'float32' or 'uint8' views host -> device.
  # Multi-crop (SwAV, DINO): this many local crops per image besides the two
  # global views, each local_crop_size px, its area fraction drawn from
  # local_crop_area_range (the global views keep crop_area_range). 0: the
  # two views only, drawn exactly as without these fields.
  num_local_crops: int = 0
  local_crop_size: int = 96
  local_crop_area_range: tuple[float, float] = (0.05, 0.14)

  @property
  def jitter_on(self) -> bool:
    return self.color_jitter_strength > 0 and self.color_jitter_prob > 0

  @property
  def grayscale_on(self) -> bool:
    return self.grayscale_prob > 0

  @property
  def blur_on(self) -> bool:
    return self.use_blur and self.blur_prob > 0

  def crop_only(self) -> "AugmentParams":
    """The same crop + flip with no colour, grayscale or blur, all on the
    host: the labelled views of the paper probe and of fine-tuning."""
    return dataclasses.replace(self, color_jitter_prob=0.0,
                               grayscale_prob=0.0, use_blur=False,
                               on_device=False)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which data to read and how: everything under jaxclr/data/ reads this."""
  dataset: str
  data_dir: Optional[str]
  train_split: Optional[str]  # None: the dataset's default.
  eval_split: Optional[str]
  data_access: str  # TFDS: 'auto', 'random', 'memory', 'stream'.
  image_size: int
  seed: int
  synthetic_num_examples: int
  synthetic_num_classes: int
  shuffle_buffer_multiplier: int  # tf.data streaming fallback only.
  augment: AugmentParams
  # folder:/npz: in one pile: the fraction held out as split 'holdout'.
  holdout_fraction: float = 0.0

  def replace(self, **changes) -> "DataSpec":
    return dataclasses.replace(self, **changes)
