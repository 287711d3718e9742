"""CPU only: the XLA:CPU settings the jobs start the backend with.

Two settings, both applied before jax initialises its backend (they are read
once, when it starts) and only where the backend will be the CPU:

* how the host allocator serves large buffers (jaxclr/cpu/host_memory.py);
* convolutions run on XLA:CPU's Eigen kernels instead of YNNPACK.

Why the second: jaxlib 0.10 hands every large convolution to YNNPACK (an
XLA "ynn fusion"), and on the 2-core AVX-512 development CPU its kernels were
1.8x slower than XLA's Eigen convolutions on 64-channel layers and XLA's
kernel gradient on them 1.2-2.3x slower at every ResNet-18 layer (3x3 conv
at 128 x 32 x 32 x 64: forward 102.0 -> 56.7 ms, input gradient 102.2 ->
57.0, kernel gradient 183.7 -> 78.6; `python -m benchmarks.conv_layers`,
benchmarks/RESULTS.md, "CPU speed, 2026-12-05 (evening)").
XLA's `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` keeps
convolutions out of YNNPACK and leaves its matmuls, reductions and
element-wise fusions where they are (taking reductions out too was slower).

The flag is experimental: XLA aborts on a flag it does not know, and a later
YNNPACK may be the faster one, so it is added only on the jaxlib versions
the CPU paths were tested with (jaxclr/cpu/versions.py); on any other the
job logs why in one INFO line (jaxclr/cpu/__init__.py: log_settings). A
user's own --xla_cpu_experimental_ynn_fusion_type in XLA_FLAGS wins.
JAXCLR_CPU_CONV=ynnpack keeps jaxlib's default; =eigen adds the flag on any
jaxlib version (and fails there if XLA does not know it).
"""

from __future__ import annotations

import os

from jaxclr.cpu import host_memory, versions

CONV_ENV = "JAXCLR_CPU_CONV"
CONV_MODES = ("auto", "eigen", "ynnpack")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = YNN_FLAG + "=-individual_convolution"


def use_eigen_convolutions_if_cpu(environ=None) -> bool:
  """Adds EIGEN_CONVOLUTIONS to environ's XLA_FLAGS where it applies (the
  CPU backend, a tested jaxlib, not turned off); returns whether XLA_FLAGS
  now keeps convolutions out of YNNPACK."""
  environ = os.environ if environ is None else environ
  mode = environ.get(CONV_ENV, "auto")
  if mode not in CONV_MODES:
    raise ValueError(f"{CONV_ENV}={mode!r}; valid: {', '.join(CONV_MODES)}")
  xla_flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG in xla_flags:  # The user chose; keep it.
    return eigen_convolutions(xla_flags)
  if mode == "ynnpack" or not host_memory.backend_will_be_cpu(environ):
    return False
  if mode == "auto" and versions.untested("jaxlib"):
    return False
  environ["XLA_FLAGS"] = (xla_flags + " " + EIGEN_CONVOLUTIONS).strip()
  return True


def eigen_convolutions(xla_flags: str | None = None) -> bool:
  """Whether XLA_FLAGS (the process's by default) takes convolutions out
  of YNNPACK: the last ynn_fusion_type flag removes individual_convolution."""
  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else (
      xla_flags)
  values = [f.split("=", 1)[1] for f in xla_flags.split()
            if f.startswith(YNN_FLAG + "=")]
  return bool(values) and "-individual_convolution" in values[-1].split(",")


def prepare(environ=None, restart: bool = False) -> dict:
  """Both settings; call before anything starts jax's backend. restart:
  this is a job's entry point, which may re-execute itself for the huge-
  page allocator (host_memory.restart_with_huge_pages_if_cpu). Returns
  which applied, and `untested`: on the CPU backend, why the installed
  jaxlib or TensorFlow keeps jaxclr's CPU paths off (None: it does not)."""
  if restart:
    host_memory.restart_with_huge_pages_if_cpu(environ)
  on_cpu = host_memory.backend_will_be_cpu(environ)
  return {"huge_pages": host_memory.huge_pages_in_effect(environ),
          "tuned_malloc": host_memory.keep_freed_memory_if_cpu(environ),
          "eigen_convolutions": use_eigen_convolutions_if_cpu(environ),
          "untested": (versions.untested("jaxlib", "tensorflow")
                       if on_cpu else None)}
