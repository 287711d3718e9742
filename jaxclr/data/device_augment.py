"""Colour jitter, grayscale and blur on the accelerator (`augment.on_device`).

With augment.on_device the host does crop + flip only and ships each view's
random colour parameters (drawn by `augment.draw_color_params` from the same
TF stateless stream it uses otherwise; layout in spec.py) in the batch as
"color_params"; the trainer calls `augment_views` inside its jitted step. The
ops are JAX versions of the host's (docs/simclr.md section 4.3-4.4), so
on_device=True and False give the same views up to float round-off
(tests/augment_test.py measures it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxclr.data import spec


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


def _one_view(x, p, params: spec.AugmentParams):
  """Colour distortion (+ blur) of one [H, W, 3] view with its colour
  parameters p [P] (layout: spec.py), as augment.py applies them."""
  if params.brightness_impl == "simclrv2":
    bright = lambda y: y * p[spec.BRIGHT]
  else:
    bright = lambda y: y + p[spec.BRIGHT]
  ops = [bright,
         lambda y: adjust_contrast(y, p[spec.CONTRAST]),
         lambda y: adjust_saturation(y, p[spec.SAT]),
         lambda y: adjust_hue(y, p[spec.HUE])]

  def jitter(y):
    order = p[spec.ORDER:spec.ORDER + 4].astype(jnp.int32)
    for i in range(4):
      y = jnp.clip(jax.lax.switch(order[i], ops, y), 0.0, 1.0)
    return y

  if params.jitter_on:
    x = jnp.where(p[spec.JITTER] > 0.5, jitter(x), x)
  if params.grayscale_on:
    x = jnp.where(p[spec.GRAY] > 0.5, to_grayscale(x), x)
  x = jnp.clip(x, 0.0, 1.0)
  if params.blur_on:
    radius = spec.blur_kernel_radius(x.shape[0])  # Static: the image size.
    blurred = gaussian_blur(x, p[spec.SIGMA], radius)
    x = jnp.clip(jnp.where(p[spec.BLUR] > 0.5, blurred, x), 0.0, 1.0)
  return x


def augment_views(images, color_params, *, params: spec.AugmentParams):
  """Colour/grayscale/blur of both views with the host-drawn parameters.

  The trainer binds `params` (static, hashable) with functools.partial and
  calls augment_fn(images, batch["color_params"]) inside its jit.

  Args:
    images: float [B, 2, H, W, 3] in [0, 1] (host crop + flip only).
    color_params: float32 [B, 2, P], the batch's "color_params" (spec.py).
    params: the run's augmentation.
  Returns:
    float32 [B, 2, H, W, 3] in [0, 1]: the views the host would have made
    with augment.on_device=False, up to float round-off.
  """
  per_view = jax.vmap(functools.partial(_one_view, params=params))
  return jax.vmap(per_view)(images.astype(jnp.float32),
                            color_params.astype(jnp.float32))
