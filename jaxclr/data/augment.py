"""SimCLR augmentations on the host, in TensorFlow (SIMCLR_REFERENCE.md §4).

Every random draw uses a stateless TF op whose seed is derived from
(config.seed, step, example id, view, op) only, so a view is a pure function of
those numbers: the same global batch arises on any process/device layout and
after a resume.

Deviation from the reference, on purpose: SimCLR draws one blur sigma per
(replica, view, step) and shares it over that replica's batch, which makes the
result depend on the layout. Here sigma is drawn per example and view (as in
BYOL's port); the per-image p=0.5 selector is unchanged.
"""

from __future__ import annotations

import tensorflow as tf

# Op indices folded into a view's seed; fixed forever so streams stay stable.
_CROP, _FLIP, _JITTER_COIN, _ORDER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, \
    _BLUR_COIN, _BLUR_SIGMA = range(11)
EVAL_CROP_PROPORTION = 0.875


def view_seed(seed, step, example_id, view):
  """An int64[2] stateless seed for one view of one example at one step."""
  s = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5C1C, tf.int64)])
  for data in (step, example_id, view):
    s = tf.random.experimental.stateless_fold_in(s, tf.cast(data, tf.int64))
  return s


def _op_seed(s, op: int):
  return tf.random.experimental.stateless_fold_in(s, tf.constant(op, tf.int64))


def _uniform(s, op, minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform([], _op_seed(s, op), minval, maxval)


def crop_window(image_shape, s, aug):
  """Inception-style crop box (begin [3], size [3]) with TF's exact sampler."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=_op_seed(s, _CROP),
      min_object_covered=aug.crop_min_object_covered,
      aspect_ratio_range=tuple(aug.crop_aspect_ratio_range),
      area_range=tuple(aug.crop_area_range),
      max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def crop_and_flip(image, s, aug, image_size: int):
  """Random crop + bicubic resize + flip of a float [h, w, 3] image."""
  begin, size = crop_window(tf.shape(image), s, aug)
  crop = tf.slice(image, begin, size)
  x = tf.image.resize(crop, (image_size, image_size), method="bicubic")
  if aug.flip:
    x = tf.image.stateless_random_flip_left_right(x, _op_seed(s, _FLIP))
  return tf.clip_by_value(x, 0.0, 1.0)


def color_jitter(x, s, aug):
  """Four jitter ops in a random order, clipping after each (p=1 here)."""
  strength = aug.color_jitter_strength
  b = c = sat = 0.8 * strength
  h = 0.2 * strength

  def brightness(x):
    if aug.brightness_impl == "simclrv2":
      return x * _uniform(s, _BRIGHT, max(1.0 - b, 0.0), 1.0 + b)
    return x + _uniform(s, _BRIGHT, -b, b)  # 'simclrv1': additive delta.

  def contrast(x):
    return tf.image.stateless_random_contrast(
        x, max(1.0 - c, 0.0), 1.0 + c, _op_seed(s, _CONTRAST))

  def saturation(x):
    return tf.image.stateless_random_saturation(
        x, max(1.0 - sat, 0.0), 1.0 + sat, _op_seed(s, _SAT))

  def hue(x):
    return tf.image.stateless_random_hue(x, min(h, 0.5), _op_seed(s, _HUE))

  ops = [brightness, contrast, saturation, hue]
  order = tf.argsort(tf.random.stateless_uniform([4], _op_seed(s, _ORDER)))
  for i in range(4):
    x = tf.switch_case(order[i], [lambda f=f: f(x) for f in ops])
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x


def to_grayscale(x):
  return tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])


def color_distort(x, s, aug):
  """Jitter with p=color_jitter_prob, then independently grayscale."""
  if aug.color_jitter_strength > 0 and aug.color_jitter_prob > 0:
    x = tf.cond(_uniform(s, _JITTER_COIN) < aug.color_jitter_prob,
                lambda: color_jitter(x, s, aug), lambda: x)
  if aug.grayscale_prob > 0:
    x = tf.cond(_uniform(s, _GRAY) < aug.grayscale_prob,
                lambda: to_grayscale(x), lambda: x)
  return tf.clip_by_value(x, 0.0, 1.0)


def blur_kernel_radius(image_size: int) -> int:
  """SimCLR's kernel: 2 * ((size // 10) // 2) + 1 taps (23 at 224, 3 at 32)."""
  return (image_size // 10) // 2


def _band_matrix(n, w, radius: int):
  """[n, n] M with M[j, i] = w[j - i + radius] inside the band, else 0: x @ M
  is the 'SAME' zero-padded correlation of x's last axis with w."""
  i = tf.range(n)
  d = i[:, None] - i[None, :] + radius
  inside = (d >= 0) & (d <= 2 * radius)
  return tf.where(inside, tf.gather(w, tf.clip_by_value(d, 0, 2 * radius)),
                  0.0)


def gaussian_blur(x, sigma, radius: int):
  """Separable Gaussian blur of [H, W, 3] with zero 'SAME' padding (as SimCLR).

  Each pass is a matmul with a banded matrix instead of TF's depthwise conv:
  the same sums, ~20x faster on CPU (29 ms -> ~1.5 ms per 224 px view).
  """
  k = tf.range(-radius, radius + 1, dtype=tf.float32)
  w = tf.exp(-k**2 / (2.0 * sigma**2))
  w = w / tf.reduce_sum(w)
  shape = tf.shape(x)
  x = tf.einsum("hwc,wv->hvc", x, _band_matrix(shape[1], w, radius))
  return tf.einsum("gwc,gh->hwc", x, _band_matrix(shape[0], w, radius))


def random_blur(x, s, aug, image_size: int):
  """Blur with p=blur_prob; sigma ~ U(blur_sigma_range) per example (deviation)."""
  lo, hi = aug.blur_sigma_range
  sigma = _uniform(s, _BLUR_SIGMA, lo, hi)
  radius = blur_kernel_radius(image_size)
  x = tf.cond(_uniform(s, _BLUR_COIN) < aug.blur_prob,
              lambda: gaussian_blur(x, sigma, radius), lambda: x)
  return tf.clip_by_value(x, 0.0, 1.0)


def pretrain_view(image, s, aug, image_size: int, *, host_color: bool):
  """One SimCLR view of a float [h, w, 3] image in [0, 1].

  host_color False leaves colour, grayscale and blur to the device
  (`device_augment.augment_views`).
  """
  x = crop_and_flip(image, s, aug, image_size)
  if host_color:
    x = color_distort(x, s, aug)
    if aug.use_blur and aug.blur_prob > 0:
      x = random_blur(x, s, aug, image_size)
  return tf.ensure_shape(x, [image_size, image_size, 3])


def eval_image(image, image_size: int):
  """Deterministic eval preprocessing: centre crop 0.875 (none <= 32 px), resize.

  The crop keeps a square aspect: its side is rint(0.875 * min(h, w)), with
  offsets ((h - side) + 1) // 2 and ((w - side) + 1) // 2 as in SimCLR.
  """
  image = tf.convert_to_tensor(image, tf.float32)
  if image_size > 32:
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.cast(tf.math.rint(
        EVAL_CROP_PROPORTION * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
    oy, ox = ((h - side) + 1) // 2, ((w - side) + 1) // 2
    image = tf.image.crop_to_bounding_box(image, oy, ox, side, side)
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], image_size),
                        tf.equal(shape[1], image_size))
  image = tf.cond(same, lambda: image,
                  lambda: tf.image.resize(image, (image_size, image_size),
                                          method="bicubic"))
  return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0),
                         [image_size, image_size, 3])
