"""One convolution's forward, input gradient and kernel gradient, timed alone.

  python -m benchmarks.conv_layers [--n 128] [--layers 32x64x64x1,...]
  JAXCLR_CPU_CONV=ynnpack python -m benchmarks.conv_layers   # jaxlib's choice

Each layer is HxCinxCoutxstride (3x3 kernel, NHWC, float32, N images). For
each: the jitted forward, input gradient and kernel gradient -- the last
both as XLA's own and as jaxclr's per-tap matmuls (jaxclr/cpu/patch_conv.py)
--, then the forward and both gradients on TensorFlow's oneDNN kernels
(jaxclr/cpu/onednn_conv.py, its custom calls included): median ms of --calls
calls and GFLOP/s. The process applies the CPU
settings the jobs apply (jaxclr/cpu/runtime.py): run it once with and once
without JAXCLR_CPU_CONV=ynnpack to compare the convolution libraries.
"""

from __future__ import annotations

import argparse
import json
import statistics

# The ResNet-18 CIFAR layers: group 1-4 3x3 convs and the stride-2 ones.
LAYERS = "32x64x64x1,32x64x128x2,16x128x128x1,16x128x256x2,8x256x256x1,4x512x512x1"
KINDS = ("forward", "input_grad", "kernel_grad_xla", "kernel_grad_patches",
         "forward_onednn", "grads_onednn")


def _median_ms(fn, args, calls: int) -> float:
  # Imported here: benchmarks.measure imports jax, which must start after
  # main() applied the CPU settings.
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  return 1e3 * statistics.median(
      measure.time_calls(lambda: fn(*args), steps=calls, warmup=1))


def measure_layer(n: int, size: int, cin: int, cout: int, stride: int,
                  calls: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  from jaxclr.models import conv  # pylint: disable=g-import-not-at-top
  pad = ((1, 1), (1, 1))
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (n, size, size, cin))
  w = jax.random.normal(keys[1], (3, 3, cin, cout)) / (3 * cin ** 0.5)
  y = conv.conv2d(x, w, stride, pad)
  dy = jax.random.normal(keys[2], y.shape)
  gflop = 2 * y.size * cin * 9 / 1e9

  def kernel_grad(form):
    return jax.jit(lambda x, w, dy: jax.vjp(
        lambda w_: cpu.conv2d(x, w_, stride, pad, library="xla",
                              kernel_grad=form), w)[1](dy)[0])

  timed = {
      "forward": (jax.jit(lambda x, w: conv.conv2d(x, w, stride, pad)),
                  (x, w)),
      "input_grad": (jax.jit(lambda x, w, dy: jax.vjp(
          lambda x_: conv.conv2d(x_, w, stride, pad), x)[1](dy)[0]),
                     (x, w, dy)),
      "kernel_grad_xla": (kernel_grad("xla"), (x, w, dy)),
      "kernel_grad_patches": (kernel_grad("patches"), (x, w, dy)),
      # TensorFlow's oneDNN kernels (jaxclr/cpu/onednn_conv.py), custom
      # calls included; both gradients are timed together, as the step
      # runs them (their FLOPs are twice the forward's).
      "forward_onednn": (jax.jit(lambda x, w: cpu.conv2d(
          x, w, stride, pad, library="onednn", kernel_grad="xla")), (x, w)),
      "grads_onednn": (jax.jit(lambda x, w, dy: jax.vjp(
          lambda x_, w_: cpu.conv2d(x_, w_, stride, pad, library="onednn",
                                    kernel_grad="xla"),
          x, w)[1](dy)), (x, w, dy)),
  }
  out = {"layer": f"{n}x{size}x{size}x{cin}->{cout}/s{stride}",
         "gflop": gflop}
  for name, (fn, args) in timed.items():
    ms = _median_ms(fn, args, calls)
    flop = 2 * gflop if name == "grads_onednn" else gflop
    out[name] = {"ms": ms, "gflop_per_s": flop / ms * 1e3}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=128, help="images (views)")
  parser.add_argument("--layers", default=LAYERS)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--out")
  args = parser.parse_args()
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  settings = cpu.prepare()  # Before jax starts, as the jobs do.
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  rows = []
  for spec in args.layers.split(","):
    size, cin, cout, stride = map(int, spec.split("x"))
    rows.append(measure_layer(args.n, size, cin, cout, stride, args.calls))
    r = rows[-1]
    print(f"{r['layer']:28s} " + "  ".join(
        f"{k} {r[k]['ms']:7.1f} ms ({r[k]['gflop_per_s']:5.1f})"
        for k in KINDS), flush=True)
  record = {**measure.run_record(), "cpu_settings": settings, "n": args.n,
            "layers": rows}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
