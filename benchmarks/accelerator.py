"""The ImageNet SimCLR step on whatever accelerator jax sees, in one
command sized for a short device lease (issue #32).

  python -m benchmarks.accelerator [--out_dir DIR] [--budget_s 420] \
      [--size auto|full|tiny] [--devices N] [--steps 8]

`full` (what `auto` picks on a GPU or TPU): configs/imagenet.py's step,
ResNet-50 at 224 px in bfloat16 with LARS, colour + blur on the device and
uint8 views, built by jobs.pretrain.create_trainer as the job builds it.
`tiny` (`auto` on the CPU, and the test suite): configs/imagenet.py:tiny
against a small made-up memory limit, so every code path runs in minutes.

In order, each part recorded as skipped once the time budget would be
overrun (the budget covers compiles and runs, not jax's start-up):

1. For model.remat off and on, the largest per-device batch whose compiled
   step fits the allocator's limit (`search_batch`: two quick probe
   compiles, a linear fit of the compiled program's bytes, then the
   predicted batch compiled in full; smaller until it fits).
2. That step timed (--steps after 2 warm-up steps, each synced): images/s;
   MFU = XLA's FLOPs of the step / time / (devices x the device's bfloat16
   peak from PEAK_BF16_FLOPS; an unknown device says so, and the MFU
   against a bfloat16 matmul timed in the same run stands beside it); the
   allocator's peak beside the compiled program's own figure.
3. The NT-Xent loss (value and gradient) and its all-gather as shares of
   the step, and the all-gather of float32 vs bfloat16 embeddings (the
   policy sends float32: models/precision.py).
4. On-device colour + blur throughput (benchmarks/input_pipeline.py).
5. With more than one device: the bfloat16 step on 1 vs N devices
   (benchmarks/layout.py), losses of 3 steps and the state after one.

Writes DIR/accelerator.json (everything) and DIR/accelerator.md (the
table). The device's memory fraction is raised to 0.92 of its memory
(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) so the search sees the card.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from benchmarks.accelerator_record import (
    Budget, FIT_FRACTION, GIB, markdown, MEM_FRACTION, mfu, peak_bf16,
    search_batch, TINY_LIMIT_BYTES, write)

IMAGENET = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "imagenet.py")

# --- The measurements (jax imported inside: the memory fraction and the
# CPU settings must be in place before it starts).


def size_settings(size: str, platform: str) -> dict:
  """Config argument, batch search range and the peak matmul's side for a
  run of `size` ('auto' -> full on an accelerator, tiny on the CPU)."""
  if size == "auto":
    size = "tiny" if platform == "cpu" else "full"
  if size == "full":
    return {"size": size, "config_arg": "", "start": 64, "multiple": 16,
            "max_batch": 2048, "matmul": 8192, "colour_image_size": 224,
            "colour_batch": 128, "layer_batch": 128}
  return {"size": size, "config_arg": "tiny", "start": 8, "multiple": 4,
          "max_batch": 256, "matmul": 1024, "colour_image_size": 32,
          "colour_batch": 64, "layer_batch": 2}


def real_batch(config, mesh):
  """A global batch of config.batch_size images with the pipeline's
  structure and real values (colour draws included): one small batch from
  the input pipeline on synthetic images, tiled."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  small = config.copy_and_resolve_references()
  small.dataset, small.batch_size = "synthetic", 8
  small.synthetic.num_examples = 16
  spec = config_lib.data_spec(small)
  one = next(input_pipeline.pretrain_batches(
      spec, input_pipeline.open_source(spec, "train"), batch_size=8,
      start_step=0, process_index=0, process_count=1))
  reps = -(-config.batch_size // 8)
  local = {k: np.concatenate([v] * reps)[:config.batch_size]
           for k, v in one.items()}
  return sharding.global_batch(mesh, local)


def time_step(compiled, trainer, config, mesh, steps: int) -> dict:
  """Runs the compiled step on a fresh state and a real batch; per-step
  times (2 warm-up steps, then `steps`, each synced)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  holder = [trainer.init_fn(jax.random.key(0))]
  batch = real_batch(config, mesh)

  def one_step():
    holder[0], metrics = compiled(holder[0], batch)
    return holder[0], metrics

  times = measure.time_calls(one_step, steps, warmup=2)
  loss = float(jax.device_get(one_step()[1]["loss"]))
  return {"step_time": measure.summarize(times), "last_loss": loss}


def step_case(base_config, mesh, remat: bool, settings: dict,
              limit_bytes: float, budget: Budget, steps: int,
              matmul_flops: float, peak_flops) -> dict:
  """The searched batch of one remat setting, compiled, timed, with its
  memory and MFU."""
  from benchmarks import measure, memory  # pylint: disable=g-import-not-at-top
  n = mesh.devices.size
  cache: dict[int, tuple] = {}
  # On a GPU the probes skip the kernel autotuning (only their bytes are
  # read); elsewhere a probe is the full compile, and is kept.
  quick = ({"xla_gpu_autotune_level": 0}
           if mesh.devices.flat[0].platform == "gpu" else None)

  def build(per_device: int, options):
    if not budget.allows(0):
      raise TimeoutError(f"time budget spent searching (remat={remat})")
    if per_device in cache and not options:
      return measure.memory(cache[per_device][2])["peak_bytes"]
    config = memory.accelerator_config(
        base_config, global_batch=per_device * n,
        compute_dtype=base_config.model.compute_dtype)
    config.model.remat = remat
    out = memory.compile_step(config, mesh, compiler_options=options)
    if not options:
      cache[per_device] = (config,) + out
    return measure.memory(out[1])["peak_bytes"]

  full = lambda b: build(b, None)
  try:
    per_device, tries = search_batch(
        full, limit_bytes, probe_bytes=(lambda b: build(b, quick)) if quick
        else full, start=settings["start"], multiple=settings["multiple"],
        max_batch=settings["max_batch"])
  except TimeoutError as e:
    return {"remat": remat, "skipped": str(e)}
  case = {"remat": remat, "per_device_batch": per_device,
          "search": [{"per_device_batch": b, "bytes": m, "compile": k}
                     for b, m, k in tries]}
  if per_device is None:
    case["skipped"] = "no batch fits"
    return case
  config, trainer, compiled, _, _, compile_s, _ = cache[per_device]
  if not budget.allows(3 * compile_s):
    case["skipped"] = f"time budget ({budget.left():.0f} s left)"
    return case
  try:
    timing = time_step(compiled, trainer, config, mesh, steps)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e):
      raise
    # The compiled figure fit, the allocator did not: say so, not crash.
    case["skipped"] = (f"allocator out of memory at {per_device} per "
                       f"device: {str(e).splitlines()[0][:200]}")
    return case
  step_s = timing["step_time"]["median_s"]
  step_flops = measure.cost_flops(compiled) * n
  devices = list(mesh.devices.flat)
  case.update(timing, compile_s=compile_s, global_batch=config.batch_size,
              images_per_s=config.batch_size / step_s,
              flops_per_step=step_flops,
              flops_per_image=step_flops / config.batch_size,
              mfu=mfu(step_flops, step_s, n, peak_flops),
              mfu_vs_matmul=mfu(step_flops, step_s, n, matmul_flops),
              memory_per_device=measure.memory(compiled),
              allocator_peak_bytes=measure.device_peak_bytes(devices),
              proj_out_dim=config.model.proj_out_dim,
              temperature=config.simclr.temperature)
  return case


def loss_share(mesh, case: dict, steps: int) -> dict:
  """NT-Xent (value + gradient) and its all-gather as shares of the timed
  step, at the step's global batch; the gather in float32 and bfloat16."""
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  step_s = case["step_time"]["median_s"]
  loss = measure.measure_loss(mesh, case["global_batch"],
                              case["proj_out_dim"], case["temperature"],
                              steps=steps, budget_s=10.0)
  gather = {}
  for dtype in ("float32", "bfloat16"):
    if mesh.devices.size == 1:
      gather[dtype] = None
      continue
    z = measure.sharded_embeddings(mesh, case["global_batch"],
                                   case["proj_out_dim"], dtype=dtype)
    fn = measure.all_gather_fn(mesh)
    gather[dtype] = measure.summarize(measure.time_calls(
        lambda: fn(*z), steps, warmup=1))["median_s"]
  all_gather = loss["all_gather"]
  return {"loss_fraction": loss["loss"]["time"]["median_s"] / step_s,
          "all_gather_fraction": (all_gather["time"]["median_s"] / step_s
                                  if all_gather else 0.0),
          "gather_f32_s": gather["float32"],
          "gather_bf16_s": gather["bfloat16"], "detail": loss}


def kernel_grad_cost(per_device_batch: int, steps: int) -> dict:
  """What the policy's float32 kernel gradient costs against the bfloat16
  one JAX's rule gives, on one ResNet-50 layer (3x3, 64 -> 64 channels,
  56 x 56, both views of `per_device_batch` images): median seconds of
  each, jitted alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxclr.models import conv, precision  # pylint: disable=g-import-not-at-top
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  pad = ((1, 1), (1, 1))
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2 * per_device_batch, 56, 56, 64),
                        jnp.bfloat16)
  w = jax.random.normal(keys[1], (3, 3, 64, 64), jnp.bfloat16)
  g = jax.random.normal(keys[2], x.shape, jnp.bfloat16)
  options = precision.compiler_options("bfloat16")
  as_bf16 = jax.jit(lambda x, w, g: jax.vjp(
      lambda w: conv.conv2d(x, w, 1, pad), w)[1](g)[0],
                    compiler_options=options)
  as_f32 = jax.jit(lambda x, w, g: precision.conv_kernel_grad(
      x, g, w.shape, 1, pad), compiler_options=options)
  out = {"layer": "3x3 64->64 at 56x56", "views": 2 * per_device_batch}
  for name, fn in (("bfloat16_s", as_bf16), ("float32_s", as_f32)):
    out[name] = measure.summarize(measure.time_calls(
        lambda: fn(x, w, g), steps, warmup=1))["median_s"]
  return out


def excess_precision_cost(base_config, mesh, case: dict, steps: int) -> dict:
  """The timed step again with XLA's default xla_allow_excess_precision
  (True) instead of the policy's False: what keeping every bfloat16
  rounding costs on this device."""
  from benchmarks import memory  # pylint: disable=g-import-not-at-top
  config = memory.accelerator_config(
      base_config, global_batch=case["global_batch"],
      compute_dtype=base_config.model.compute_dtype)
  config.model.remat = case["remat"]
  trainer, compiled, *_ = memory.compile_step(
      config, mesh, compiler_options={"xla_allow_excess_precision": True})
  timing = time_step(compiled, trainer, config, mesh, steps)
  return {"remat": case["remat"], "per_device_batch":
          case["per_device_batch"],
          "policy_step_s": case["step_time"]["median_s"],
          "excess_precision_step_s": timing["step_time"]["median_s"]}


def colour_blur(config, settings: dict) -> dict:
  """On-device colour jitter + grayscale + blur of the config, images/s
  on one device (benchmarks/input_pipeline.py)."""
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  a = config.augment
  rate, _ = input_pipeline.time_device(
      settings["colour_image_size"], settings["colour_batch"], 5,
      color_jitter_strength=a.color_jitter_strength, use_blur=a.use_blur)
  return {"images_per_s": rate, "image_size": settings["colour_image_size"],
          "batch": settings["colour_batch"]}


def run(*, size: str = "auto", devices: int | None = None,
        budget_s: float = 420.0, steps: int = 8,
        limit_bytes: float | None = None, command: str = "") -> dict:
  """Every measurement of the module docstring; returns the record."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  from benchmarks import layout, measure  # pylint: disable=g-import-not-at-top
  budget = Budget(budget_s)
  all_devices = jax.devices()
  chosen = all_devices[:devices] if devices else all_devices
  mesh = sharding.make_mesh("explicit", chosen)
  platform, kind = chosen[0].platform, chosen[0].device_kind
  settings = size_settings(size, platform)
  config = config_lib.load_config_file(IMAGENET, settings["config_arg"] or
                                       None)
  peak_name, peak_flops = peak_bf16(kind)
  stats = (chosen[0].memory_stats() or {}) if hasattr(
      chosen[0], "memory_stats") else {}
  device_limit = stats.get("bytes_limit")
  if limit_bytes is None:
    limit_bytes = (device_limit * FIT_FRACTION if device_limit else
                   TINY_LIMIT_BYTES)
  matmul = measure.matmul_peak("bfloat16", settings["matmul"], 5, chosen[0])
  record = {
      **measure.run_record(), "command": command, "size": settings["size"],
      "budget_s": budget_s,
      "model": (f"R-{config.model.depth} {config.image_size} px"),
      "dtype": config.model.compute_dtype,
      "device": {"platform": platform, "device_kind": kind,
                 "num_devices": len(chosen), "peak_name": peak_name,
                 "peak_bf16_flops": peak_flops, "limit_bytes": device_limit,
                 "search_limit_bytes": limit_bytes,
                 "mem_fraction": os.environ.get(
                     "XLA_PYTHON_CLIENT_MEM_FRACTION"),
                 "matmul_bf16": matmul},
      "steps": [], "skipped": {}}
  for remat in (False, True):
    if not budget.allows(0.25 * budget_s):
      record["steps"].append({"remat": remat, "skipped": "time budget"})
      continue
    record["steps"].append(step_case(
        config, mesh, remat, settings, limit_bytes, budget, steps,
        matmul["flops_per_s"], peak_flops))
  timed = [s for s in record["steps"] if not s.get("skipped")]
  # Required parts first; what only prices the policy comes last.
  parts = [("loss", 30, lambda: loss_share(mesh, timed[0], steps)),
           ("colour_blur", 30, lambda: colour_blur(config, settings))]
  if len(chosen) > 1:
    parts.append(("layout", 120, lambda: layout.to_json(layout.run_layouts(
        f"{IMAGENET}:tiny", ["bfloat16"], [1, len(chosen)], 3,
        on_cpu=False))))
  parts.append(("kernel_grad", 20, lambda: kernel_grad_cost(
      settings["layer_batch"], steps)))
  if timed:
    parts.append(("excess_precision", 3 * timed[0]["compile_s"],
                  lambda: excess_precision_cost(config, mesh, timed[0],
                                                steps)))
  for name, estimate_s, fn in parts:
    if name == "loss" and not timed:
      record["skipped"][name] = "no step was timed"
    elif not budget.allows(estimate_s):
      record["skipped"][name] = f"time budget ({budget.left():.0f} s left)"
    else:
      record[name] = fn()
  record["elapsed_s"] = budget_s - budget.left()
  return record


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("out_dir", "accelerator_results",
                      "Where accelerator.json and accelerator.md go.")
  flags.DEFINE_enum("size", "auto", ["auto", "full", "tiny"],
                    "full: configs/imagenet.py (R-50, 224 px); tiny: its "
                    ":tiny; auto: full on GPU/TPU, tiny on the CPU.")
  flags.DEFINE_integer("devices", None, "Devices to use (default: all).")
  flags.DEFINE_float("budget_s", 420.0, "Wall-clock budget of the measured "
                     "parts (compiles included), seconds.")
  flags.DEFINE_integer("steps", 8, "Timed steps per configuration.")
  flags.DEFINE_float("limit_gib", None, "Per-device memory limit of the "
                     "batch search (default: the allocator's, x "
                     f"{FIT_FRACTION}; tiny on the CPU: "
                     f"{TINY_LIMIT_BYTES / GIB:.3f}).")


def main(argv):
  del argv
  # Before jax starts: the card's memory for the search, the CPU settings.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  cpu.prepare()
  record = run(size=FLAGS.size, devices=FLAGS.devices,
               budget_s=FLAGS.budget_s, steps=FLAGS.steps,
               limit_bytes=FLAGS.limit_gib and FLAGS.limit_gib * GIB,
               command="python -m benchmarks.accelerator " +
               " ".join(sys.argv[1:]))
  json_path, md_path = write(record, FLAGS.out_dir)
  print(markdown(record))
  print(f"Wrote {json_path} and {md_path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
