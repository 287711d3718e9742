"""CPU only: keep freed host memory in the process instead of giving it back.

XLA:CPU allocates a step's buffers (tens of MB each, GBs in all) with
malloc on its worker threads. glibc serves allocations that large from
fresh mmap'ed pages and unmaps them on free, so every step page-faults
all of its output and temporary memory anew: measured on the 2-core
development CPU (benchmarks/RESULTS.md, "Host allocator"), one 128 MiB
elementwise op takes 42 ms with 32,768 page faults per call, and 4.2 ms
with none once glibc keeps freed memory; the R-18 train step gets ~17%
faster. Three glibc malloc settings (mallopt) do it: one arena (the
per-thread arenas cannot hold chunks this large and fall back to mmap), no
mmap, and no trimming of the heap's top.

The settings only take effect before the runtime's threads first allocate,
i.e. before jax initialises its backend: the entry points call
`keep_freed_memory_if_cpu()` before parsing flags. They are applied only
where the backend will be the CPU (JAX_PLATFORMS names cpu first, or no
accelerator plugin is installed): on GPU/TPU hosts the device holds the big
buffers and host threads keep glibc's defaults. JAXCLR_HOST_MALLOC=default
turns the settings off, =tuned forces them. The price: the process keeps
its peak host memory until it exits (no trimming), so resident memory does
not fall after a peak, and the one heap can fragment: at R-50 / 224 px /
B=32 the resident set reached 19-24 GB where glibc's defaults stay at 11 GB
(one run OOM-killed on a 24 GB machine; benchmarks/RESULTS.md). Near the
machine's memory, run with JAXCLR_HOST_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

ENV = "JAXCLR_HOST_MALLOC"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NO_TRIM = 2**31 - 1  # The largest int mallopt takes: never trim.


def accelerator_plugin_installed() -> bool:
  """Whether a jax plugin (CUDA, ROCm, ...) or libtpu is installed, found
  without importing jax's backends."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def backend_will_be_cpu(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not accelerator_plugin_installed()


def keep_freed_memory_if_cpu(environ=None) -> bool:
  """Applies the settings where they help; returns whether it did."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV, "auto")
  if mode not in ("auto", "tuned", "default"):
    raise ValueError(f"{ENV}={mode!r}; valid: 'auto', 'tuned', 'default'")
  if mode == "default" or (mode == "auto" and not backend_will_be_cpu(environ)):
    return False
  name = ctypes.util.find_library("c")
  libc = ctypes.CDLL(name) if name else None
  if libc is None or not hasattr(libc, "mallopt"):  # Not glibc: nothing to do.
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM)))
