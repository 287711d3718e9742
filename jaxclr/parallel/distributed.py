"""Starting JAX's multi-controller runtime: one process per host.

Every process of a job runs the same command. Where the job's shape comes
from, first match wins for each of the three values:

  1. flags: --coordinator_address, --num_processes, --process_id;
  2. environment: JAXCLR_COORDINATOR_ADDRESS, JAXCLR_NUM_PROCESSES,
     JAXCLR_PROCESS_ID (for clusters JAX does not know);
  3. JAX's own detection inside jax.distributed.initialize(): SLURM (srun),
     Open MPI (mpirun), Cloud TPU VMs (GCE metadata) and TPUs on GKE.

--distributed=auto starts the runtime when (1) or (2) describe more than one
process or (3) finds a multi-process launcher or a Cloud TPU VM; 'on' always
starts it (failing loudly if nothing describes the job); 'off' never does.

Failure is bounded in time: a process that cannot reach the coordinator gives
up after JAXCLR_INIT_TIMEOUT_S (default 60 s), and once running, a peer that
stops sending heartbeats for JAXCLR_HEARTBEAT_TIMEOUT_S (default 30 s) makes
the coordination service stop every other process with an error that says a
task died. On the CPU backend, cross-process collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import jax
from absl import logging

from jaxclr import errors
from jaxclr.errors import ConfigError
from jaxclr.parallel import supervisor

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "JAXCLR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXCLR_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXCLR_PROCESS_ID"
ENV_INIT_TIMEOUT = "JAXCLR_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "JAXCLR_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN_TIMEOUT = "JAXCLR_SHUTDOWN_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 60
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_SHUTDOWN_TIMEOUT_S = 30
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


DistributedError = errors.DistributedError


@dataclasses.dataclass(frozen=True)
class Plan:
  """What initialize() passes to jax.distributed.initialize (None: detect)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  initialization_timeout: int
  heartbeat_timeout_seconds: int
  shutdown_timeout_seconds: int
  coordinator_bind_address: str | None
  reason: str  # Why the runtime is started, for the log.


def _int_env(environ: Mapping[str, str], name: str, default=None):
  raw = environ.get(name)
  if raw is None or raw == "":
    return default
  try:
    return int(raw)
  except ValueError:
    raise ConfigError(f"{name}={raw!r} must be an integer") from None


