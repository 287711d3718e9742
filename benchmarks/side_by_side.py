"""jaxclr's end-to-end pretraining job against a minimal TensorFlow/Keras
SimCLR step of the same model, one after the other; prints the ratio.

  python benchmarks/side_by_side.py [--batch 256] [--steps 8] [--warmup 2]
      [--depth 18] [--image_size 32] [--out side_by_side.json]

jaxclr: `python -m jaxclr.main --config configs/cifar10.py` on generated
images (`--config.dataset=synthetic`: host augmentation, input pipeline,
step and metrics all included), ResNet-18 with the CIFAR stem, 3-layer
head, NT-Xent, LARS; images/s from metrics.jsonl (one record per step),
median over the steps after --warmup.

The comparison (the `_keras_worker` below, in its own process so the two
never share the CPU): the same ResNet (3x3 stem, basic blocks [2, 2, 2, 2],
BN everywhere, no biases), the same 3-layer projection head, NT-Xent over
the 2B views at tau 0.5, SGD with momentum, in a tf.function (TensorFlow's
CPU kernels are oneDNN's), on random views already in memory (no
augmentation: at 32 px it costs ~2,500 images/s per core, well above either
step's rate). It is a measuring stick, not part of the package. Float32
throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxclr_images_per_sec(args) -> dict:
  # Not at the top: the TensorFlow worker process must not import jax.
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  from jaxclr.training import metrics
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    cmd = [sys.executable, "-m", "jaxclr.main", "--config",
           f"configs/cifar10.py:depth={args.depth},batch={args.batch}",
           "--workdir", workdir, "--config.dataset=synthetic",
           f"--config.synthetic.num_examples={4 * args.batch}",
           f"--config.image_size={args.image_size}",
           f"--config.num_train_steps={args.warmup + args.steps}",
           "--config.log_every_steps=1",
           f"--config.checkpoint_every_steps={args.warmup + args.steps}",
           f"--config.model.conv_kernel_grad={args.conv_kernel_grad}",
           f"--config.model.conv_library={args.conv_library}"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    records = metrics.read_records(workdir)
  rates = [r["images_per_sec"] for r in records
           if "images_per_sec" in r and r.get("step", 0) > args.warmup]
  return {"images_per_sec": statistics.median(rates), "min": min(rates),
          "max": max(rates), "steps": len(rates), "wall_s": wall,
          "command": " ".join(cmd),
          # jaxclr/cpu: the job's convolution library and host allocator
          # settings.
          **cpu.environment_switches()}


def _keras_worker(args) -> dict:
  """The comparison step; runs in a child process (TensorFlow only)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  layers = tf.keras.layers

  def bn(x, gamma_zero=False):
    return layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5,
        gamma_initializer="zeros" if gamma_zero else "ones")(x)

  def conv(x, filters, k, stride):
    return layers.Conv2D(filters, k, stride, padding="same",
                         use_bias=False)(x)

  def block(x, filters, stride, project):
    shortcut = x
    if project:
      shortcut = bn(conv(x, filters, 1, stride))
    y = layers.ReLU()(bn(conv(x, filters, 3, stride)))
    y = bn(conv(y, filters, 3, 1), gamma_zero=True)
    return layers.ReLU()(layers.Add()([y, shortcut]))

  blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[args.depth]
  inputs = tf.keras.Input((args.image_size, args.image_size, 3))
  x = layers.ReLU()(bn(conv(inputs, 64, 3, 1)))
  for g, n in enumerate(blocks):
    for b in range(n):
      x = block(x, 64 * 2**g, (1 if g == 0 else 2) if b == 0 else 1, b == 0)
  h = layers.GlobalAveragePooling2D()(x)
  z = h
  for _ in range(2):
    z = layers.ReLU()(bn(layers.Dense(512, use_bias=False)(z)))
  z = bn(layers.Dense(128, use_bias=False)(z))
  model = tf.keras.Model(inputs, z)
  opt = tf.keras.optimizers.SGD(0.1, momentum=0.9)
  b, tau = args.batch, 0.5

  @tf.function
  def step(views):
    with tf.GradientTape() as tape:
      z = tf.math.l2_normalize(model(views, training=True), axis=1)
      logits = tf.matmul(z, z, transpose_b=True) / tau
      logits -= 1e9 * tf.eye(2 * b)
      labels = tf.concat([tf.range(b, 2 * b), tf.range(b)], 0)
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  views = tf.constant(np.random.default_rng(0).random(
      (2 * b, args.image_size, args.image_size, 3), np.float32))
  for _ in range(args.warmup):
    step(views).numpy()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step(views).numpy()
    times.append(time.perf_counter() - t0)
  rates = [b / t for t in times]
  return {"images_per_sec": statistics.median(rates), "min": min(rates),
          "max": max(rates), "steps": len(rates), "tensorflow": tf.__version__,
          "params": int(model.count_params())}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--depth", type=int, default=18, choices=(18, 34))
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--conv_kernel_grad", default="auto",
                 choices=("auto", "xla", "patches"),
                 help="jaxclr's model.conv_kernel_grad (before/after runs)")
  p.add_argument("--conv_library", default="auto",
                 choices=("auto", "xla", "onednn"),
                 help="jaxclr's model.conv_library (before/after runs)")
  p.add_argument("--out")
  p.add_argument("--keras_worker", action="store_true",
                 help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.keras_worker:
    print(json.dumps(_keras_worker(args)))
    return
  jax_result = jaxclr_images_per_sec(args)
  print(f"jaxclr end to end: {jax_result['images_per_sec']:.2f} images/s "
        f"(min {jax_result['min']:.2f}, max {jax_result['max']:.2f})",
        flush=True)
  worker = subprocess.run(
      [sys.executable, __file__, "--keras_worker"] + sys.argv[1:],
      check=True, capture_output=True, text=True)
  keras_result = json.loads(worker.stdout.strip().splitlines()[-1])
  print(f"TensorFlow/Keras step: {keras_result['images_per_sec']:.2f} "
        f"images/s (min {keras_result['min']:.2f}, max "
        f"{keras_result['max']:.2f})")
  ratio = jax_result["images_per_sec"] / keras_result["images_per_sec"]
  print(f"ratio jaxclr / TensorFlow: {ratio:.2f}")
  if args.out:
    sys.path.insert(0, REPO)
    from benchmarks import measure  # pylint: disable=g-import-not-at-top
    with open(args.out, "w") as f:
      json.dump({**measure.run_record(), "args": vars(args),
                 "jaxclr": jax_result, "tensorflow": keras_result,
                 "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
  main()
