"""Benchmarks the pretraining step of a config on synthetic data.

  python -m benchmarks.step --config configs/cifar10.py \
      [--config.batch_size=64 ...] [--steps 20] [--devices N] \
      [--out results.json] [--append-results]

The step is built by jaxclr.jobs.pretrain.create_trainer, exactly as the job
builds it, with dataset=synthetic forced (random images already on the
devices: no input pipeline, no I/O). Reports compile time; per-step wall time
(median, min/max, IQR over --steps steps after --warmup, each synced with
block_until_ready); images/s; FLOPs per image of the step and of the forward
pass from XLA's cost analysis; MFU against a large matmul in the compute
dtype timed in the same run; per-device memory from XLA's memory analysis
(and the allocator's peak on GPU/TPU); and the share of the step taken by the
contrastive loss (value_and_grad of the sharded NT-Xent on embeddings of the
step's shape and sharding) and by its all-gather.

--devices N on CPU simulates N devices (XLA's host device count). With
simulated devices the matmul peak is the whole machine's, since they share
its cores; on GPU/TPU it is per device and MFU divides by N x peak.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps (after the warm-up).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("devices", None, "Devices in the mesh (default: all; on "
                     "CPU, simulates N host devices).")
flags.DEFINE_integer("peak_size", None, "Side of the peak matmul (default "
                     "2048 on CPU, 8192 on accelerators).")
flags.DEFINE_integer("peak_repeats", 5, "Timed runs of the peak matmul.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
flags.DEFINE_bool("append_results", False, "Append a row to --results_md.")
flags.DEFINE_string("results_md", os.path.join(os.path.dirname(__file__),
                                               "RESULTS.md"),
                    "Markdown file for --append-results.")
flags.DEFINE_string("note", "", "Free text for the Markdown row.")

TABLE_TITLE = "## Train step (benchmarks/step.py)"
TABLE_HEADER = (
    "| date | machine (load avg 1/5/15 min) | config | dev | B/dev | dtype | "
    "compile s | step s median [min, max] IQR | img/s | img/s/dev | "
    "GFLOP/img step (fwd) | peak GFLOP/s | MFU | mem/dev MB (temp) | "
    "loss % step (all-gather %) | note | command |\n"
    + "|---" * 17 + "|\n")


def benchmark_config(config):
  # In benchmarks/measure.py (shared with profile_step); imported late, as
  # jax is: --devices must be set before jax starts.
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  return measure.benchmark_config(config)


def describe(config) -> dict:
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  return measure.describe(config)


UNREAD_STATE_LEAVES = (".opt_state.inner_state.hyperparams['learning_rate']",
                       ".opt_state.last_finite")


def measure_step(config, *, num_devices: int | None = None, steps: int = 20,
                 warmup: int = 3, peak_size: int | None = None,
                 peak_repeats: int = 5, loss_steps: int = 20) -> dict:
  """Compiles and times the pretraining step of `config`; returns a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr import (  # pylint: disable=g-import-not-at-top
      config as config_lib, cpu)
  from jaxclr.jobs import pretrain  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  from jaxclr.training import (  # pylint: disable=g-import-not-at-top
      optim, update)
  from benchmarks import measure  # pylint: disable=g-import-not-at-top

  config = benchmark_config(config)
  config_lib.validate(config)
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  if num_devices and len(devices) < num_devices:
    raise ValueError(f"--devices={num_devices} but only {len(devices)} "
                     "device(s) exist")
  mesh = sharding.make_mesh(config.mesh_axis_type, devices)
  sharding.check_batch_divides(config.batch_size, mesh)
  n = len(devices)
  num_classes = config.synthetic.num_classes if config.linear_probe else 0
  plan = optim.training_plan(config, config.synthetic.num_examples)
  trainer = pretrain.create_trainer(config, mesh, plan, num_classes)
  result: dict = {**measure.run_record(),
                  "config": describe(config), "devices": n,
                  "per_device_batch": config.batch_size // n}

  state = trainer.init_fn(jax.random.key(config.seed))
  batch = measure.synthetic_batch(mesh, config.batch_size, config.image_size,
                                  num_classes, seed=config.seed)

  # XLA's cost analysis does not see into the oneDNN convolutions' custom
  # calls (jaxclr/cpu/onednn_conv.py): their FLOPs are counted on the
  # same step with XLA's convolutions, the same arithmetic.
  library = cpu.resolve_library(config.model.conv_library,
                                compute_dtype=config.model.compute_dtype)
  result["conv_library"] = library
  counted = trainer
  if library == "onednn":
    xla_config = config.copy_and_resolve_references()
    xla_config.model.conv_library = "xla"
    counted = pretrain.create_trainer(xla_config, mesh, plan, num_classes)

  # Forward pass alone (both views, batch statistics as in training).
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = update.flatten_views(batch["images"])
  fwd, _, _ = measure.compile_with_warnings(
      measure.forward_fn(trainer.model, mesh).lower(variables, images))
  fwd_flops = measure.cost_flops(fwd if counted is trainer else
                                 measure.forward_fn(counted.model, mesh).lower(
                                     variables, images).compile()) * n
  fwd_times = measure.time_calls(lambda: fwd(variables, images),
                                 max(3, steps // 2), 1)
  del fwd, images

  compiled, compile_s, compile_warnings = measure.compile_with_warnings(
      trainer.step_fn.lower(state, batch))
  step_flops = measure.cost_flops(
      compiled if counted is trainer else
      counted.step_fn.lower(state, batch).compile()) * n
  result.update(compile_s=compile_s, flops_per_step=step_flops,
                flops_per_image=step_flops / config.batch_size,
                forward_flops_per_image=fwd_flops / config.batch_size,
                memory_per_device=measure.memory(compiled))

  # First call: does the state's donation take effect?
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    old = state
    state, _ = compiled(old, batch)
    jax.block_until_ready(state)
  # Leaves the step overwrites without reading (the injected learning rate,
  # apply_if_finite's last_finite flag) are no input XLA keeps, so they are
  # not donated: two scalars. Every buffer the step reads must be.
  kept = sorted(jax.tree_util.keystr(p)
                for p, x in jax.tree_util.tree_leaves_with_path(old)
                if not x.is_deleted())
  messages = compile_warnings + [str(w.message) for w in caught]
  result["donation"] = {
      "state_donated": kept == list(UNREAD_STATE_LEAVES),
      "not_donated": kept,
      "unusable_donation_warnings": [m for m in messages if "donat" in m]}
  del old

  holder = [state]

  def one_step():
    holder[0], _ = compiled(holder[0], batch)
    return holder[0]

  # No implicit host<->device transfer may happen in the steady state.
  with jax.transfer_guard("disallow"):
    times = measure.time_calls(one_step, steps, warmup)
    t0 = time.perf_counter()  # Dispatch ahead, sync once: the job's mode.
    for _ in range(steps):
      one_step()
    jax.block_until_ready(holder[0])
    pipelined = (time.perf_counter() - t0) / steps
  result["host_sync_free"] = True  # The guard would have raised otherwise.
  step = measure.summarize(times)
  med = step["median_s"]
  result.update(step_time=step, pipelined_step_s=pipelined,
                forward_time=measure.summarize(fwd_times),
                forward_fraction_time=(statistics.median(fwd_times) / med),
                images_per_s=config.batch_size / med,
                images_per_s_per_device=config.batch_size / med / n,
                device_peak_bytes=measure.device_peak_bytes(devices))
  del holder, state, compiled

  on_cpu = devices[0].platform == "cpu"
  size = peak_size or (2048 if on_cpu else 8192)
  peak = measure.matmul_peak(config.model.compute_dtype, size, peak_repeats,
                             devices[0])
  # Simulated CPU devices share the machine's cores: the machine is the peak.
  peak_total = peak["flops_per_s"] * (1 if on_cpu else n)
  result.update(peak=peak, peak_scope="machine" if on_cpu else "per_device",
                peak_flops_per_s_total=peak_total,
                achieved_flops_per_s=step_flops / med,
                mfu=step_flops / med / peak_total)

  loss = measure.measure_loss(mesh, config.batch_size,
                              config.model.proj_out_dim,
                              config.simclr.temperature,
                              steps=loss_steps)
  result["loss"] = loss
  result["loss_fraction_time"] = loss["loss"]["time"]["median_s"] / med
  result["loss_fraction_flops"] = (loss["loss"]["flops_per_device"] * n /
                                   step_flops)
  result["all_gather_fraction_time"] = (
      loss["all_gather"]["time"]["median_s"] / med if loss["all_gather"]
      else 0.0)
  result["machine_after"] = {"loadavg": measure.machine()["loadavg"]}
  return result


def markdown_row(r: dict, command: str, note: str = "") -> str:
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  c, s, mem = r["config"], r["step_time"], r["memory_per_device"]
  cfg = (f"R-{c['depth']} w{c['width_multiplier']:g} {c['image_size']}px "
         f"B={c['batch_size']}" + (" remat" if c["remat"] else ""))
  load = "/".join(f"{x:g}" for x in r["machine"]["loadavg"])
  gather = r["all_gather_fraction_time"] * 100
  return (
      f"| {r['date']} | {measure.machine_description(r['machine'])} ({load}) | "
      f"{cfg} | {r['devices']} | {r['per_device_batch']} | "
      f"{c['compute_dtype']} | {r['compile_s']:.1f} | "
      f"{s['median_s']:.4g} [{s['min_s']:.4g}, {s['max_s']:.4g}] "
      f"{s['iqr_s']:.2g} | {r['images_per_s']:.4g} | "
      f"{r['images_per_s_per_device']:.4g} | "
      f"{r['flops_per_image'] / 1e9:.4g} ({r['forward_flops_per_image'] / 1e9:.4g}) | "
      f"{r['peak']['flops_per_s'] / 1e9:.1f} | {r['mfu'] * 100:.1f}% | "
      f"{mem['peak_bytes'] / 2**20:.1f} ({mem['temp'] / 2**20:.1f}) | "
      f"{r['loss_fraction_time'] * 100:.2g}% ({gather:.2g}%) | {note} | "
      f"`{command}` |\n")


def append_markdown(path: str, row: str, title: str = TABLE_TITLE,
                    header: str = TABLE_HEADER):
  """Appends `row` to the table under `title` when that table ends the file,
  else starts a new `title` section at the end (others' sections stay)."""
  text = open(path).read() if os.path.exists(path) else "# jaxclr benchmark results\n"
  last_section = text[text.rfind("\n## ") + 1:] if "\n## " in text else ""
  continues = (last_section.startswith(title) and
               text.rstrip("\n").splitlines()[-1].startswith("|"))
  with open(path, "a") as f:
    if not continues:
      f.write(("\n" if not text.endswith("\n\n") else "") +
              f"{title}\n\n{header}")
    elif not text.endswith("\n"):
      f.write("\n")
    f.write(row)


def command_line(argv: list[str]) -> str:
  return "python -m benchmarks.step " + " ".join(argv[1:])


def main(argv):
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  cpu.prepare()  # As the jobs do (before jax starts).
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.devices:  # Read when the CPU backend starts (after this line).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={FLAGS.devices}").strip()
  result = measure_step(FLAGS.config, num_devices=FLAGS.devices,
                        steps=FLAGS.steps, warmup=FLAGS.warmup,
                        peak_size=FLAGS.peak_size,
                        peak_repeats=FLAGS.peak_repeats)
  result["command"] = command_line(sys.argv)
  result["note"] = FLAGS.note
  text = json.dumps(result, indent=1)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")
  if FLAGS.append_results:
    append_markdown(FLAGS.results_md,
                    markdown_row(result, result["command"], FLAGS.note))


if __name__ == "__main__":
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  app.run(main, argv=measure.normalize_dashes(sys.argv))
