"""SimCLR augmentations on the host, in TensorFlow (docs/simclr.md §4).

Every random draw uses a stateless TF op whose seed is derived from
(seed, step, example id, view, op) only, so a view is a pure function of
those numbers: the same global batch arises on any process/device layout and
after a resume.

Deviation from the reference, on purpose: SimCLR draws one blur sigma per
(replica, view, step) and shares it over that replica's batch, which makes the
result depend on the layout. Here sigma is drawn per example and view (as in
BYOL's port); the per-image p=0.5 selector is unchanged.

Multi-crop (augment.num_local_crops = k > 0, SwAV / DINO): an image's local
crops are its views 2 .. k + 1, keyed like the two global views (view 0, 1),
so adding them leaves the global views' streams unchanged.

Colour and blur take their random parameters from `draw_color_params`, the
one stream of both paths: applied here (augment.on_device=False) or shipped
in the batch and applied by `device_augment.augment_views` (True).
"""

from __future__ import annotations

import tensorflow as tf

from jaxclr.data import spec

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


def crop_window(image_shape, s, aug: spec.AugmentParams, local: bool = False):
  """Inception-style crop box (begin [3], size [3]) with TF's exact sampler.

  local: a multi-crop local view, whose area fraction is drawn from
  aug.local_crop_area_range alone (min_object_covered 0: the global views'
  crop_min_object_covered of 0.1 would forbid crops under 10% of the image,
  and SwAV's / DINO's local crops cover 5-14%).
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=_op_seed(s, _CROP),
      min_object_covered=0.0 if local else aug.crop_min_object_covered,
      aspect_ratio_range=aug.crop_aspect_ratio_range,
      area_range=aug.local_crop_area_range if local else aug.crop_area_range,
      max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def crop_and_flip(image, s, aug: spec.AugmentParams, image_size: int,
                  local: bool = False):
  """Random crop + bicubic resize + flip of a float [h, w, 3] image (local:
  a multi-crop local view's crop, see crop_window)."""
  begin, size = crop_window(tf.shape(image), s, aug, local)
  crop = tf.slice(image, begin, size)
  x = tf.image.resize(crop, (image_size, image_size), method="bicubic")
  if aug.flip:
    x = tf.image.stateless_random_flip_left_right(x, _op_seed(s, _FLIP))
  return tf.clip_by_value(x, 0.0, 1.0)


def jitter_ranges(aug: spec.AugmentParams):
  """(brightness lo, hi), contrast, saturation ranges and the hue bound."""
  b = 0.8 * aug.color_jitter_strength
  factor = (max(1.0 - b, 0.0), 1.0 + b)
  bright = factor if aug.brightness_impl == "simclrv2" else (-b, b)
  return bright, factor, factor, min(0.2 * aug.color_jitter_strength, 0.5)


def draw_color_params(s, aug: spec.AugmentParams):
  """float32 [P]: every random parameter of a view's colour and blur.

  Layout: spec.py. Each draw uses the seed (and op index) that the TF ops
  `tf.image.stateless_random_{contrast,saturation,hue}` used to draw
  internally, so the views are the same as when those ops drew them.
  """
  bright, contrast, sat, hue = jitter_ranges(aug)
  coin = lambda op, p: tf.cast(_uniform(s, op) < p, tf.float32)
  order = tf.argsort(tf.random.stateless_uniform([4], _op_seed(s, _ORDER)))
  lo, hi = aug.blur_sigma_range
  return tf.concat([
      [coin(_JITTER_COIN, aug.color_jitter_prob)],
      tf.cast(order, tf.float32),
      [_uniform(s, _BRIGHT, *bright), _uniform(s, _CONTRAST, *contrast),
       _uniform(s, _SAT, *sat), _uniform(s, _HUE, -hue, hue),
       coin(_GRAY, aug.grayscale_prob), coin(_BLUR_COIN, aug.blur_prob),
       _uniform(s, _BLUR_SIGMA, lo, hi)]], axis=0)


def color_jitter(x, p, aug: spec.AugmentParams):
  """The four jitter ops of colour parameters `p` [P], in p's order,
  clipping after each (applied unconditionally here)."""
  def brightness(x):
    if aug.brightness_impl == "simclrv2":
      return x * p[spec.BRIGHT]
    return x + p[spec.BRIGHT]  # 'simclrv1': additive delta.

  ops = [brightness,
         lambda x: tf.image.adjust_contrast(x, p[spec.CONTRAST]),
         lambda x: tf.image.adjust_saturation(x, p[spec.SAT]),
         lambda x: tf.image.adjust_hue(x, p[spec.HUE])]
  order = tf.cast(p[spec.ORDER:spec.ORDER + 4], tf.int32)
  for i in range(4):
    x = tf.switch_case(order[i], [lambda f=f: f(x) for f in ops])
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x


def to_grayscale(x):
  return tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])


def color_distort(x, p, aug: spec.AugmentParams):
  """Jitter if p's jitter coin says so, then independently grayscale."""
  if aug.jitter_on:
    x = tf.cond(p[spec.JITTER] > 0.5, lambda: color_jitter(x, p, aug),
                lambda: x)
  if aug.grayscale_on:
    x = tf.cond(p[spec.GRAY] > 0.5, lambda: to_grayscale(x), lambda: x)
  return tf.clip_by_value(x, 0.0, 1.0)


blur_kernel_radius = spec.blur_kernel_radius


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
  the same sums, an order of magnitude faster on CPU (benchmarks/RESULTS.md,
  "Input pipeline").
  """
  k = tf.range(-radius, radius + 1, dtype=tf.float32)
  w = tf.exp(-k**2 / (2.0 * sigma**2))
  w = w / tf.reduce_sum(w)
  shape = tf.shape(x)
  x = tf.einsum("hwc,wv->hvc", x, _band_matrix(shape[1], w, radius))
  return tf.einsum("gwc,gh->hwc", x, _band_matrix(shape[0], w, radius))


def random_blur(x, p, image_size: int):
  """Blur if p's blur coin says so, with p's sigma (drawn per example: the
  deviation in the module doc)."""
  radius = blur_kernel_radius(image_size)
  x = tf.cond(p[spec.BLUR] > 0.5,
              lambda: gaussian_blur(x, p[spec.SIGMA], radius), lambda: x)
  return tf.clip_by_value(x, 0.0, 1.0)


def pretrain_view(image, s, aug: spec.AugmentParams, image_size: int,
                  local: bool = False):
  """One SimCLR view of a float [h, w, 3] image in [0, 1], and its colour
  parameters: (float32 [size, size, 3], float32 [P]).

  With aug.on_device the view is crop + flip only and the device applies
  the parameters (`device_augment.augment_views`); otherwise they are
  applied here. local: a multi-crop local view (image_size is then
  aug.local_crop_size; its blur kernel is sized for it).
  """
  x = crop_and_flip(image, s, aug, image_size, local)
  p = draw_color_params(s, aug)
  if not aug.on_device:
    x = color_distort(x, p, aug)
    if aug.blur_on:
      x = random_blur(x, p, image_size)
  return tf.ensure_shape(x, [image_size, image_size, 3]), p


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
