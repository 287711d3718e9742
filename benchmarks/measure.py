"""Measurement pieces of the train-step benchmark (used by step.py, scaling.py
and tests/benchmarks_test.py).

Everything is measured, nothing guessed: FLOPs come from XLA's cost analysis
of the compiled programs, memory from their memory analysis, the peak from a
large matmul timed in the same process, times from wall clock with a
`jax.block_until_ready` after every step.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxclr import losses
from jaxclr.parallel import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def summarize(times: list[float]) -> dict[str, float]:
  """Median, min, max, quartiles and IQR of per-step times (seconds)."""
  q1, _, q3 = np.percentile(times, [25, 50, 75])
  return {"median_s": float(statistics.median(times)), "min_s": min(times),
          "max_s": max(times), "p25_s": float(q1), "p75_s": float(q3),
          "iqr_s": float(q3 - q1), "n": len(times)}


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Times `steps` calls of fn() after `warmup` untimed ones, syncing each."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def cost_flops(compiled) -> float:
  """FLOPs of one execution of a compiled program, per device.

  For an SPMD program (a mesh of n devices) this is one device's partition;
  multiply by n for the whole step. XLA counts a multiply-add as 2 FLOPs and
  skips the taps of a convolution that fall in its zero padding.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per module.
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (XLA's memory analysis).

  peak_bytes = arguments + outputs - aliased (donated) + temporaries: what
  the program holds at once on one device, excluding generated code.
  """
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp")}
  out["peak_bytes"] = (out["argument"] + out["output"] - out["alias"] +
                       out["temp"])
  return out


def device_peak_bytes(devices) -> int | None:
  """Peak bytes in use so far on the first device (GPU/TPU), else None."""
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def matmul_peak(dtype: str, size: int, repeats: int = 5,
                device=None) -> dict[str, float]:
  """Measured FLOP/s of a [size, size] x [size, size] matmul in `dtype`.

  The median of `repeats` timed runs: the compute ceiling MFU is taken
  against, measured in the same process (so under the same machine load).
  """
  device = device or jax.devices()[0]
  dt = DTYPES[dtype]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dt),
                     device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dt),
                     device)
  f = jax.jit(jnp.matmul).lower(a, b).compile()
  times = time_calls(lambda: f(a, b), repeats, warmup=1)
  flops = 2.0 * size ** 3
  return {"dtype": dtype, "size": size, "median_s": statistics.median(times),
          "flops_per_s": flops / statistics.median(times),
          "best_flops_per_s": flops / min(times)}


def today_utc() -> str:
  """The current date in UTC, ISO format (YYYY-MM-DD): when a result was taken."""
  return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def machine() -> dict[str, Any]:
  """Where the numbers were taken: CPU model, cores, jax/jaxlib versions,
  platform, device kind and count, load average."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
  return {"cpu": cpu, "nproc": os.cpu_count(), "platform": dev.platform,
          "device_kind": dev.device_kind, "num_devices": jax.device_count(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "loadavg": [round(x, 2) for x in load]}


def run_record() -> dict[str, Any]:
  """`date` (UTC, today) and `machine` for a result: one helper, so every
  benchmark records when and where it ran rather than a fixed string."""
  return {"date": today_utc(), "machine": machine()}


def machine_label(m: dict[str, Any]) -> str:
  if m["platform"] == "cpu":
    return f"{m['cpu']}, {m['nproc']} cores (CPU, no accelerator)"
  return f"{m['device_kind']} x{m['num_devices']} ({m['platform']})"


def machine_description(m: dict[str, Any]) -> str:
  """machine_label plus the host CPU, device count and jax/jaxlib versions,
  for Markdown rows and headings."""
  versions = f"jax {m.get('jax', '?')}, jaxlib {m.get('jaxlib', '?')}"
  if m["platform"] == "cpu":
    return (f"{m['cpu']}, {m['nproc']} cores, {m['num_devices']} "
            f"{m['device_kind']} device(s) (CPU, no accelerator); {versions}")
  return (f"{m['device_kind']} x{m['num_devices']} ({m['platform']}) on "
          f"{m['cpu']}, {m['nproc']} cores; {versions}")


def compile_with_warnings(lowered, compiler_options=None):
  """Compiles (compiler_options: added to the program's own); returns
  (compiled, seconds, warning messages)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    seconds = time.perf_counter() - t0
  return compiled, seconds, [str(w.message) for w in caught]


def sharded_embeddings(mesh, num_images: int, dim: int, seed: int = 0,
                       dtype: str = "float32"):
  """Two [num_images, dim] views in `dtype` sharded over the mesh's data
  axis."""
  rng = np.random.default_rng(seed)
  spec = sharding.batch_sharded(mesh)
  return tuple(jax.device_put(jnp.asarray(rng.standard_normal(
      (num_images, dim), np.float32), DTYPES[dtype]), spec)
               for _ in range(2))


def loss_grad_fn(mesh, temperature: float, hidden_norm: bool = True):
  """jit(value_and_grad) of the sharded NT-Xent w.r.t. both views' z."""
  def loss(z1, z2):
    return losses.sharded("nt_xent", (z1, z2), mesh=mesh, options={
        "temperature": temperature, "hidden_norm": hidden_norm})[0]
  spec = sharding.batch_sharded(mesh)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                 in_shardings=(spec, spec),
                 out_shardings=(sharding.replicated(mesh), (spec, spec)))


def all_gather_fn(mesh):
  """jit of the loss's collective alone: both views all-gathered."""
  def gather(z1, z2):
    g = lambda z: jax.lax.all_gather(z, sharding.DATA_AXIS, tiled=True)
    return g(z1), g(z2)
  spec = sharding.batch_sharded(mesh)
  return jax.jit(jax.shard_map(gather, mesh=mesh,
                               in_specs=(P(sharding.DATA_AXIS),) * 2,
                               out_specs=(P(),) * 2, check_vma=False),
                 in_shardings=(spec, spec))


def measure_loss(mesh, num_images: int, dim: int, temperature: float,
                 steps: int = 20, warmup: int = 2,
                 budget_s: float | None = None) -> dict[str, Any]:
  """Time, FLOPs and per-device memory of the loss (value_and_grad) and of
  its all-gather alone, on embeddings shaped and sharded as in the step.

  With budget_s, fewer steps (at least 3) are timed when `steps` calls
  would take longer than that."""
  z1, z2 = sharded_embeddings(mesh, num_images, dim)
  n = mesh.devices.size
  out: dict[str, Any] = {"num_images": num_images, "dim": dim, "devices": n}
  for name, fn in (("loss", loss_grad_fn(mesh, temperature)),
                   ("all_gather", all_gather_fn(mesh))):
    if name == "all_gather" and n == 1:
      out[name] = None  # Nothing to gather on one device.
      continue
    compiled, compile_s, _ = compile_with_warnings(fn.lower(z1, z2))
    if steps == 0:  # Compile only: FLOPs and memory, no timing.
      out[name] = {"compile_s": compile_s, "time": None,
                   "flops_per_device": cost_flops(compiled),
                   "memory_per_device": memory(compiled)}
      continue
    k = steps
    if budget_s is not None:
      first = time_calls(lambda: compiled(z1, z2), 1, warmup)[0]
      k, warmup = max(3, min(steps, int(budget_s / max(first, 1e-6)))), 0
    times = time_calls(lambda: compiled(z1, z2), k, warmup)
    out[name] = {"compile_s": compile_s, "time": summarize(times),
                 "flops_per_device": cost_flops(compiled),
                 "memory_per_device": memory(compiled)}
  return out


def synthetic_batch(mesh, batch_size: int, image_size: int,
                    num_classes: int, seed: int = 0) -> dict[str, jax.Array]:
  """A global batch in the pretraining contract (input_pipeline.py), random."""
  rng = np.random.default_rng(seed)
  local = {
      "images": rng.random((batch_size, 2, image_size, image_size, 3),
                           np.float32),
      "labels": rng.integers(0, max(num_classes, 1), batch_size,
                             dtype=np.int32),
      "example_ids": np.arange(batch_size, dtype=np.int32),
  }
  return sharding.global_batch(mesh, local)


def forward_fn(model, mesh, train: bool = True):
  """jit of the model's forward pass on [2B, H, W, 3] (both views), as in the
  step (train=True: batch statistics, updated and discarded)."""
  def forward(variables, images):
    if train:
      out, _ = model.apply(variables, images, train=True,
                           mutable=["batch_stats"])
    else:
      out = model.apply(variables, images, train=False)
    return out["z"]
  return jax.jit(forward, in_shardings=(sharding.replicated(mesh),
                                        sharding.batch_sharded(mesh)))


def normalize_dashes(argv: list[str]) -> list[str]:
  """Accept --append-results etc. (absl flags use underscores)."""
  out = []
  for a in argv:
    if a.startswith("--") and not a.startswith("--config"):
      name, eq, value = a[2:].partition("=")
      a = "--" + name.replace("-", "_") + eq + value
    out.append(a)
  return out


def benchmark_config(config):
  """The config as benchmarked: synthetic data, everything else as given."""
  config = config.copy_and_resolve_references()
  config.dataset = "synthetic"
  config.synthetic.num_examples = max(config.synthetic.num_examples,
                                      config.batch_size)
  return config


def describe(config) -> dict:
  m = config.model
  return {"depth": m.depth, "width_multiplier": m.width_multiplier,
          "image_size": config.image_size, "batch_size": config.batch_size,
          "compute_dtype": m.compute_dtype, "remat": bool(m.get("remat", False)),
          "proj_out_dim": m.proj_out_dim, "num_proj_layers": m.num_proj_layers,
          "augment_on_device": bool(config.augment.on_device),
          "linear_probe": bool(config.linear_probe)}
