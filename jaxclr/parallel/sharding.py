"""One data-parallel mesh over every device of every process.

Parameters are replicated; batches are split along their leading axis over
the 'data' axis. Batches arrive per process and become global jax.Arrays with
jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def make_mesh(axis_type: str = "explicit", devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all global devices)."""
  if axis_type not in AXIS_TYPES:
    raise ValueError(f"mesh axis type {axis_type!r}; valid: {sorted(AXIS_TYPES)}")
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AXIS_TYPES[axis_type],), devices=devices)


def explicit_mesh_of(x) -> jax.sharding.Mesh | None:
  """The mesh of x's type where it has Explicit axes (whose shardings are
  part of the type and must be stated), else None."""
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  if mesh is None or not mesh.axis_names or AxisType.Explicit not in tuple(
      mesh.axis_types):
    return None
  return mesh


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def describe_layout(mesh) -> str:
  """'2 process(es) x 4 device(s) (8 total, cpu)', for start-up log lines."""
  return (f"{jax.process_count()} process(es) x {jax.local_device_count()} "
          f"device(s) ({mesh.devices.size} total, {jax.devices()[0].platform})")


def check_batch_divides(batch_size: int, mesh, process_count: int | None = None):
  """Raises ValueError naming the numbers when batch_size cannot be split."""
  process_count = jax.process_count() if process_count is None else process_count
  num_devices = mesh.devices.size
  if batch_size % num_devices or batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by the number of devices "
        f"({num_devices}) and of processes ({process_count}); nearest valid: "
        f"{max(num_devices, batch_size // num_devices * num_devices)}")


def from_host(mesh, x: np.ndarray, spec: P = P(DATA_AXIS)) -> jax.Array:
  """A global array from a numpy array that EVERY process holds in full.

  Each process fills only its own devices' shards from its copy
  (make_array_from_callback), so this works on one process and on many,
  where device_put onto another process's devices would not.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                      lambda index: x[index])


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Process-local numpy arrays -> global arrays sharded on their first axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def jit_over_batch(fn, mesh):
  """jit of fn(variables, images): variables replicated, images and the
  result sharded over the batch (every inference pass of every job)."""
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=batch_sharded(mesh))
