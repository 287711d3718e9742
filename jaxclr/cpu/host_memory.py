"""CPU only: how the host allocator serves XLA:CPU's large buffers.

XLA:CPU allocates a step's buffers (tens of MB each, GBs in all) with
malloc on its worker threads. glibc serves allocations that large from
fresh mmap'ed pages and unmaps them on free, so every step page-faults all
of its output and temporary memory anew, 4 KiB at a time: measured on the
2-core development CPU (benchmarks/RESULTS.md, "Host allocator"), one
128 MiB elementwise op takes 42 ms with 32,768 page faults per call. Two
remedies, one per process:

* 'hugepages' (the CPU jobs' default where the kernel offers transparent
  huge pages and glibc >= 2.35): glibc's tunable glibc.malloc.hugetlb=1
  makes malloc madvise its mmaps for huge pages, so a fault maps 2 MiB and
  freed memory still goes back to the system. glibc reads tunables only
  when a process starts, so the job's entry point re-executes itself once
  with GLIBC_TUNABLES set (`restart_with_huge_pages_if_cpu`, same command
  and PID). R-18 / 32 px / B=256 step: 32-48 thousand faults instead of
  ~1.1 million, the resident set flat at 6.3 GB (benchmarks/RESULTS.md,
  "CPU speed, 2026-12-05 (evening)").
* 'tuned' (the default where a process cannot restart: the test suite, the
  benchmarks; or where huge pages are unavailable): mallopt keeps freed
  memory in the process -- one arena, no mmap, no trimming of the heap's
  top. 4.2 ms and no faults for the op above, +16% on the R-18 / B=64 step.
  Its price: the one heap fragments when a step's temporary buffers are
  large, so faults come back and the resident set grows step after step
  (R-18 / B=256: 6.3 -> 14.8 GB in 4 steps; R-50 / 224 px / B=32 was
  OOM-killed at 24 GB). It only takes effect before the runtime's threads
  first allocate, i.e. before jax initialises its backend.

Applied only where the backend will be the CPU (JAX_PLATFORMS names cpu
first, or no accelerator plugin is installed): on GPU/TPU hosts the device
holds the big buffers and host threads keep glibc's defaults.
JAXCLR_HOST_MALLOC = auto | hugepages | tuned | default (glibc's own).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

ENV = "JAXCLR_HOST_MALLOC"
MODES = ("auto", "hugepages", "tuned", "default")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
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


def _mode(environ) -> str:
  mode = environ.get(ENV, "auto")
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}; valid: "
                     + ", ".join(repr(m) for m in MODES))
  return mode


def _hugetlb_tunable(environ) -> str | None:
  """The value GLIBC_TUNABLES gives glibc.malloc.hugetlb (the last one, as
  glibc reads them), or None where it names none."""
  value = None
  for tunable in environ.get("GLIBC_TUNABLES", "").split(":"):
    name, _, setting = tunable.partition("=")
    if name == "glibc.malloc.hugetlb":
      value = setting
  return value


def huge_pages_in_effect(environ=None) -> bool:
  """Whether this process started with glibc's huge-page tunable on."""
  environ = os.environ if environ is None else environ
  return _hugetlb_tunable(environ) not in (None, "0")


def transparent_huge_pages_available(path: str = _THP_ENABLED) -> bool:
  """The kernel gives huge pages to memory madvise'd for them."""
  try:
    with open(path) as f:
      setting = f.read()
  except OSError:
    return False
  return "[always]" in setting or "[madvise]" in setting


def glibc_has_hugetlb_tunable() -> bool:
  """glibc.malloc.hugetlb exists from glibc 2.35 on."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = (int(v) for v in version.split(".")[:2])
  except (ValueError, OSError, AttributeError):
    return False
  return name == "glibc" and (major, minor) >= (2, 35)


def huge_pages_restart(environ, argv, executable) -> tuple | None:
  """(executable, argv, environment) to re-execute this job with glibc's
  huge-page tunable, or None where that does not apply."""
  mode = _mode(environ)
  # Already set, by an earlier restart or by the user (=0 included): keep it.
  if mode in ("tuned", "default") or _hugetlb_tunable(environ) is not None:
    return None
  if mode == "auto" and not (backend_will_be_cpu(environ)
                             and transparent_huge_pages_available()
                             and glibc_has_hugetlb_tunable()):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  new_env = dict(environ, GLIBC_TUNABLES=":".join(
      t for t in (tunables, HUGE_PAGES_TUNABLE) if t))
  return executable, list(argv), new_env


def restart_with_huge_pages_if_cpu(environ=None) -> None:
  """Re-executes this process (same command, same PID) with glibc's
  huge-page tunable where it applies; returns only where it does not. Call
  first thing in an entry point: nothing may have been started yet."""
  environ = os.environ if environ is None else environ
  restart = huge_pages_restart(environ, sys.orig_argv, sys.executable)
  if restart is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(*restart)


def keep_freed_memory_if_cpu(environ=None) -> bool:
  """Applies the mallopt settings where they help (not with huge pages);
  returns whether it did."""
  environ = os.environ if environ is None else environ
  mode = _mode(environ)
  if mode in ("default", "hugepages") or huge_pages_in_effect(environ) or (
      mode == "auto" and not backend_will_be_cpu(environ)):
    return False
  name = ctypes.util.find_library("c")
  libc = ctypes.CDLL(name) if name else None
  if libc is None or not hasattr(libc, "mallopt"):  # Not glibc: nothing to do.
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM)))
