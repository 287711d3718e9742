"""What every jaxclr command does before and around its job.

User errors (bad config, missing data, unusable workdir, a diverged run) are
printed as one line naming the problem, with exit status 2, and no traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging as logging_lib
import re
import sys
from typing import Sequence

from absl import app, flags, logging

from jaxclr import errors

FLAGS = flags.FLAGS
EXIT_USER_ERROR = errors.EXIT_USER_ERROR
EXIT_DIVERGED = errors.EXIT_DIVERGED
EXIT_PREEMPTED = errors.EXIT_PREEMPTED


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _fail(message: str):
  print(f"jaxclr: error: {_one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str], validate=None) -> list[str]:
  """absl flags parser for app.run(main, flags_parser=parse_flags).

  Bad flags, unknown --config.* fields (ml_collections raises KeyError /
  AttributeError with lock_config=True), badly typed overrides and config
  files that fail to load become one line on stderr and exit status 2,
  instead of a traceback. `validate(config)` (raising ConfigError), when
  given, runs on --config as soon as it is parsed.
  """
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # A config file raised.
      head = text.split("Traceback (most recent call last)")[0]
      text = head + text.strip().splitlines()[-1]
    _fail(text)
  except (KeyError, AttributeError) as e:
    raw = e.args[0] if e.args else str(e)
    raw = raw.args[0] if isinstance(raw, BaseException) and raw.args else raw
    match = re.search(r"'([^'\\]+)'", str(raw))
    name = match.group(1) if match else str(raw)
    hint = re.search(r"Did you mean .*", str(raw))
    arg = next((a for a in argv[1:] if re.search(
        rf"[.]{re.escape(name)}(=|$)", a)), name)
    _fail(f"unknown config field {name!r} in {arg}"
          + (f"; {hint.group(0)}" if hint else "")
          + "; valid fields are those the --config file defines")
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"bad command line: {type(e).__name__}: {e}")
  if "config" in FLAGS:
    try:
      if FLAGS.config is not None:  # A file that failed to load raises here.
        FLAGS.config.get("seed")
    except Exception as e:  # pylint: disable=broad-except
      cause = e.__cause__ or e
      _fail(f"cannot load --config={FLAGS['config'].config_filename}: "
            f"{_one_line(cause)}")
    if validate is not None and FLAGS.config is not None:
      from jaxclr import (  # pylint: disable=g-import-not-at-top
          config as config_lib)
      try:
        validate(FLAGS.config)
      except config_lib.ConfigError as e:
        _fail(str(e))
  return rest


def job_flags_parser(job: str):
  """parse_flags that also validates --config as a `job` config before JAX
  or TensorFlow load (a bad value, or another job's config, is reported in
  about a second, not after the imports)."""
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  return lambda argv: parse_flags(
      argv, validate=lambda c: config_lib.validate(c, job=job))


def define_distributed_flags():
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0 for jax.distributed; not needed on Cloud TPU, "
      "SLURM or Open MPI, where it is detected.")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Initialise jax.distributed: 'auto' when the environment "
                    "or the flags above describe several processes.")


class _QuietLibraries(logging_lib.Filter):
  """Keeps Orbax's and TensorStore's per-save INFO lines off the console,
  and their tracebacks of a failed save (jaxclr reports that failure in one
  line, errors.SaveError): their warnings and errors stay, as one line."""

  def filter(self, record):
    if _is_orphaned_failed_write(record):
      return False
    if not any(f"/{lib}/" in record.pathname for lib in _CHATTY):
      return True
    if record.levelno < logging_lib.WARNING:
      return False
    record.exc_info, record.exc_text = None, None
    return True


_CHATTY = ("orbax", "tensorstore", "clu")


def _is_orphaned_failed_write(record) -> bool:
  """asyncio's report of a TensorStore write that failed after Orbax had
  given up on that save ('... exception was never retrieved', with a
  traceback): the failure is already reported, in one line (SaveError)."""
  if record.name != "asyncio" or not record.exc_info:
    return False
  error = record.exc_info[1]
  return ("exception was never retrieved" in record.getMessage() and
          isinstance(error, ValueError) and "Error writing" in str(error))


class _QuietClosedLoopCallbacks:
  """sys.unraisablehook that drops one known, harmless report and passes on
  every other: after a checkpoint write fails, Orbax closes that save's
  asyncio event loop while TensorStore's other writes are still completing,
  and each completion's callback (loop.call_soon_threadsafe) raises
  'Event loop is closed', which TensorStore reports as unraisable: dozens of
  tracebacks after the one line that reports the failed save
  (errors.SaveError)."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    frames = []
    while tb is not None:
      frames.append(tb.tb_frame.f_code.co_name)
      tb = tb.tb_next
    if not (isinstance(error, RuntimeError) and
            str(error) == "Event loop is closed" and
            "call_soon_threadsafe" in frames):
      self.previous(unraisable)


