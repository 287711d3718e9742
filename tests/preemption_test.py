"""Preemption across processes: a notice to ONE process of a 2-process job
stops both at the same step, each saves it and exits 4, and re-running both
resumes exactly.

Real `python -m jaxclr.main` subprocesses under jax.distributed (gloo) on
127.0.0.1, as in multihost_test.py (its helpers are reused). The
uninterrupted reference runs first, so the preempted and resumed runs find
its compiled program in the session's persistent compilation cache.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time

import numpy as np
import pytest

from multihost_test import (RUN_TIMEOUT_S, child_env, free_port, jaxclr_cmd,
                            kill_group, load_final_state, load_metrics,
                            read_log, start)

STEPS = 12


def start_two_processes(workdir: str, port: int):
  """The tiny run as 2 processes x 4 devices, started directly (not through
  local.sh) so that each process's pid is known."""
  return [start(jaxclr_cmd(f"--config.num_train_steps={STEPS}",
                           f"--workdir={workdir}",
                           f"--coordinator_address=127.0.0.1:{port}",
                           "--num_processes=2", f"--process_id={i}"),
                child_env(4), f"{workdir}.{i}.log")
          for i in range(2)]


def wait_ok(procs, workdir):
  codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
  assert codes == [0, 0], (codes, read_log(f"{workdir}.0.log"))


@pytest.mark.slow
def test_preemption_notice_to_one_process_stops_both_at_one_step():
  root = tempfile.mkdtemp(prefix="jaxclr_preempt_")
  preempted, straight = (os.path.join(root, k) for k in ("preempted",
                                                          "straight"))
  procs = []
  try:
    procs = start_two_processes(straight, free_port())
    wait_ok(procs, straight)
    procs = start_two_processes(preempted, free_port())
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
      logged = (load_metrics(preempted)
                if os.path.exists(os.path.join(preempted, "metrics.jsonl"))
                else [])
      if len(logged) >= 2:
        break
      assert all(p.poll() is None for p in procs), read_log(
          f"{preempted}.0.log")
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # Process 0 gets no signal.
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
    logs = [read_log(f"{preempted}.{i}.log") for i in range(2)]
    assert codes == [4, 4], (codes, logs)
    saved = [int(re.search(r"preempted: saved a checkpoint at step (\d+)",
                           log).group(1)) for log in logs]
    assert saved[0] == saved[1] < STEPS, (saved, logs)
    steps = sorted(int(d) for d in os.listdir(
        os.path.join(preempted, "checkpoints")) if d.isdigit())
    assert steps == [saved[0]], steps  # Only the preemption save.

    procs = start_two_processes(preempted, free_port())
    wait_ok(procs, preempted)
    want, got = load_final_state(straight), load_final_state(preempted)
    assert int(got["['step']"]) == STEPS
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    losses = lambda w: {r["step"]: r["loss"] for r in load_metrics(w)}
    assert losses(preempted) == losses(straight)
  finally:
    for p in procs:
      kill_group(p)
