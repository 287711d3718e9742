"""Colour jitter, grayscale and blur on the accelerator (`augment.on_device`).

With `config.augment.on_device` the host does crop + flip only, and the trainer
calls `augment_views` inside its jitted step. The semantics are those of the
host ops in augment.py (SIMCLR_REFERENCE.md §4.3-4.4); the random stream is a
different one (JAX keys, not TF stateless seeds), so on_device=True and False
give different, equally distributed, views. Every draw is keyed by
fold_in(fold_in(fold_in(rng, step), example_id), view): layout-invariant.
As on the host, the blur sigma is drawn per example (SimCLR shares one per
replica batch, which depends on the layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def rgb_to_hsv(rgb):
  """[..., 3] RGB in [0, 1] -> HSV, hue in [0, 1) (TF's convention)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.max(rgb, axis=-1)
  delta = v - jnp.min(rgb, axis=-1)
  safe = jnp.where(delta > 0, delta, 1.0)
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
  h = jnp.where(v == r, (g - b) / safe,
                jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv):
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  h6 = (h % 1.0) * 6.0
  i = jnp.floor(h6)
  f = h6 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
  g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
  b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
  return jnp.stack([r, g, b], axis=-1)


def adjust_contrast(x, factor):
  mean = jnp.mean(x, axis=(-3, -2), keepdims=True)  # Per channel.
  return (x - mean) * factor + mean


def adjust_saturation(x, factor):
  hsv = rgb_to_hsv(x)
  hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0))
  return hsv_to_rgb(hsv)


def adjust_hue(x, delta):
  hsv = rgb_to_hsv(x)
  hsv = hsv.at[..., 0].set((hsv[..., 0] + delta) % 1.0)
  return hsv_to_rgb(hsv)


def to_grayscale(x):
  gray = x @ jnp.array([0.2989, 0.5870, 0.1140], x.dtype)
  return jnp.repeat(gray[..., None], 3, axis=-1)


def gaussian_blur(x, sigma, radius: int):
  """Separable blur of [H, W, 3] with zero 'SAME' padding."""
  k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-k**2 / (2.0 * sigma**2))
  w = w / jnp.sum(w)
  pad = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)))
  n = x.shape[0]
  rows = sum(w[j] * pad[j:j + n] for j in range(2 * radius + 1))
  m = x.shape[1]
  return sum(w[j] * rows[:, j:j + m] for j in range(2 * radius + 1))


def _one_view(x, key, aug):
  """Colour distortion (+ blur) of one [H, W, 3] view, as augment.py."""
  s = aug.color_jitter_strength
  bc = 0.8 * s
  (k_coin, k_order, k_b, k_c, k_s, k_h, k_gray, k_bcoin,
   k_sigma) = jax.random.split(key, 9)
  u = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)
  if aug.brightness_impl == "simclrv2":
    bright = lambda y: y * u(k_b, max(1.0 - bc, 0.0), 1.0 + bc)
  else:
    bright = lambda y: y + u(k_b, -bc, bc)
  ops = [bright,
         lambda y: adjust_contrast(y, u(k_c, max(1.0 - bc, 0.0), 1.0 + bc)),
         lambda y: adjust_saturation(y, u(k_s, max(1.0 - bc, 0.0), 1.0 + bc)),
         lambda y: adjust_hue(y, u(k_h, -min(0.2 * s, 0.5), min(0.2 * s, 0.5)))]

  def jitter(y):
    order = jax.random.permutation(k_order, 4)
    for i in range(4):
      y = jnp.clip(jax.lax.switch(order[i], ops, y), 0.0, 1.0)
    return y

  if s > 0 and aug.color_jitter_prob > 0:
    apply = jax.random.uniform(k_coin) < aug.color_jitter_prob
    x = jnp.where(apply, jitter(x), x)
  if aug.grayscale_prob > 0:
    x = jnp.where(jax.random.uniform(k_gray) < aug.grayscale_prob,
                  to_grayscale(x), x)
  x = jnp.clip(x, 0.0, 1.0)
  if aug.use_blur and aug.blur_prob > 0:
    lo, hi = aug.blur_sigma_range
    radius = (x.shape[0] // 10) // 2
    blurred = gaussian_blur(x, u(k_sigma, lo, hi), radius)
    x = jnp.where(jax.random.uniform(k_bcoin) < aug.blur_prob, blurred, x)
    x = jnp.clip(x, 0.0, 1.0)
  return x


def augment_views(images, example_ids, rng, step, augment_config):
  """Colour/grayscale/blur of both views, keyed per example.

  The trainer binds the config: partial(augment_views, augment_config=...)
  and calls it as augment_fn(images, example_ids, rng, step) inside its jit.

  Args:
    images: float [B, 2, H, W, 3] in [0, 1] (host crop + flip only).
    example_ids: int [B], the batch's example ids.
    rng: a JAX key (typed or raw), e.g. from config.seed.
    step: the train step (int or traced scalar).
    augment_config: config.augment (static Python values).
  Returns:
    float32 [B, 2, H, W, 3] in [0, 1].
  """
  base = jax.random.fold_in(rng, step)

  def per_example(views, eid):
    k = jax.random.fold_in(base, eid)
    return jnp.stack([_one_view(views[v], jax.random.fold_in(k, v),
                                augment_config) for v in range(2)])

  return jax.vmap(per_example)(images.astype(jnp.float32), example_ids)


def make_augment_fn(augment_config):
  """augment_fn(images, example_ids, rng, step) for the trainer."""
  return functools.partial(_bound, augment_config=augment_config)


def _bound(images, example_ids, rng, step, *, augment_config):
  return augment_views(images, example_ids, rng, step, augment_config)