def initialize_runtime():
  """Quiets library logs and starts jax.distributed when asked or detected.

  Call before anything uses jax devices.
  """
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _QuietClosedLoopCallbacks(sys.unraisablehook)
  from jaxclr.parallel import distributed  # pylint: disable=g-import-not-at-top
  return distributed.initialize(**_distributed_flags())


def _distributed_flags() -> dict:
  return dict(mode=FLAGS.distributed,
              coordinator_address=FLAGS.coordinator_address,
              num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _supervise_if_multiprocess() -> None:
  """In a multi-process job, this process becomes the parent of one that
  runs the job (jaxclr/parallel/supervisor.py) and exits with its status."""
  from jaxclr.parallel import (  # pylint: disable=g-import-not-at-top
      distributed, supervisor)
  if supervisor.is_child():
    supervisor.die_with_parent()
    return
  with user_errors_exit():
    plan = distributed.plan_from_flags(**_distributed_flags())
  if plan is None:
    return
  sys.exit(supervisor.run([sys.executable, *sys.orig_argv[1:]],
                          process_id=plan.process_id,
                          num_processes=plan.num_processes,
                          workdir=FLAGS["workdir"].value
                          if "workdir" in FLAGS else None))


def _await_runtime_verdict(plan, error: Exception) -> None:
  """A device collective failed in a supervised multi-process job: most
  likely a peer died (gloo reports a reset connection at once). JAX's runtime
  aborts this process once its heartbeats show which peer (within the
  heartbeat timeout), and the supervisor names it in one line; wait for that
  rather than print a traceback. Returns if the runtime stays silent."""
  import time  # pylint: disable=g-import-not-at-top
  wait_s = plan.heartbeat_timeout_seconds + 15
  first = str(error).strip().splitlines()[0][:300] if str(error) else ""
  logging.error("A collective failed (%s: %s): another process may be lost; "
                "waiting up to %d s for JAX's runtime to say which.",
                type(error).__name__, first, wait_s)
  logging.flush()
  time.sleep(wait_s)


@contextlib.contextmanager
def user_errors_exit():
  """Turns user errors into one line on stderr and an exit status.

  Every jaxclr.errors.JaxclrError carries its status (2 user error, 3
  diverged, 4 preempted, 5 distributed runtime). A failure of jaxclr's CPU
  custom calls is a user error too: its line names the switch that turns
  that path off (jaxclr/cpu: describe_failure), its traceback goes to the
  INFO log. Anything else is a bug and keeps its traceback.
  """
  try:
    yield
  except errors.JaxclrError as e:
    logging.flush()
    status = e.exit_status
    prefix = "jaxclr: " if status == EXIT_PREEMPTED else "jaxclr: error: "
    print(prefix + _one_line(e), file=sys.stderr, flush=True)
    sys.exit(status)
  except Exception as e:  # pylint: disable=broad-except
    from jaxclr import cpu  # pylint: disable=g-import-not-at-top
    line = cpu.describe_failure(e)
    if line is None:
      raise
    logging.info("jaxclr/cpu custom call failure", exc_info=True)
    logging.flush()
    print("jaxclr: error: " + line, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def define_job_flags(config_help: str, workdir_help: str):
  """--config (an ml_collections file, with --config.x=... overrides),
  --workdir (required) and the distributed-runtime flags."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, config_help,
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])
  define_distributed_flags()


def run_job(module: str, *, flags_parser=parse_flags,
            summary_keys: Sequence[str] = ()):
  """app.run of `module`.run(config, workdir), with the runtime started and
  user errors turned into one line and exit status 2.

  The job's module is imported only after the runtime is up (jax.distributed
  must start before anything touches devices). summary_keys: entries of the
  returned results dict to log at the end.
  """
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  # Before flag parsing: validating a config may already start jax.
  cpu_settings = cpu.prepare(restart=True)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _supervise_if_multiprocess()
    cpu.log_settings(cpu_settings)
    with user_errors_exit():
      plan = initialize_runtime()
      try:
        results = importlib.import_module(module).run(FLAGS.config,
                                                      FLAGS.workdir)
      except errors.JaxclrError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        import jax  # pylint: disable=g-import-not-at-top
        if plan is not None and isinstance(e, jax.errors.JaxRuntimeError):
          _await_runtime_verdict(plan, e)
        raise
    if summary_keys:
      logging.info("results: %s", {k: results.get(k) for k in summary_keys})

  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=flags_parser)
