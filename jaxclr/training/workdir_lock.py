"""One job per workdir: a lock file that names the process holding it.

DIR/jaxclr.lock holds JSON: host, pid, the host's boot id, the process's
start time (from /proc), when it was taken and the command line. It is
created complete in one step (written to a private file, then hard-linked to
the lock's name, which fails if the name exists: atomic on local filesystems
and on NFS, unlike O_EXCL on old NFS clients), held until the process exits
(atexit; also after an error) and removed only by the process that holds it.

A second job meeting a lock refuses in one line naming the holder, unless
the holder is certainly gone, which is knowable on the holder's own host
only: a different boot id (the host rebooted), no such pid, or that pid now
belongs to a process that started later (the pid was reused). Such a lock
is taken over with a warning saying why. A lock from another host is never
taken over: this host cannot tell whether that process lives (the message
says which file to delete once it is known to be gone).

Multi-process jobs: only process 0 takes the lock (workdir.prepare shares
its outcome with the others), so on a shared filesystem the lock stops a
second job whose process 0 meets it, and a job whose process 0 is
rescheduled onto another host after a crash must have the stale lock
deleted by hand (docs/reliability.md).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
import sys
import time

from absl import logging

from jaxclr import errors

LOCK_FILE = "jaxclr.lock"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


@dataclasses.dataclass(frozen=True)
class Holder:
  """The process a lock names."""
  host: str
  pid: int
  boot_id: str  # '' where the OS has none (not Linux).
  process_start: str  # Field 22 of /proc/<pid>/stat: clock ticks since boot.
  taken: str  # When it took the lock (local time, for people).
  command: str

  def describe(self) -> str:
    return (f"host {self.host}, pid {self.pid}, running since {self.taken}: "
            f"{self.command}")


def _read_text(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def boot_id() -> str:
  return _read_text(BOOT_ID_FILE)


def _proc_stat(pid: int) -> list[str]:
  """Fields of /proc/<pid>/stat after the command name ([] if none)."""
  text = _read_text(f"/proc/{pid}/stat")
  return text[text.rfind(")") + 2:].split() if ")" in text else []


def process_start(pid: int) -> str:
  fields = _proc_stat(pid)
  return fields[19] if len(fields) > 19 else ""  # Field 22 of the line.


def this_process() -> Holder:
  pid = os.getpid()
  return Holder(host=socket.gethostname(), pid=pid, boot_id=boot_id(),
                process_start=process_start(pid),
                taken=time.strftime("%Y-%m-%d %H:%M:%S"),
                command=" ".join(sys.argv)[:300])


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, another user's.
    return True
  fields = _proc_stat(pid)
  return not (fields and fields[0] == "Z")  # A zombie has exited.


def gone_reason(holder: Holder) -> str | None:
  """Why `holder` has certainly exited, or None when it may be running
  (including whenever it ran on another host)."""
  if holder.host != socket.gethostname():
    return None
  now_boot = boot_id()
  if holder.boot_id and now_boot and holder.boot_id != now_boot:
    return "its host has rebooted since"
  if not _pid_alive(holder.pid):
    return f"no process {holder.pid} is running"
  started = process_start(holder.pid)
  if holder.process_start and started and started != holder.process_start:
    return f"pid {holder.pid} now belongs to a later process"
  return None


def _is_this_process(holder: Holder) -> bool:
  me = this_process()
  return (holder.host, holder.pid, holder.boot_id, holder.process_start) == (
      me.host, me.pid, me.boot_id, me.process_start)


def read(path: str) -> Holder | None:
  """The lock's holder; None if the file is missing or not a lock."""
  try:
    with open(path) as f:
      return Holder(**json.load(f))
  except FileNotFoundError:
    return None
  except (OSError, ValueError, TypeError):
    return None


@dataclasses.dataclass(frozen=True)
class WorkdirLock:
  path: str
  holder: Holder

  def release(self) -> None:
    """Removes the lock if it is still this one's."""
    if read(self.path) == self.holder:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass


def _create(path: str, holder: Holder) -> bool:
  """Writes the lock complete, then links it into place; False if taken."""
  private = f"{path}.{holder.host}.{holder.pid}.tmp"
  with open(private, "w") as f:
    json.dump(dataclasses.asdict(holder), f)
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(private, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(private)


def _take_over(path: str, holder: Holder) -> bool:
  """Moves a stale lock aside if it is still `holder`'s; False if another
  process changed the lock meanwhile (that one is put back)."""
  aside = f"{path}.stale.{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  if read(aside) != holder:  # Replaced between our read and our rename.
    try:
      os.link(aside, path)
    except FileExistsError:
      pass
    os.remove(aside)
    return False
  os.remove(aside)
  return True


def acquire(workdir: str, attempts: int = 5) -> WorkdirLock:
  """Takes DIR/jaxclr.lock for this process (released at exit).

  Raises:
    errors.WorkdirBusy: a live job holds it (the message names it).
    errors.WorkdirError: the lock cannot be written.
  """
  path = os.path.join(workdir, LOCK_FILE)
  me = this_process()
  for _ in range(attempts):
    try:
      if _create(path, me):
        lock = WorkdirLock(path, me)
        atexit.register(lock.release)
        return lock
    except OSError as e:
      raise errors.WorkdirError(f"Workdir {workdir!r} is not writable: "
                                f"{e.strerror} ({path})") from None
    holder = read(path)
    if holder is None:  # Vanished, or not a lock: look again.
      if os.path.exists(path):
        raise errors.WorkdirBusy(
            f"Workdir {workdir!r} has a lock file {path} that is not a "
            "jaxclr lock; delete it if no job uses this workdir")
      continue
    if _is_this_process(holder):  # This process prepared it before.
      return WorkdirLock(path, holder)
    reason = gone_reason(holder)
    if reason is None:
      raise errors.WorkdirBusy(
          f"Workdir {workdir!r} is in use by another jaxclr job ("
          f"{holder.describe()}); wait for it to end or stop it, or use "
          f"another --workdir (if that job is gone, delete {path})")
    if _take_over(path, holder):
      logging.warning("Took over the workdir lock %s left by a job that "
                      "ended without releasing it (%s): %s.", path,
                      holder.describe(), reason)
  raise errors.WorkdirBusy(f"Workdir {workdir!r}: could not take {path} in "
                           f"{attempts} attempts (another job is starting on "
                           "it?)")
