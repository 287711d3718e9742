"""Synthetic images: fixed shapes, deterministic, no I/O.

For tests and throughput measurements. Example i is a function of (seed, i)
only, and its two views of (seed, step, i, view), so any process layout sees
the same global batch.
"""

from __future__ import annotations

import numpy as np


def example_image(seed: int, index: int, image_size: int) -> np.ndarray:
  """A smooth random colour image in [0, 1] (not white noise, so crops differ)."""
  rng = np.random.default_rng([seed, 7, index])
  coarse = rng.random((4, 4, 3), dtype=np.float32)
  reps = -(-image_size // 4)
  img = np.kron(coarse, np.ones((reps, reps, 1), np.float32))[:image_size, :image_size]
  return img


def example_label(seed: int, index: int, num_classes: int) -> int:
  if num_classes <= 0:
    return -1
  return int(np.random.default_rng([seed, 11, index]).integers(num_classes))


def two_views(seed: int, step: int, index: int, image: np.ndarray) -> np.ndarray:
  """Two cheap, distinct 'augmentations': random flip and brightness per view."""
  rng = np.random.default_rng([seed, 13, step, index])
  views = []
  for _ in range(2):
    v = image[:, ::-1] if rng.random() < 0.5 else image
    v = np.clip(v * rng.uniform(0.6, 1.4), 0.0, 1.0)
    views.append(v)
  return np.stack(views).astype(np.float32)
