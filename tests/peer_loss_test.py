"""A process of a 2-process job SIGKILLed mid-step: the survivor exits
within 60 s with status 6 (errors.EXIT_PEER_LOST) and one line naming the
lost process (its index, host and pid), and restarting both processes
resumes exactly where an uninterrupted pair ends.

Process 1 lost: the survivor's collective fails at once, and JAX's runtime
aborts it when process 1's heartbeats time out. Process 0 lost: the
coordination service goes with it, and the runtime aborts the survivor at
once; process 0's workdir lock is left behind and the restart takes it over.
In both cases jaxclr/parallel/supervisor.py, the survivor's parent, reports.

Real `python -m jaxclr.main` processes under jax.distributed (gloo) on
127.0.0.1, with multihost_test.py's helpers; the uninterrupted pair runs
first, so the others find its programs in the compilation cache.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time

import numpy as np
import pytest

from jaxclr import errors
from multihost_test import (DEAD_PEER_BOUND_S, RUN_TIMEOUT_S, child_env,
                            free_port, jaxclr_cmd, kill_group,
                            load_final_state, load_metrics, read_log, start)

STEPS, EVERY = 12, 3
KILL_AFTER_LOGGED = 5

pytestmark = pytest.mark.slow


def start_pair(workdir: str, tag: str):
  port = free_port()
  return [start(jaxclr_cmd(f"--config.num_train_steps={STEPS}",
                           f"--config.checkpoint_every_steps={EVERY}",
                           f"--workdir={workdir}",
                           f"--coordinator_address=127.0.0.1:{port}",
                           "--num_processes=2", f"--process_id={i}"),
                child_env(4), f"{workdir}.{tag}.{i}.log")
          for i in range(2)]


def finish(procs, workdir, tag):
  try:
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      kill_group(p)
  assert codes == [0, 0], (codes, read_log(f"{workdir}.{tag}.0.log"))


@pytest.fixture(scope="module")
def straight():
  workdir = os.path.join(tempfile.mkdtemp(prefix="jaxclr_peer_"), "straight")
  finish(start_pair(workdir, "run"), workdir, "run")
  return workdir


def logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return load_metrics(workdir) if os.path.exists(path) else []


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_process_mid_step(straight, tmp_path, victim):
  workdir = str(tmp_path / "w")
  survivor = 1 - victim
  procs = start_pair(workdir, "killed")
  try:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(logged(workdir)) < KILL_AFTER_LOGGED:
      assert all(p.poll() is None for p in procs), read_log(
          f"{workdir}.killed.0.log")
      assert time.monotonic() < deadline, "the pair did not start training"
      time.sleep(0.02)
    killed_at = time.monotonic()
    os.killpg(procs[victim].pid, signal.SIGKILL)  # The parent and its child.
    try:
      status = procs[survivor].wait(timeout=DEAD_PEER_BOUND_S + 60)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process {survivor} still running "
                           f"{DEAD_PEER_BOUND_S + 60} s after its peer was "
                           "killed") from None
    took = time.monotonic() - killed_at
  finally:
    for p in procs:
      kill_group(p)
  text = read_log(f"{workdir}.killed.{survivor}.log", 10**7)
  print(f"process {survivor} exited {status} {took:.1f} s after process "
        f"{victim} was killed at step {len(logged(workdir))}")
  assert status == errors.EXIT_PEER_LOST, text[-3000:]
  assert took <= DEAD_PEER_BOUND_S, text[-3000:]
  lines = [l for l in text.splitlines() if l.startswith("jaxclr")]
  assert len(lines) == 1, lines
  assert lines[0].startswith(
      f"jaxclr: error: lost process {victim} of 2 (host "
      f"{socket.gethostname()}, pid {procs[victim].pid}): "), lines[0]
  assert (f"process {survivor} stopped too, without saving. Restart all 2 "
          f"processes with the same command: they resume from the newest "
          f"checkpoint in {workdir}") in lines[0]
  assert "Traceback" not in text, text[-3000:]  # The line, not a trace.
  assert len(logged(workdir)) < STEPS  # Killed mid-run, not at the end.

  procs = start_pair(workdir, "restarted")
  finish(procs, workdir, "restarted")
  restarted = read_log(f"{workdir}.restarted.0.log", 10**7)
  resumed = re.search(r"Resumed from \S+/checkpoints/(\d+)", restarted)
  assert resumed and int(resumed.group(1)) >= EVERY, restarted[-3000:]
  if victim == 0:  # Its lock stayed behind; its pid is gone.
    assert "Took over the workdir lock" in restarted, restarted[-3000:]
  want, got = load_final_state(straight), load_final_state(workdir)
  assert int(got["['step']"]) == STEPS
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  losses = lambda w: {r["step"]: r["loss"] for r in load_metrics(w)}
  assert losses(workdir) == losses(straight)
