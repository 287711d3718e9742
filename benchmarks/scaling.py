"""Scaling studies on simulated devices: one subprocess per device count.

  # Train step at a fixed global batch and at a fixed per-device batch:
  python -m benchmarks.scaling step --config configs/synthetic_tiny.py \
      --global_batch 64 --per_device_batch 8 --devices 1,2,4,8 [--append-results]
  # NT-Xent (value_and_grad) cost vs global batch, embeddings of dim 128:
  python -m benchmarks.scaling loss --batches 256,1024,4096,16384 \
      --devices 1,8 [--append-results]

On a CPU the N "devices" are XLA host devices sharing the same cores, so
times show overheads (collectives, per-device program size), not speed-ups;
the per-device memory figures are what N real devices would each hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file[:args] for the step study.")
flags.DEFINE_multi_string("override", [], "--config.k=v overrides, e.g. "
                          "--override=model.compute_dtype=bfloat16.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts.")
flags.DEFINE_integer("global_batch", 64, "Step study: fixed global batch.")
flags.DEFINE_integer("per_device_batch", 8, "Step study: fixed per-device batch.")
flags.DEFINE_list("batches", ["256", "1024", "4096", "16384"],
                  "Loss study: global batches (images).")
flags.DEFINE_integer("dim", 128, "Loss study: embedding dimension.")
flags.DEFINE_float("temperature", 0.1, "Loss study: temperature.")
flags.DEFINE_integer("steps", 20, "Timed steps (loss: at most; fewer once a "
                     "call takes > 1 s).")
flags.DEFINE_integer("time_max_batch", 8192, "Loss study: larger global "
                     "batches are compiled (FLOPs, memory) but not run.")
flags.DEFINE_bool("append_results", False, "Append tables to RESULTS.md.")
flags.DEFINE_string("results_md", os.path.join(os.path.dirname(__file__),
                                               "RESULTS.md"), "Markdown file.")
flags.DEFINE_string("inner", None, "Internal: run the loss study in-process "
                    "and write JSON to this path.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_step(devices: int, batch: int) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = [sys.executable, "-m", "benchmarks.step", f"--config={FLAGS.config}",
         f"--config.batch_size={batch}", f"--devices={devices}",
         f"--steps={FLAGS.steps}", f"--out={out}"]
  cmd += [f"--config.{o}" for o in FLAGS.override]
  subprocess.run(cmd, check=True, cwd=ROOT, env=_env(devices),
                 stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def loss_study_inner(path: str):
  """Runs in the subprocess: every batch on all of its devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh("explicit")
  rows = []
  for b in (int(x) for x in FLAGS.batches):
    # The largest batches get fewer (>= 3) timed calls, ~10 s each study.
    steps = FLAGS.steps if b <= FLAGS.time_max_batch else 0
    r = measure.measure_loss(mesh, b, FLAGS.dim, FLAGS.temperature,
                             steps=steps, warmup=1, budget_s=10.0)
    r["loadavg"] = list(os.getloadavg())
    r.update(measure.run_record())
    rows.append(r)
    print(json.dumps({"batch": b, "devices": jax.device_count(),
                      "loss_time": r["loss"]["time"]}), flush=True)
  with open(path, "w") as f:
    json.dump(rows, f)


def run_loss(devices: int) -> list[dict]:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = [sys.executable, "-m", "benchmarks.scaling", "loss",
         f"--inner={out}", f"--batches={','.join(FLAGS.batches)}",
         f"--dim={FLAGS.dim}", f"--temperature={FLAGS.temperature}",
         f"--steps={FLAGS.steps}", f"--time_max_batch={FLAGS.time_max_batch}"]
  subprocess.run(cmd, check=True, cwd=ROOT, env=_env(devices))
  with open(out) as f:
    return json.load(f)