def detected_launcher(environ: Mapping[str, str],
                      cloud_tpu_vm: bool = False) -> str | None:
  """Names the multi-process launcher JAX will detect, or None.

  SLURM and Open MPI count only when they started more than one task (a
  one-task `srun python ...` needs no runtime); a Cloud TPU VM always counts,
  since only its metadata says how many workers the slice has.
  """
  if (environ.get("SLURM_JOB_ID") and environ.get("SLURM_PROCID") and
      _int_env(environ, "SLURM_NTASKS", 1) > 1):
    return f"SLURM ({environ['SLURM_NTASKS']} tasks)"
  if (environ.get("OMPI_MCA_orte_hnp_uri") and
      _int_env(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1):
    return f"Open MPI ({environ['OMPI_COMM_WORLD_SIZE']} ranks)"
  if environ.get("TPU_WORKER_HOSTNAMES") or environ.get(
      "TPU_PROCESS_ADDRESSES"):
    return "Cloud TPU (worker list in the environment)"
  if cloud_tpu_vm:
    return "Cloud TPU VM"
  return None


def plan(*, mode: str = "auto", coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         environ: Mapping[str, str] | None = None,
         cloud_tpu_vm: bool = False) -> Plan | None:
  """Decides whether and how to start jax.distributed; None means don't.

  Raises:
    ConfigError: a bad mode, an incomplete or inconsistent explicit layout,
      or 'on' with nothing that describes the job.
  """
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise ConfigError(f"--distributed={mode!r}; valid: {', '.join(MODES)}")
  if coordinator_address is None:
    coordinator_address = environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_env(environ, ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_env(environ, ENV_PROCESS_ID)
  if mode == "off":
    return None

  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  launcher = detected_launcher(environ, cloud_tpu_vm)
  explicit = any(v is not None for v in given.values())
  if explicit and num_processes == 1 and coordinator_address is None:
    explicit = False  # "--num_processes=1" alone: a single-process run.
  if not explicit and launcher is None:
    if mode == "on":
      raise ConfigError(
          "--distributed=on but nothing describes the job: pass "
          "--coordinator_address, --num_processes and --process_id (or set "
          f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or run "
          "under SLURM, Open MPI or on a Cloud TPU VM")
    return None
  if explicit and launcher is None:
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
      raise ConfigError(
          f"multi-process run needs {', '.join(missing)} too (given: "
          + ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
          + "); no SLURM, Open MPI or Cloud TPU environment to detect them")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ConfigError(f"--process_id={process_id} must be in "
                      f"[0, num_processes={num_processes})")
  bind = None
  if coordinator_address is not None:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ConfigError(f"--coordinator_address={coordinator_address!r} must "
                        "be host:port (the address of process 0)")
    if host in LOOPBACK_HOSTS:
      # JAX binds the coordinator on every interface by default ([::]:port);
      # a local job has no reason to listen beyond loopback.
      bind = coordinator_address
  timeouts = {name: _int_env(environ, var, default) for name, var, default in (
      ("init", ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S),
      ("heartbeat", ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S),
      ("shutdown", ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT_S))}
  for name, value in timeouts.items():
    if value < 1:
      raise ConfigError(f"{name} timeout {value} s must be >= 1")
  reason = (f"{num_processes} processes from flags/{ENV_NUM_PROCESSES}"
            if explicit and launcher is None else f"detected {launcher}")
  return Plan(coordinator_address, num_processes, process_id,
              initialization_timeout=timeouts["init"],
              heartbeat_timeout_seconds=timeouts["heartbeat"],
              shutdown_timeout_seconds=timeouts["shutdown"],
              coordinator_bind_address=bind, reason=reason)


def _running_in_cloud_tpu_vm() -> bool:
  try:  # Set by `import jax` when libtpu and TPU chips are present.
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def plan_from_flags(*, mode: str = "auto",
                    coordinator_address: str | None = None,
                    num_processes: int | None = None,
                    process_id: int | None = None) -> Plan | None:
  """`plan` for this process: flags, environment, and whether this is a
  Cloud TPU VM."""
  return plan(mode=mode, coordinator_address=coordinator_address,
              num_processes=num_processes, process_id=process_id,
              cloud_tpu_vm=_running_in_cloud_tpu_vm())


def initialize(*, mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> Plan | None:
  """Calls jax.distributed.initialize when the job spans several processes.

  Must run before anything touches jax devices. Returns the plan it started
  the runtime with, or None when it did not start it. Then every process's
  host and pid are shared (logged; written for jaxclr/parallel/supervisor.py,
  which names a lost process by them).

  Raises:
    ConfigError: see `plan`.
    DistributedError: the coordinator could not be reached within the timeout
      (the message names the address, process and timeout).
  """
  p = plan_from_flags(mode=mode, coordinator_address=coordinator_address,
                      num_processes=num_processes, process_id=process_id)
  if p is None:
    return None
  # Cross-process collectives on the CPU backend need an implementation (gloo
  # ships with jaxlib). Harmless on TPU/GPU, where the CPU backend is unused.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed: starting (%s); coordinator %s, process %s "
               "of %s, connect timeout %d s, heartbeat timeout %d s", p.reason,
               p.coordinator_address or "<detected>",
               "<detected>" if p.process_id is None else p.process_id,
               p.num_processes or "<detected>", p.initialization_timeout,
               p.heartbeat_timeout_seconds)
  try:
    jax.distributed.initialize(
        coordinator_address=p.coordinator_address,
        num_processes=p.num_processes, process_id=p.process_id,
        initialization_timeout=p.initialization_timeout,
        heartbeat_timeout_seconds=p.heartbeat_timeout_seconds,
        shutdown_timeout_seconds=p.shutdown_timeout_seconds,
        coordinator_bind_address=p.coordinator_bind_address)
  except Exception as e:  # XlaRuntimeError/ValueError, depending on the cause.
    first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
    raise DistributedError(
        f"jax.distributed could not start: process {p.process_id} of "
        f"{p.num_processes} did not join coordinator "
        f"{p.coordinator_address or '<detected>'} within "
        f"{p.initialization_timeout} s (are all processes started, with the "
        f"same --num_processes and coordinator?): {type(e).__name__}: "
        f"{first}") from e
  logging.info("jax.distributed: process %d of %d, %d local device(s), %d "
               "global", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  peers = _exchange_identities(p.initialization_timeout)
  shown = sorted(peers)[:8]
  logging.info("jax.distributed: processes %s%s", ", ".join(
      f"{k}: {peers[k]['host']} pid {peers[k]['pid']}" for k in shown),
               ", ..." if len(peers) > len(shown) else "")
  supervisor.write_peers(peers)
  return p


def _exchange_identities(timeout_s: int) -> dict[int, dict]:
  """{process index: {'host', 'pid'}} of every process, through the
  coordination service's key-value store (one read per process)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  client.key_value_set(f"jaxclr/process/{jax.process_index()}",
                       json.dumps(supervisor.identity()))
  client.wait_at_barrier("jaxclr_identities",
                         timeout_in_ms=int(timeout_s * 1000))
  return {int(key.rsplit("/", 1)[-1]): json.loads(value)
          for key, value in client.key_value_dir_get("jaxclr/process/")}


def barrier(name: str, timeout_s: int) -> None:
  """Waits until every process reaches `name`, through the coordination
  service (not a device collective, so no collective timeout applies)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  jax_distributed.global_state.client.wait_at_barrier(
      name, timeout_in_ms=int(timeout_s * 1000))


def share_from_primary(key: str, value: str | None, timeout_s: int) -> str:
  """Process 0's `value` on every process (through the coordination
  service's key-value store; not a device collective). Others wait up to
  timeout_s for process 0 to publish it."""
  if jax.process_count() == 1:
    return value or ""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  key = f"jaxclr/{key}"
  if jax.process_index() == 0:
    client.key_value_set(key, value or "", allow_overwrite=True)
    return value or ""
  return client.blocking_key_value_get(key, int(timeout_s * 1000))


def compile_together(jitted, *args, name: str = "jaxclr_compiled"):
  """AOT-compiles `jitted` for `args`, then waits for every process.

  The first execution of a cross-process program sets up its collectives;
  on CPU, gloo gives up when the processes arrive more than 30 s apart, which
  uneven compile times (one process hitting the compilation cache, a loaded
  host) easily cause. Compiling first and meeting at a barrier removes that
  skew. The barrier waits up to JAXCLR_COMPILE_TIMEOUT_S (default 1800 s); a
  process that dies meanwhile is caught by the heartbeat timeout.
  Returns the compiled function (call it like `jitted`).
  """
  compiled = jitted.lower(*args).compile()
  barrier(name, _int_env(os.environ, "JAXCLR_COMPILE_TIMEOUT_S", 1800))
  return compiled
