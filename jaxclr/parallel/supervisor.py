"""A parent for each process of a multi-process job, so that a lost peer
ends in one line and an exit status of its own (errors.EXIT_PEER_LOST).

When a process of the job dies without a word (SIGKILL, a crash, its host
fails), JAX's distributed runtime ends every other process by abort() from a
C++ thread: at once when the lost one is process 0 (it runs the coordination
service, and the others' error polling breaks), after the heartbeat timeout
(JAXCLR_HEARTBEAT_TIMEOUT_S) otherwise. No Python code of the aborted
process runs, and the runtime's own callback for it cannot be used from
Python (jaxlib 0.10's missed_heartbeat_callback fails to pass its status).
So the command of each process of a multi-process job runs twice: this
parent, which starts no JAX runtime, and a child that does the work (the
same command line, with JAXCLR_SUPERVISED=1). The parent passes the child's
output through, forwards SIGTERM (preemption notices) and SIGHUP to it,
exits with its status, and when the runtime aborted it, reads which process
the runtime named from the tail of its stderr and says so:

  jaxclr: error: lost process 1 of 2 (host h1, pid 4242): it stopped
  sending heartbeats to JAX's distributed runtime (killed, crashed, or its
  host failed); process 0 stopped too, without saving. Restart all 2
  processes with the same command: they resume from the newest checkpoint
  in DIR

The child publishes every process's host and pid (the parents' pids: what
the launcher started) through the coordination service when the runtime
starts, into a file the parent names; the parent reads it after the child
died. SIGINT is not forwarded: a terminal's Ctrl-C reaches the whole process
group, the child included. The child dies with its parent (Linux
PR_SET_PDEATHSIG), so killing the parent alone stops the job's process too.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from jaxclr import errors

ENV_SUPERVISED = "JAXCLR_SUPERVISED"
ENV_PEERS_FILE = "JAXCLR_PEERS_FILE"
ENV_PARENT_PID = "JAXCLR_PARENT_PID"
# client.h's message when the runtime aborts a process (jaxlib 0.10).
RUNTIME_ABORT = "JAX distributed service detected fatal errors"
TAIL_LINES = 400
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def is_child() -> bool:
  return os.environ.get(ENV_SUPERVISED) == "1"


def die_with_parent() -> None:
  """In the child: SIGKILL when the parent dies (Linux; elsewhere nothing).
  If the parent is already gone, exit now."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
  except (OSError, AttributeError):
    return
  parent = os.environ.get(ENV_PARENT_PID)
  if parent and os.getppid() != int(parent):
    os._exit(128 + int(signal.SIGKILL))  # pylint: disable=protected-access


def identity() -> dict:
  """This process as the job's other processes should name it: its host and
  the pid the launcher started (the parent's, when supervised)."""
  return {"host": socket.gethostname(),
          "pid": int(os.environ.get(ENV_PARENT_PID) or os.getpid())}


def write_peers(peers: dict[int, dict]) -> None:
  """In the child: {process index: identity} for the parent to read."""
  path = os.environ.get(ENV_PEERS_FILE)
  if not path:
    return
  with open(path + ".tmp", "w") as f:
    json.dump({str(k): v for k, v in peers.items()}, f)
  os.replace(path + ".tmp", path)


def _read_peers(path: str) -> dict[int, dict]:
  try:
    with open(path) as f:
      return {int(k): v for k, v in json.load(f).items()}
  except (OSError, ValueError):
    return {}


def lost_processes(log_tail: str, this_process: int) -> list[int]:
  """The processes that JAX's runtime reported dead in `log_tail`, other
  than this one: '[Task N heartbeat timeout]', 'tasks are unhealthy
  (stopped sending heartbeats):\\nN\\n...', or '/task:N'. When the runtime
  aborted a process other than 0 and names none, its connection to the
  coordinator broke: process 0 is lost."""
  found = set(int(n) for n in re.findall(r"Task (\d+) heartbeat timeout",
                                         log_tail))
  for block in re.findall(r"unhealthy \(stopped sending heartbeats\):\s*"
                          r"((?:\d+[\s,]+)+)", log_tail):
    found.update(int(n) for n in re.findall(r"\d+", block))
  found.update(int(n) for n in re.findall(r"/task:(\d+)", log_tail))
  found.discard(this_process)
  if not found and this_process != 0:
    found.add(0)
  return sorted(found)


def peer_lost_message(lost: list[int], peers: dict[int, dict], *,
                      this_process: int, num_processes: int,
                      workdir: str | None) -> str:
  def name(k):
    who = peers.get(k, {})
    where = (f" (host {who['host']}, pid {who['pid']})" if who else "")
    return f"process {k} of {num_processes}{where}"

  if lost:
    what = "lost " + ", ".join(name(k) for k in lost)
    how = ("it ran the job's coordination service, which is gone (killed, "
           "crashed, or its host failed)" if lost == [0] else
           "it stopped sending heartbeats to JAX's distributed runtime "
           "(killed, crashed, or its host failed)")
  else:
    what, how = "lost another process of the job", "see the other logs"
  where = f" in {workdir}" if workdir else ""
  return (f"{what}: {how}; process {this_process} stopped too, without "
          f"saving. Restart all {num_processes} processes with the same "
          f"command: they resume from the newest checkpoint{where}")


def run(argv: list[str], *, process_id: int | None,
        num_processes: int | None, workdir: str | None) -> int:
  """Runs `argv` (this command) as a supervised child; returns the status
  to exit with."""
  fd, peers_file = tempfile.mkstemp(prefix="jaxclr_peers_", suffix=".json")
  os.close(fd)
  os.remove(peers_file)  # Written by the child once the runtime is up.
  env = {**os.environ, ENV_SUPERVISED: "1", ENV_PEERS_FILE: peers_file,
         ENV_PARENT_PID: str(os.getpid())}
  child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
  previous = {s: signal.signal(s, lambda sig, _: child.send_signal(sig))
              for s in FORWARDED}
  previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
  tail: collections.deque = collections.deque(maxlen=TAIL_LINES)

  def copy():
    out = sys.stderr.buffer
    for line in child.stderr:
      out.write(line)
      out.flush()
      tail.append(line)

  copier = threading.Thread(target=copy, daemon=True)
  copier.start()
  status = child.wait()
  copier.join(timeout=10)
  for s, handler in previous.items():
    signal.signal(s, handler)
  peers = _read_peers(peers_file)
  if os.path.exists(peers_file):
    os.remove(peers_file)
  text = b"".join(tail).decode(errors="replace")
  if status < 0 and RUNTIME_ABORT in text:
    this = process_id if process_id is not None else _index_of_self(peers)
    message = peer_lost_message(
        lost_processes(text, this if this is not None else -1), peers,
        this_process=this if this is not None else -1,
        num_processes=num_processes or len(peers), workdir=workdir)
    print(f"jaxclr: error: {message}", file=sys.stderr, flush=True)
    return errors.EXIT_PEER_LOST
  if status < 0:
    print(f"jaxclr: error: the job's process {child.pid} was ended by "
          f"{signal.Signals(-status).name}", file=sys.stderr, flush=True)
    return 128 - status
  return status


def _index_of_self(peers: dict[int, dict]) -> int | None:
  me = (socket.gethostname(), os.getpid())
  return next((k for k, v in peers.items()
               if (v.get("host"), v.get("pid")) == me), None)
