"""Every error a user can meet, and the exit status the CLI gives it.

The library raises these; `jaxclr.cli` prints them as one line (no
traceback) and exits with `exit_status`. Imports nothing heavy, so the CLI
can report a bad config before JAX or TensorFlow load.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
# SIGTERM / preemption: a checkpoint at the current step was committed; the
# same command resumes. Non-zero so that restart-on-failure policies
# (Kubernetes, SLURM --requeue, shell retry loops) resume the run.
EXIT_PREEMPTED = 4
EXIT_DISTRIBUTED = 5
# Another process of a multi-process job was lost (killed, crashed, its host
# failed): this one stopped without saving. Restarting every process with
# the same command resumes from the newest committed checkpoint. Given by
# jaxclr/parallel/supervisor.py, which outlives a process that JAX's
# distributed runtime aborts.
EXIT_PEER_LOST = 6
# A checkpoint could not be written (disk full, I/O error): the run stopped
# at the step that found it; the checkpoints committed before are intact and
# the same command resumes from the newest once the cause is fixed.
EXIT_SAVE_FAILED = 7


class JaxclrError(Exception):
  """Base of the errors the CLI reports in one line with `exit_status`."""
  exit_status = EXIT_USER_ERROR


class ConfigError(JaxclrError, ValueError):
  """An invalid configuration: names the bad value and what is valid."""


class DataError(JaxclrError, ValueError):
  """A dataset that cannot be used as configured."""


class WorkdirError(JaxclrError, ValueError):
  """A workdir that cannot be used as asked."""


class CheckpointError(WorkdirError):
  """No checkpoint in a workdir can be restored."""


class WorkdirBusy(WorkdirError):
  """Another live job holds the workdir's lock (names its host and pid)."""


class SaveError(JaxclrError, RuntimeError):
  """A checkpoint save failed; the earlier checkpoints are untouched."""
  exit_status = EXIT_SAVE_FAILED


class NonFiniteError(JaxclrError, RuntimeError):
  """The loss or gradient became NaN/Inf; nothing poisoned was saved."""
  exit_status = EXIT_DIVERGED


class DistributedError(JaxclrError, RuntimeError):
  """The processes of a job could not form the distributed runtime."""
  exit_status = EXIT_DISTRIBUTED


class PeerLost(JaxclrError, RuntimeError):
  """Another process of the job was lost; this one stopped without saving."""
  exit_status = EXIT_PEER_LOST


class Preempted(JaxclrError):
  """SIGTERM or a preemption notice stopped the run after a checkpoint was
  committed at the current step; the same command resumes it."""
  exit_status = EXIT_PREEMPTED

  def __init__(self, step: int, path: str):
    super().__init__(f"preempted: saved a checkpoint at step {step} ({path}); "
                     "re-run the same command to resume")
    self.step, self.path = step, path
