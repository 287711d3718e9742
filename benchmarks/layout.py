"""The logged losses of a config's first steps on several device layouts
(issue #32's table), and how far the layouts' states are apart.

  python -m benchmarks.layout --config configs/imagenet.py:tiny \
      [--dtypes float32,bfloat16] [--devices 1,2,8] [--steps 3] \
      [--out layout.json]

On the CPU each device count runs in its own process (N simulated host
devices: XLA reads the count once); on GPU/TPU every count is a mesh over
the first N real devices of one process. XLA's convolutions throughout
(model.conv_library / conv_kernel_grad 'xla'): the CPU-only kernels of a
one-device CPU job are float32 paths another engineer owns, and the
question here is what an accelerator's step does. Prints a Markdown table:
one row per (dtype, devices), one column per step, and for each dtype the
largest relative spread of a step's loss over the layouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layout_config(config, dtype: str, steps: int):
  """config at `dtype` for `steps` steps, on XLA's convolutions."""
  config = config.copy_and_resolve_references()
  config.model.compute_dtype = dtype
  config.num_train_steps = steps
  config.model.conv_kernel_grad = "xla"
  config.model.conv_library = "xla"
  return config


def first_steps(config, mesh, steps: int) -> dict:
  """Runs `steps` steps of the pretraining step of `config` on `mesh` from
  its seed; returns the logged losses and the state after the first step
  (host copies)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxclr.jobs import pretrain  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  from jaxclr.training import optim  # pylint: disable=g-import-not-at-top
  data = config_lib.data_spec(config)
  src = input_pipeline.open_source(data, "train")
  info = input_pipeline.dataset_info(src)
  plan = optim.training_plan(config, info.num_train_examples)
  num_classes = info.num_classes if config.linear_probe else 0
  trainer = pretrain.create_trainer(config, mesh, plan, num_classes)
  state = trainer.init_fn(jax.random.key(config.seed))
  batches = input_pipeline.pretrain_batches(
      data, src, batch_size=config.batch_size, start_step=0,
      process_index=0, process_count=1)
  losses, first = [], None
  for _ in range(steps):
    state, metrics = trainer.step_fn(
        state, sharding.global_batch(mesh, next(batches)))
    losses.append(float(metrics["loss"]))
    if first is None:
      first = jax.device_get(state)
  return {"losses": losses, "state_after_first": first}


def relative_difference(a, b) -> float:
  """|a - b| / |b| over the whole tree (float64)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                   for x in jax.tree.leaves(t)])
  a, b = flat(a), flat(b)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(runs: dict[int, dict]) -> dict:
  """runs: {devices: first_steps(...)}; each layout's losses and its
  parameter / BN-statistics distance from the fewest-device run after the
  first step, and the largest relative loss spread of any step."""
  base = runs[min(runs)]
  rows = {}
  for n, r in sorted(runs.items()):
    s, b = r["state_after_first"], base["state_after_first"]
    rows[n] = {"losses": r["losses"],
               "params_rel_after_first": relative_difference(s.params,
                                                             b.params),
               "batch_stats_rel_after_first": relative_difference(
                   s.batch_stats, b.batch_stats)}
  return {"rows": rows, "max_loss_spread": loss_spread(
      [r["losses"] for r in runs.values()])}


def loss_spread(loss_table) -> float:
  """Largest (max - min) / min of a step's loss over the layouts."""
  steps = zip(*loss_table)
  return max((max(s) - min(s)) / min(s) for s in steps)


def markdown(results: dict) -> str:
  """results: {dtype: compare(...)}."""
  steps = len(next(iter(next(iter(results.values()))["rows"].values()))[
      "losses"])
  head = ("| dtype | devices | " + " | ".join(f"step {i + 1}" for i in
                                              range(steps))
          + " | params after step 1 (rel. to fewest) |\n"
          + "|---" * (steps + 3) + "|\n")
  lines = []
  for dtype, res in results.items():
    for n, row in res["rows"].items():
      losses = " | ".join(f"{x:.5f}" for x in row["losses"])
      lines.append(f"| {dtype} | {n} | {losses} | "
                   f"{row['params_rel_after_first']:.2g} |\n")
  spreads = "; ".join(f"{d}: {r['max_loss_spread'] * 100:.3g} %"
                      for d, r in results.items())
  return head + "".join(lines) + f"\nLargest loss spread of a step: {spreads}\n"


def load_config(config_arg: str):
  """'path[:arg]' -> the config."""
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = config_arg.partition(":")
  return config_lib.load_config_file(path, arg or None)


def _inner(config_arg, dtype, devices, steps, out):
  """In a process with `devices` host devices: pickles first_steps."""
  import pickle  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh("explicit", jax.devices()[:devices])
  r = first_steps(layout_config(load_config(config_arg), dtype, steps), mesh,
                  steps)
  with open(out, "wb") as f:
    pickle.dump(r, f)


def run_cpu(config_arg: str, dtype: str, devices: int, steps: int) -> dict:
  """first_steps in a fresh process with `devices` simulated CPU devices."""
  import pickle  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.pkl")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "benchmarks.layout",
                    f"--config={config_arg}", f"--dtypes={dtype}",
                    f"--devices={devices}", f"--steps={steps}",
                    f"--inner={out}"], check=True, cwd=ROOT, env=env)
    with open(out, "rb") as f:
      return pickle.load(f)


def run_layouts(config_arg: str, dtypes, devices, steps: int,
                on_cpu: bool) -> dict:
  """{dtype: compare({devices: first_steps})}: on the CPU one process per
  device count, else meshes over the first N devices of this process."""
  results = {}
  for dtype in dtypes:
    runs = {}
    for n in devices:
      if on_cpu:
        runs[n] = run_cpu(config_arg, dtype, n, steps)
      else:
        import jax  # pylint: disable=g-import-not-at-top
        from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
        runs[n] = first_steps(
            layout_config(load_config(config_arg), dtype, steps),
            sharding.make_mesh("explicit", jax.devices()[:n]), steps)
    results[dtype] = compare(runs)
  return results


def to_json(results: dict) -> dict:
  return {dtype: {"max_loss_spread": r["max_loss_spread"],
                  "rows": {str(n): row for n, row in r["rows"].items()}}
          for dtype, r in results.items()}


def define_flags():
  flags.DEFINE_string("config", "configs/imagenet.py:tiny",
                      "Config file[:arguments].")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
  flags.DEFINE_list("devices", ["1", "2", "8"], "Device counts.")
  flags.DEFINE_integer("steps", 3, "Steps from the seed.")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")
  flags.DEFINE_string("inner", None, "Internal: one CPU run, pickled here.")


def main(argv):
  del argv
  f = flags.FLAGS
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  cpu.prepare()  # As the jobs do, before jax starts.
  devices = [int(d) for d in f.devices]
  if f.inner:
    _inner(f.config, f.dtypes[0], devices[0], f.steps, f.inner)
    return
  on_cpu = os.environ.get("JAX_PLATFORMS", "") == "cpu"
  if not on_cpu:
    import jax  # pylint: disable=g-import-not-at-top
    on_cpu = jax.default_backend() == "cpu"
  results = run_layouts(f.config, f.dtypes, devices, f.steps, on_cpu)
  print(markdown(results))
  if f.out:
    with open(f.out, "w") as fh:
      json.dump(to_json(results), fh, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
