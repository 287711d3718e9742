"""Chaos test: SIGKILL a pretraining run, many times, some kills aimed inside
checkpoint writes and deletions; resume each time; compare with a run left
alone.

  python benchmarks/chaos.py --kills 100 [--steps 800 --every 2 --seed 0]

Runs `python -m jaxclr.main --config configs/synthetic_tiny.py:steps=S,every=E`
once uninterrupted, then again in a second workdir where each life of the
process is SIGKILLed once it has committed a new checkpoint, and restarted
with the same command, `--kills` times, before it may finish. Each kill is
of a kind, in the repeating order of --kinds:

  random  after 0 to 2*every more steps plus uniform [0, max_delay) s: in a
          step, a metrics write or an async save, wherever it falls.
  write   when Orbax creates the next save's temporary directory
          (`<step>.orbax-checkpoint-tmp...`), plus uniform [0, write_delay)
          s: between that directory and its rename.
  commit  the moment the temporary directory is renamed to `<step>`: after
          the commit, before Orbax deletes the checkpoints beyond
          max_to_keep.
  delete  at the first file Orbax deletes from an old checkpoint.

Aimed kills are timed by inotify events on the checkpoint directory (Linux).
After each kill, where it landed is read from the disk: a temporary
directory left (inside a write), more committed checkpoints than
max_to_keep (between commit and deletion), an old checkpoint directory
still there with files gone (inside a deletion). Checks that the final
checkpoints are bitwise equal (params, optimizer state, BatchNorm
statistics, step, non-finite record) and that every step's loss in
metrics.jsonl matches (same data order). Prints one JSON summary; exit 0 iff
all equal. Children share a persistent XLA cache, so only the first
compiles.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import random
import select
import shutil
import signal
import struct
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

TMP = ".orbax-checkpoint-tmp"
MAX_TO_KEEP = 3  # configs/synthetic_tiny.py's max_checkpoints_to_keep.
KINDS = ("random", "write", "commit", "delete")
DEFAULT_KINDS = "write,delete,random,write,delete,random,commit,write,delete,random"

# <sys/inotify.h>
IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x80, 0x100, 0x200
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name.


class Inotify:
  """The Linux inotify calls this benchmark needs (Python's standard library
  has no binding), through ctypes."""

  def __init__(self):
    self.libc = ctypes.CDLL(None, use_errno=True)
    self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if self.fd < 0:
      raise OSError(ctypes.get_errno(), "inotify_init1")
    self.paths = {}

  def watch(self, path: str, mask: int) -> None:
    wd = self.libc.inotify_add_watch(self.fd, path.encode(), mask)
    if wd >= 0:  # A directory already gone is simply not watched.
      self.paths[wd] = path

  def events(self, timeout: float) -> list[tuple[str, int, str]]:
    """(watched directory, mask, name) of the events within `timeout`."""
    if not select.select([self.fd], [], [], timeout)[0]:
      return []
    try:
      data = os.read(self.fd, 1 << 16)
    except BlockingIOError:
      return []
    out, i = [], 0
    while i < len(data):
      wd, mask, _, size = EVENT.unpack_from(data, i)
      name = data[i + EVENT.size:i + EVENT.size + size].rstrip(b"\0").decode()
      out.append((self.paths.get(wd, "?"), mask, name))
      i += EVENT.size + size
    return out

  def close(self):
    os.close(self.fd)


def child_env(cache_dir):
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def logged_steps(workdir):
  return [r["step"] for r in metrics.read_records(workdir)]


def losses(workdir):
  return {r["step"]: r["total_loss"] for r in metrics.read_records(workdir)
          if "total_loss" in r}


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


def wait_for_event(proc, ino: Inotify, matches) -> tuple[str, str] | None:
  """Blocks until an event satisfies matches(directory, mask, name), or the
  process exits (None)."""
  while proc.poll() is None:
    for directory, mask, name in ino.events(0.05):
      if matches(directory, mask, name):
        return directory, name
  return None


def aimed_kill(kind, proc, ckpt_dir, rng, args):
  """Kills `proc` at the moment of `kind`; returns what it aimed at, for
  `landed`, or None if the process ended first."""
  ino = Inotify()
  try:
    ino.watch(ckpt_dir, IN_CREATE | IN_MOVED_TO)
    if kind == "delete":
      for step in checkpoint_steps(os.path.dirname(ckpt_dir)):
        for d, _, _ in os.walk(os.path.join(ckpt_dir, str(step))):
          ino.watch(d, IN_DELETE)
    if kind == "write":
      hit = wait_for_event(proc, ino, lambda d, m, n: (
          d == ckpt_dir and m & IN_CREATE and TMP in n))
    elif kind == "commit":
      hit = wait_for_event(proc, ino, lambda d, m, n: (
          d == ckpt_dir and m & IN_MOVED_TO and n.isdigit()))
    else:
      hit = wait_for_event(proc, ino, lambda d, m, n: (
          d != ckpt_dir and m & IN_DELETE))
    if hit is None:
      return None
    if kind == "write":
      time.sleep(rng.uniform(0.0, args.write_delay))
    proc.send_signal(signal.SIGKILL)
    directory = hit[0]
    step_dir = os.path.relpath(directory, ckpt_dir).split(os.sep)[0]
    return os.path.join(ckpt_dir, step_dir) if kind == "delete" else hit[1]
  finally:
    ino.close()


def landed(kind, target, ckpt_dir) -> str:
  """Where a kill fell, from what it left on disk."""
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  tmp_left = any(TMP in n for n in names)
  committed = [n for n in names if n.isdigit()]
  if kind == "write":
    return "inside the write" if tmp_left else "after the commit"
  if kind == "commit":
    return ("between commit and deletion" if len(committed) > MAX_TO_KEEP
            else "after the deletion")
  if kind == "delete":
    return ("inside the deletion" if os.path.isdir(target)
            else "after the deletion")
  return "inside a write" if tmp_left else "elsewhere"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--every", type=int, default=3)
  parser.add_argument("--max_delay", type=float, default=0.5)
  parser.add_argument("--write_delay", type=float, default=0.3)
  parser.add_argument("--kinds", default=DEFAULT_KINDS,
                      help=f"Repeating order of kill kinds, from {KINDS}.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default=None,
                      help="Where the workdirs go (default: a temp dir).")
  args = parser.parse_args()
  kinds = args.kinds.split(",")
  if not set(kinds) <= set(KINDS):
    parser.error(f"--kinds={args.kinds}; valid kinds: {KINDS}")
  rng = random.Random(args.seed)
  root = args.root or tempfile.mkdtemp(prefix="jaxclr_chaos_")
  os.makedirs(root, exist_ok=True)
  cache = os.path.join(root, "xla_cache")
  ref, chaos = os.path.join(root, "reference"), os.path.join(root, "chaos")
  ckpt_dir = os.path.join(chaos, "checkpoints")
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
    resumed_from = max(checkpoint_steps(chaos), default=0)
    # What the child does first anyway; done here so that the waits below
    # see only records of this life.
    metrics.truncate_jsonl(os.path.join(chaos, "metrics.jsonl"), resumed_from)
    with open(os.path.join(root, f"chaos_{lives}.log"), "w") as log:
      proc = launch(chaos, log)
      if len(kills) >= args.kills:
        rc = proc.wait()
        break
      kind = kinds[len(kills) % len(kinds)]
      # Progress first: a life is killed only once it committed a new
      # checkpoint (a life killed in its first save would redo it forever).
      while proc.poll() is None and max(checkpoint_steps(chaos),
                                        default=0) <= resumed_from:
        time.sleep(0.02)
      target = None
      if kind == "random":
        at = min(max(logged_steps(chaos), default=0) +
                 rng.randint(0, 2 * args.every), args.steps - 1)
        while proc.poll() is None and max(logged_steps(chaos),
                                          default=0) < at:
          time.sleep(0.02)
        if proc.poll() is None:
          time.sleep(rng.uniform(0.0, args.max_delay))
          proc.send_signal(signal.SIGKILL)
      elif proc.poll() is None:
        target = aimed_kill(kind, proc, ckpt_dir, rng, args)
      if proc.wait() != -signal.SIGKILL:
        sys.exit(f"life {lives} ended with {proc.returncode} before a kill; "
                 f"raise --steps (see {root}/chaos_{lives}.log)")
    kills.append(dict(
        life=lives, kind=kind, landed=landed(kind, target, ckpt_dir),
        resumed_from=resumed_from,
        killed_after_step=max(logged_steps(chaos), default=0),
        checkpoints_after=checkpoint_steps(chaos)))
    print(json.dumps({"kill": len(kills), **kills[-1]}), flush=True)
  if rc != 0:
    sys.exit(f"final life failed with {rc}; see {root}/chaos_{lives}.log")
  equal, diffs = states_equal(load_state(ref, args.steps),
                              load_state(chaos, args.steps))
  same_losses = losses(ref) == losses(chaos)
  wall = time.time() - t0
  outcomes = collections.Counter(f"{k['kind']}: {k['landed']}" for k in kills)
  print(json.dumps(dict(
      command=" ".join(sys.argv), kills=len(kills), lives=lives,
      kills_by_kind=dict(collections.Counter(k["kind"] for k in kills)),
      landed=dict(sorted(outcomes.items())),
      final_state_bitwise_equal=equal, differing_arrays=diffs[:5],
      per_step_losses_equal=same_losses,
      logged_steps=len(losses(chaos)), wall_seconds=round(wall),
      reference_seconds=round(t_ref), devices=NUM_DEVICES, root=root)),
        flush=True)
  sys.exit(0 if equal and same_losses else 1)


if __name__ == "__main__":
  main()
