"""Starting JAX's multi-controller runtime: one process per host."""

from __future__ import annotations

import os

import jax
from absl import logging

def _detected_process_count() -> int:
  """Processes announced by SLURM, Open MPI or a Cloud TPU pod slice."""
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def initialize(*, mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize when the job spans several processes.

  Returns True when the distributed runtime was started.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if mode == "off" or (mode == "auto" and not explicit
                       and _detected_process_count() <= 1):
    return False
  # Cross-process collectives on the CPU backend need an implementation (gloo
  # ships with jaxlib). Harmless on TPU/GPU, where the CPU backend is unused.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local device(s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count())
  return True