def step_table(rows: list[tuple[str, dict]]) -> str:
  lines = ["| study | dev | global B | B/dev | step s median [IQR] | img/s | "
           "img/s/dev | GFLOP/img | mem/dev MB (temp) | loss % step | "
           "all-gather % step | load avg |", "|---" * 12 + "|"]
  for study, r in rows:
    s, m = r["step_time"], r["memory_per_device"]
    lines.append(
        f"| {study} | {r['devices']} | {r['config']['batch_size']} | "
        f"{r['per_device_batch']} | {s['median_s']:.4g} [{s['iqr_s']:.2g}] | "
        f"{r['images_per_s']:.4g} | {r['images_per_s_per_device']:.4g} | "
        f"{r['flops_per_image'] / 1e9:.4g} | {m['peak_bytes'] / 2**20:.1f} "
        f"({m['temp'] / 2**20:.1f}) | {r['loss_fraction_time'] * 100:.2g}% | "
        f"{r['all_gather_fraction_time'] * 100:.2g}% | "
        f"{'/'.join(f'{x:g}' for x in r['machine']['loadavg'])} |")
  return "\n".join(lines) + "\n"


def loss_table(rows: list[dict]) -> str:
  lines = ["| global B | dev | B/dev | loss+grad s median [IQR] | GFLOP/dev | "
           "temp MB/dev | all-gather s median | all-gather temp MB/dev | "
           "load avg |", "|---" * 9 + "|"]
  for r in rows:
    lo, ag = r["loss"], r["all_gather"]
    t = (f"{lo['time']['median_s']:.4g} [{lo['time']['iqr_s']:.2g}]"
         if lo["time"] else "not run (compiled only)")
    agt = (f"{ag['time']['median_s']:.3g}" if ag and ag["time"] else "-")
    lines.append(
        f"| {r['num_images']} | {r['devices']} | "
        f"{r['num_images'] // r['devices']} | {t} | "
        f"{lo['flops_per_device'] / 1e9:.4g} | "
        f"{lo['memory_per_device']['temp'] / 2**20:.1f} | "
        + (f"{agt} | {ag['memory_per_device']['temp'] / 2**20:.2f}"
           if ag else "- | -")
        + f" | {'/'.join(f'{x:.1f}' for x in r['loadavg'])} |")
  return "\n".join(lines) + "\n"


def main(argv):
  study = argv[1] if len(argv) > 1 else None
  if study == "loss" and FLAGS.inner:
    loss_study_inner(FLAGS.inner)
    return
  command = "python -m benchmarks.scaling " + " ".join(sys.argv[1:])
  t0 = time.time()
  if study == "step":
    if not FLAGS.config:
      raise app.UsageError("the step study needs --config")
    rows = []
    for n in (int(x) for x in FLAGS.devices):
      rows.append((f"fixed global B={FLAGS.global_batch}",
                   run_step(n, FLAGS.global_batch)))
    for n in (int(x) for x in FLAGS.devices):
      if n * FLAGS.per_device_batch == FLAGS.global_batch:
        r = next(r for s, r in rows if r["devices"] == n)  # Already measured.
      else:
        r = run_step(n, n * FLAGS.per_device_batch)
      rows.append((f"fixed B/dev={FLAGS.per_device_batch}", r))
    table = step_table(rows)
    title = "## Step scaling over simulated devices (benchmarks/scaling.py step)"
  elif study == "loss":
    rows = []
    for n in (int(x) for x in FLAGS.devices):
      rows.extend(run_loss(n))
    table = loss_table(rows)
    title = "## NT-Xent cost vs global batch (benchmarks/scaling.py loss)"
  else:
    raise app.UsageError("usage: python -m benchmarks.scaling {step,loss} ...")
  print(table)
  if FLAGS.append_results:
    from benchmarks import measure  # pylint: disable=g-import-not-at-top
    record = measure.run_record()
    m = measure.machine_description(record["machine"])
    with open(FLAGS.results_md, "a") as f:
      f.write(f"\n{title}\n\nDate {record['date']} (UTC), machine {m}; "
              f"{time.time() - t0:.0f} s wall.\n\n    {command}\n\n{table}")


if __name__ == "__main__":
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  app.run(main, argv=measure.normalize_dashes(sys.argv))
