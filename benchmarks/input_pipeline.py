"""Input-pipeline throughput: images/s (and per host core), host vs device.

  .venv/bin/python benchmarks/input_pipeline.py [--images 512] [--batch 64]

Writes ImageNet-like JPEGs (~500x375, from scikit-learn's bundled sample
photos, no download) to a temp folder and CIFAR-size arrays to a temp .npz, then
times `pretrain_batches` (each image yields two views) for:
  * 224 px JPEG folder: decode + crop + flip only (augment.on_device=True), and
    the full host augmentation (colour jitter, grayscale, blur);
  * 32 px arrays: crop + flip only, and full host augmentation (no blur);
  * device_augment.augment_views under jit on the local JAX backend.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def make_jpegs(folder: str, n: int):
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images  # Two 427x640 RGB photos.
  rng = np.random.default_rng(0)
  for i in range(n):
    src = photos[i % len(photos)]
    h, w = rng.integers(330, 420), rng.integers(440, 620)
    y, x = rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1)
    im = Image.fromarray(src[y:y + h, x:x + w]).resize((500, 375),
                                                       Image.BILINEAR)
    im.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def make_npz(path: str, n: int):
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(1)
  out = []
  for i in range(n):
    src = photos[i % 2]
    y, x = rng.integers(0, 427 - 96), rng.integers(0, 640 - 96)
    out.append(np.asarray(Image.fromarray(src[y:y + 96, x:x + 96]).resize(
        (32, 32), Image.BILINEAR)))
  np.savez(path, images=np.stack(out))


def time_pipeline(dataset, image_size, batch, steps, **aug):
  from jaxclr import config_lib
  from jaxclr.data import input_pipeline
  c = config_lib.base_config()
  c.dataset, c.image_size, c.batch_size = dataset, image_size, batch
  c.augment.update(aug)
  it = input_pipeline.pretrain_batches(c, start_step=0, process_index=0,
                                       process_count=1)
  next(it)  # Warm-up: graph tracing, thread pools.
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t)


def time_device(image_size, batch, steps, **aug):
  import jax
  import jax.numpy as jnp
  from jaxclr import config_lib
  from jaxclr.data import device_augment
  a = config_lib.base_config().augment
  a.update(aug)
  fn = jax.jit(device_augment.make_augment_fn(a))
  x = jax.random.uniform(jax.random.key(0), (batch, 2, image_size,
                                             image_size, 3))
  ids, rng = jnp.arange(batch), jax.random.key(1)
  fn(x, ids, rng, 0).block_until_ready()
  t = time.perf_counter()
  for s in range(steps):
    fn(x, ids, rng, s + 1).block_until_ready()
  return steps * batch / (time.perf_counter() - t), jax.devices()[0].platform


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--batch", type=int, default=64)
  args = p.parse_args()
  cores = len(os.sched_getaffinity(0))
  steps = args.images // args.batch
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    jpg = os.path.join(tmp, "jpegs")
    os.makedirs(jpg)
    make_jpegs(jpg, args.images)
    npz = os.path.join(tmp, "c.npz")
    make_npz(npz, max(args.images, 1024))
    rows.append(("224 JPEG folder, decode+crop+flip (on_device=True)",
                 time_pipeline(f"folder:{jpg}", 224, args.batch, steps,
                               on_device=True)))
    rows.append(("224 JPEG folder, full host aug (jitter, gray, blur)",
                 time_pipeline(f"folder:{jpg}", 224, args.batch, steps)))
    rows.append(("32 px arrays, crop+flip (on_device=True)",
                 time_pipeline(f"npz:{npz}", 32, 256, 4, on_device=True)))
    rows.append(("32 px arrays, full host aug (s=0.5, no blur)",
                 time_pipeline(f"npz:{npz}", 32, 256, 4, use_blur=False,
                               color_jitter_strength=0.5)))
  dev224, platform = time_device(224, 32, 3)
  dev32, _ = time_device(32, 256, 4, use_blur=False, color_jitter_strength=0.5)
  rows.append((f"224 device colour+gray+blur, jit on {platform}", dev224))
  rows.append((f"32 device colour+gray, jit on {platform}", dev32))
  print(f"cores available: {cores}")
  print(f"{'setting':58s} {'images/s':>9s} {'per core':>9s}")
  for name, ips in rows:
    print(f"{name:58s} {ips:9.1f} {ips / cores:9.1f}")


if __name__ == "__main__":
  main()
