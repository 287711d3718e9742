"""Where the pretraining step's time goes, per kind of operation.

  python -m benchmarks.profile_step --config configs/cifar10.py \
      [--config.batch_size=256 ...] [--steps 2] [--out profile.json]

Builds the step as the job does (jobs.pretrain.create_trainer on synthetic
images, like benchmarks/step.py), runs --steps steps under jax.profiler.trace
and adds up the duration of every executed XLA operation (the thunks XLA:CPU
runs, named by their HLO instruction) by category. Each instruction is
classified from the compiled HLO's op_name metadata, which carries the JAX
transformation stack and the flax module path:

  conv forward          convolution, not under transpose(...)
  conv backward-input   convolution under transpose(...)
  conv backward-filter  the convolutions XLA writes for kernel gradients
                        (activations * output gradients; no op_name), or,
                        with model.conv_kernel_grad='patches' (the
                        one-device CPU default), the per-tap matmuls and window copies of
                        a conv module under transpose(...)
  batchnorm             anything inside a BatchNorm module (bn*, *_bn), fwd
                        and bwd
  other model           the rest of the model (ReLU, residual adds, pooling,
                        dense layers, casts), fwd and bwd
  loss                  outside the model and before the update
  optimizer             LARS and the state update (under the finiteness
                        check's cond)
  copies/transposes     layout changes XLA inserted: copies with no op_name,
                        and every fusion that transposes (XLA fuses the
                        recomputed BatchNorm / ReLU / residual add into the
                        transposes that feed the kernel-gradient
                        convolutions, so their op_names are BatchNorm's)

With XLA:CPU's Eigen convolutions (jaxclr/cpu/runtime.py, the CPU default on
jaxlib 0.10) the convolutions emit no per-operation trace events: their time
is in "not in the trace" (the step's wall time minus the operations traced),
and the conv rows hold only the kernel-gradient matmuls and copies. Run with
JAXCLR_CPU_CONV=ynnpack to split the convolutions by kind (on YNNPACK).

The table gives each category's share of the summed operation time and its
milliseconds per step, with the step's wall time beside it (on a multi-core
CPU independent operations can overlap, so the sum may exceed the wall).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

CATEGORIES = ("conv forward", "conv backward-input", "conv backward-filter",
              "batchnorm", "other model", "loss", "optimizer",
              "copies/transposes")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\(")
_COMPUTATION = re.compile(r"^%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_BN = re.compile(r"/(?:\w*_)?bn\d*/")
# The ResNets' conv modules: conv1-3, proj_conv, stem_conv[1-3], the SK
# block's conv, fc1 and fc2.
_CONV_MODULE = re.compile(r"/(?:\w*_)?conv\d*/|/fc\d/")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """({instruction: (opcode, op_names, called computation)},
  {computation: [(opcode, op_names) of its instructions]})."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, _, opcode = m.groups()
      names = _OP_NAME.findall(line)
      calls = _CALLS.search(line)
      instructions[name] = (opcode, names, calls.group(1) if calls else None)
      if current:
        computations[current].append((opcode, names))
      continue
    m = _COMPUTATION.match(line.strip())
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
  return instructions, computations


def classify_convolution(names: list[str]) -> str:
  """XLA writes a kernel gradient as a convolution of the activations with
  the output gradients and drops its metadata; the forward and input-
  gradient convolutions keep JAX's op_name (the latter under transpose)."""
  if not names:
    return "conv backward-filter"
  if any("transpose(" in n for n in names):
    return "conv backward-input"
  return "conv forward"


def classify(names: list[str]) -> str:
  """The category of a non-convolution operation from its op_names."""
  if not names:
    return "copies/transposes"
  if any("SimCLRModel" in n for n in names):
    kernel_grad = sum("transpose(" in n and bool(_CONV_MODULE.search(n))
                      for n in names)
    if kernel_grad * 2 >= len(names):
      return "conv backward-filter"
    bn = sum(bool(_BN.search(n)) for n in names)
    return "batchnorm" if bn * 2 >= len(names) else "other model"
  if any("cond/" in n or "is_finite" in n for n in names):
    return "optimizer"
  return "loss"


def instruction_categories(hlo_text: str) -> dict:
  instructions, computations = parse_hlo(hlo_text)
  out = {}
  for name, (opcode, names, calls) in instructions.items():
    inner = computations.get(calls, []) if calls else []
    convs = [n for op, n in inner if op == "convolution"]
    if opcode == "convolution":
      out[name] = classify_convolution(names)
    elif convs:
      out[name] = classify_convolution(convs[0])
    elif any(op == "transpose" for op, _ in inner) or opcode == "transpose":
      out[name] = "copies/transposes"
    else:
      out[name] = classify([n for _, ns in inner for n in ns] or names)
  return out


def op_durations(trace_dir: str) -> dict[str, float]:
  """{event name: total microseconds} of the trace's complete events."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X":
      totals[e["name"]] += float(e.get("dur", 0.0))
  return totals


def profile(config, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.jobs import pretrain  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  from jaxclr.training import optim  # pylint: disable=g-import-not-at-top
  from benchmarks import measure  # pylint: disable=g-import-not-at-top

  config = measure.benchmark_config(config)
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh_axis_type, jax.devices()[:1])
  num_classes = config.synthetic.num_classes if config.linear_probe else 0
  plan = optim.training_plan(config, config.synthetic.num_examples)
  trainer = pretrain.create_trainer(config, mesh, plan, num_classes)
  state = trainer.init_fn(jax.random.key(config.seed))
  batch = measure.synthetic_batch(mesh, config.batch_size, config.image_size,
                                  num_classes, seed=config.seed)
  compiled = trainer.step_fn.lower(state, batch).compile()
  categories = instruction_categories(compiled.as_text())
  state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / steps
    durations = op_durations(tmp)
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  for name, us in durations.items():
    if name in categories:
      by_category[categories[name]] += us / steps / 1e3
  total = sum(by_category.values())
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  return {**measure.run_record(), "config": measure.describe(config),
          "step_wall_ms": wall * 1e3, "op_ms_per_step": by_category,
          "op_total_ms": total,
          "eigen_convolutions": cpu.eigen_convolutions(),
          "untraced_ms": max(0.0, wall * 1e3 - total),
          "share": {k: v / total for k, v in by_category.items()}}



def define_flags():
  """The command's flags: defined only when run as a program, so importing
  the module (tests, other benchmarks) does not clash with their --config."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 2, "Profiled steps (after one warm-up).")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")


def main(argv):
  del argv
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  cpu.prepare()  # As the jobs do (before jax starts).
  r = profile(FLAGS.config, FLAGS.steps)
  print(f"step wall {r['step_wall_ms']:.0f} ms; operations "
        f"{r['op_total_ms']:.0f} ms")
  for k in CATEGORIES:
    print(f"  {k:22s} {r['op_ms_per_step'][k]:9.1f} ms  "
          f"{100 * r['share'][k]:5.1f}%")
  if r["eigen_convolutions"]:
    print(f"  (not in the trace: {r['untraced_ms']:.0f} ms of the wall time, "
          "most of it the convolutions: XLA:CPU's Eigen convolutions emit no "
          "per-operation events; JAXCLR_CPU_CONV=ynnpack times them)")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  define_flags()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  app.run(main)
