"""Input-pipeline throughput: images/s (and per host core), host vs device.

  .venv/bin/python benchmarks/input_pipeline.py [--images 512] [--batch 64]
  taskset -c 0 .venv/bin/python benchmarks/input_pipeline.py  # one core

"per core" divides by the cores this process may run on (its affinity); pin
it with taskset for a one-core figure that other processes do not share.

Writes ImageNet-like JPEGs (~500x375, from scikit-learn's bundled sample
photos, no download) to a temp folder and CIFAR-size arrays to a temp .npz, then
times `pretrain_batches` (each image yields two views) for:
  * 224 px JPEG bytes by index, decoded by TF (what a TFDS array_record build
    such as imagenet2012 hands the pipeline): decode + crop + flip only
    (augment.on_device=True), and the full host augmentation (colour jitter,
    grayscale, blur);
  * the same JPEGs as a `folder:` dataset (PIL decode, corrupt-file tolerant);
  * 32 px arrays: crop + flip only, and full host augmentation (no blur);
  each with float32 views and with uint8 views (augment.transfer_dtype);
  * device_augment.augment_views under jit on the local JAX backend, on
    colour parameters drawn by the host (augment.draw_color_params).
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


def jpeg_bytes_source(folder: str):
  """The folder's JPEGs as an 'encoded' source: bytes by index, like the
  random-access source of a TFDS array_record build (no TFDS build needed)."""
  from jaxclr.data import sources
  raw = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      raw.append(f.read())
  return sources.Source(
      "jpeg_bytes", "encoded", len(raw), 1, None,
      get_encoded=lambda i: (raw[i], 0),
      get_encoded_batch=lambda ids: ([raw[i] for i in ids], [0] * len(ids)))


def time_pipeline(dataset, image_size, batch, steps, source=None, repeats=1,
                  **aug):
  """images/s of `repeats` consecutive windows of `steps` batches each."""
  from jaxclr import config as config_lib
  from jaxclr.data import input_pipeline
  c = config_lib.base_config()
  c.dataset, c.image_size, c.batch_size = dataset, image_size, batch
  c.augment.update(aug)
  data = config_lib.data_spec(c)
  src = source or input_pipeline.open_source(data, "train")
  it = input_pipeline.pretrain_batches(data, src, batch_size=batch,
                                       start_step=0, process_index=0,
                                       process_count=1)
  next(it)  # Warm-up: graph tracing, thread pools.
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      next(it)
    rates.append(steps * batch / (time.perf_counter() - t))
  return rates


def time_device(image_size, batch, steps, **aug):
  """images/s of jit(augment_views) on host-drawn colour parameters."""
  import functools
  import jax
  import tensorflow as tf
  from jaxclr import config as config_lib
  from jaxclr.data import augment, device_augment
  c = config_lib.base_config()
  c.augment.update(aug)
  params = config_lib.data_spec(c).augment
  fn = jax.jit(functools.partial(device_augment.augment_views, params=params))
  x = jax.random.uniform(jax.random.key(0), (batch, 2, image_size,
                                             image_size, 3))
  # One batch of real draws; every branch is computed whatever the values
  # (jnp.where under vmap), so reusing it times the same program.
  draw = lambda k: augment.draw_color_params(
      augment.view_seed(0, 0, k // 2, k % 2), params)
  p = next(tf.data.Dataset.range(2 * batch).map(draw).batch(2 * batch)
           .as_numpy_iterator()).reshape(batch, 2, -1)
  fn(x, p).block_until_ready()
  t = time.perf_counter()
  for _ in range(steps):
    fn(x, p).block_until_ready()
  return steps * batch / (time.perf_counter() - t), jax.devices()[0].platform


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=512,
                 help="JPEGs to write; each 224 px setting times images/batch "
                 "batches after one warm-up batch")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=1,
                 help="timed windows per setting; the median is printed")
  p.add_argument("--only", default="",
                 help="only settings whose name contains this text "
                 "('device' for the device rows)")
  args = p.parse_args()
  cores = len(os.sched_getaffinity(0))
  steps = args.images // args.batch
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    jpg = os.path.join(tmp, "jpegs")
    os.makedirs(jpg)
    make_jpegs(jpg, args.images)
    npz = os.path.join(tmp, "c.npz")
    make_npz(npz, max(args.images, 2048))
    enc = jpeg_bytes_source(jpg)
    r = args.repeats
    for dtype in ("float32", "uint8"):
      t = f", {dtype} out"
      settings = [
          ("224 JPEG bytes (TFDS-like), decode+crop+flip" + t, lambda: (
              time_pipeline("jpeg_bytes", 224, args.batch, steps, enc, r,
                            on_device=True, transfer_dtype=dtype))),
          ("224 JPEG bytes (TFDS-like), full host aug" + t, lambda: (
              time_pipeline("jpeg_bytes", 224, args.batch, steps, enc, r,
                            transfer_dtype=dtype))),
          ("224 JPEG folder (PIL), decode+crop+flip" + t, lambda: (
              time_pipeline(f"folder:{jpg}", 224, args.batch, steps, None, r,
                            on_device=True, transfer_dtype=dtype))),
          ("224 JPEG folder (PIL), full host aug" + t, lambda: (
              time_pipeline(f"folder:{jpg}", 224, args.batch, steps, None, r,
                            transfer_dtype=dtype))),
          ("32 px arrays, crop+flip" + t, lambda: (
              time_pipeline(f"npz:{npz}", 32, 256, 8, None, r, on_device=True,
                            transfer_dtype=dtype))),
          ("32 px arrays, full host aug (s=0.5, no blur)" + t, lambda: (
              time_pipeline(f"npz:{npz}", 32, 256, 8, None, r, use_blur=False,
                            color_jitter_strength=0.5,
                            transfer_dtype=dtype))),
      ]
      rows += [(name, fn()) for name, fn in settings if args.only in name]
  if "device" in args.only or not args.only:
    dev224, platform = time_device(224, 32, 3)
    dev32, _ = time_device(32, 256, 4, use_blur=False,
                           color_jitter_strength=0.5)
    rows.append((f"224 device colour+gray+blur, jit on {platform}", [dev224]))
    rows.append((f"32 device colour+gray, jit on {platform}", [dev32]))
  print(f"cores available: {cores}")
  print(f"{'setting':64s} {'images/s':>9s} {'per core':>9s}  per core "
        "min-max")
  for name, rates in rows:
    ips = float(np.median(rates))
    print(f"{name:64s} {ips:9.1f} {ips / cores:9.1f}  "
          f"{min(rates) / cores:.1f}-{max(rates) / cores:.1f}")


if __name__ == "__main__":
  main()
