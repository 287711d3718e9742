"""Chaos test: SIGKILL a pretraining run at random moments, resume, compare.

  python benchmarks/chaos.py --kills 10 [--steps 100 --every 3 --seed 0]

Runs `python -m jaxclr.main --config configs/synthetic_tiny.py:steps=S,every=E`
once uninterrupted, then again in a second workdir where each life of the
process is SIGKILLed at a random moment (once it has committed a new
checkpoint, after a random 0 to 2*every further steps plus uniform
[0, max_delay) seconds: during a step, a metrics write or an async checkpoint
save) and restarted with the same command, `--kills` times, before
it may finish. Checks that the final checkpoints are bitwise equal (params,
optimizer state, BatchNorm statistics, step, non-finite record) and that
every step's loss in metrics.jsonl matches (same data order). Exit 0 iff all
equal. Children share a persistent XLA cache, so only the first compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NUM_DEVICES = 2
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={NUM_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from jaxclr.training import (  # noqa: E402  pylint: disable=g-import-not-at-top
    metrics)


def child_env(cache_dir):
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def logged_steps(workdir):
  return [r["step"] for r in metrics.read_records(workdir)]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["total_loss"] for r in map(json.loads, f)}


def checkpoint_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) \
      if os.path.isdir(root) else []


def load_state(workdir, step):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return jax.device_get(ocp.StandardCheckpointer().restore(path))


def states_equal(a, b) -> tuple[bool, list[str]]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  la, ta = jax.tree.flatten_with_path(a)
  lb, tb = jax.tree.flatten_with_path(b)
  if ta != tb:
    return False, ["tree structure"]
  diffs = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb)
           if not np.array_equal(np.asarray(x), np.asarray(y))]
  return not diffs, diffs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--every", type=int, default=3)
  parser.add_argument("--max_delay", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default=None,
                      help="Where the workdirs go (default: a temp dir).")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = args.root or tempfile.mkdtemp(prefix="jaxclr_chaos_")
  cache = os.path.join(root, "xla_cache")
  ref, chaos = os.path.join(root, "reference"), os.path.join(root, "chaos")
  for d in (ref, chaos):
    shutil.rmtree(d, ignore_errors=True)
  cmd = [sys.executable, "-m", "jaxclr.main", "--config",
         f"configs/synthetic_tiny.py:steps={args.steps},every={args.every}"]
  t0 = time.time()

  def launch(workdir, log):
    return subprocess.Popen(cmd + ["--workdir", workdir], cwd=REPO,
                            env=child_env(cache), stdout=log,
                            stderr=subprocess.STDOUT)

  with open(os.path.join(root, "reference.log"), "w") as log:
    rc = launch(ref, log).wait()
  if rc != 0:
    sys.exit(f"reference run failed with {rc}; see {root}/reference.log")
  t_ref = time.time() - t0
  print(f"reference: {args.steps} steps in {t_ref:.0f}s", flush=True)

  kills, lives = [], 0
  while True:
    lives += 1
    before = max(logged_steps(chaos), default=0)
    resumed_from = max(checkpoint_steps(chaos), default=0)
    # What the child does first anyway; done here so that the wait below
    # sees only records of this life.
    metrics.truncate_jsonl(os.path.join(chaos, "metrics.jsonl"), resumed_from)
    with open(os.path.join(root, f"chaos_{lives}.log"), "w") as log:
      proc = launch(chaos, log)
      if len(kills) >= args.kills:
        rc = proc.wait()
        break
      # Progress: wait until this life committed a checkpoint (the first
      # async save of a process is slow, so killing on a timer alone kills
      # every life before it). Then a random kill point: after 0 to 2*every
      # more steps, plus up to max_delay seconds (lands in a step, a log
      # write or the next save).
      while proc.poll() is None and max(checkpoint_steps(chaos),
                                        default=0) <= resumed_from:
        time.sleep(0.02)
      target = min(max(logged_steps(chaos), default=0) +
                   rng.randint(0, 2 * args.every), args.steps - 1)
      while proc.poll() is None and max(logged_steps(chaos),
                                        default=0) < target:
        time.sleep(0.02)
      if proc.poll() is not None:
        sys.exit(f"life {lives} ended with {proc.returncode} before a kill; "
                 f"raise --steps (see {root}/chaos_{lives}.log)")
      time.sleep(rng.uniform(0.0, args.max_delay))
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    at = max(logged_steps(chaos), default=0)
    kills.append(dict(life=lives, resumed_from=resumed_from,
                      killed_after_step=at,
                      checkpoints_after=checkpoint_steps(chaos)))
    print(f"kill {len(kills)}: resumed from {resumed_from}, killed after "
          f"step {at} (previous life logged up to {before}); checkpoints "
          f"left {checkpoint_steps(chaos)}", flush=True)
  if rc != 0:
    sys.exit(f"final life failed with {rc}; see {root}/chaos_{lives}.log")
  equal, diffs = states_equal(load_state(ref, args.steps),
                              load_state(chaos, args.steps))
  same_losses = losses(ref) == losses(chaos)
  wall = time.time() - t0
  print(json.dumps(dict(
      command=" ".join(sys.argv), kills=len(kills), lives=lives,
      final_state_bitwise_equal=equal, differing_arrays=diffs[:5],
      per_step_losses_equal=same_losses, wall_seconds=round(wall),
      reference_seconds=round(t_ref), devices=NUM_DEVICES, root=root)),
        flush=True)
  sys.exit(0 if equal and same_losses else 1)


if __name__ == "__main__":
  main()
