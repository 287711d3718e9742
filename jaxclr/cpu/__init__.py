"""Everything jaxclr does for XLA:CPU only, behind one door.

Three things, each measured to pay on the 2-core development CPU
(benchmarks/RESULTS.md, "CPU speed") and each optional:

* `prepare()`: XLA:CPU start-up settings (runtime.py: convolutions on
  Eigen's kernels rather than YNNPACK; host_memory.py: how malloc serves
  the step's large buffers). Call before jax starts its backend.
* `job_convolution(model_config)`: the convolution a one-device CPU job's
  model is built with: TensorFlow's oneDNN kernels as XLA custom calls
  (onednn_conv.py, via python_ffi.py) and/or a per-tap kernel gradient
  (patch_conv.py); None elsewhere, i.e. XLA's own (models/conv.py).
* `describe_failure(error)`: a custom call that failed inside the step, as
  one line that names the switch to turn it off.

The convolution paths and the XLA flag apply only on the jaxlib and
TensorFlow versions they were tested with (versions.py, also pinned by
pyproject.toml's `cpu` extra); on any other version the jobs run XLA's
plain convolutions and say so in one INFO line.
Nothing outside this folder imports its modules: remove the folder and the
calls to this door, and jaxclr runs on XLA alone.
"""

from __future__ import annotations

import functools
import sys

from absl import logging

from jaxclr import errors
from jaxclr.config.schema import (
    CONV_KERNEL_GRADS as KERNEL_GRADS, CONV_LIBRARIES as LIBRARIES)
from jaxclr.cpu import versions

# The switch that turns the oneDNN custom calls off, for the lines that
# name it.
_ONEDNN_OFF = "--config.model.conv_library=xla"


def prepare(environ=None, restart: bool = False) -> dict:
  """The XLA:CPU start-up settings (runtime.prepare); see its docstring."""
  from jaxclr.cpu import runtime  # pylint: disable=g-import-not-at-top
  return runtime.prepare(environ, restart=restart)


def log_settings(settings: dict) -> None:
  """One INFO line per start-up setting that `prepare` applied, and one
  saying why none of the CPU paths apply on an untested jaxlib or
  TensorFlow."""
  from jaxclr.cpu import (  # pylint: disable=g-import-not-at-top
      host_memory, runtime)
  if settings.get("untested"):
    # An untested jaxlib turns every convolution path and the flag off; an
    # untested TensorFlow only the oneDNN path.
    off = ("XLA's own convolutions, none of jaxclr/cpu's"
           if versions.untested("jaxlib") else
           "XLA's convolutions, not TensorFlow's oneDNN kernels")
    logging.info("CPU backend: %s: %s (jaxclr/cpu/versions.py; pip install "
                 "-e '.[cpu]' installs those)", off, settings["untested"])
  if settings["huge_pages"]:
    logging.info("CPU backend: malloc maps large buffers with huge pages "
                 "(jaxclr/cpu/host_memory.py; %s=tuned|default changes it)",
                 host_memory.ENV)
  if settings["tuned_malloc"]:
    logging.info("CPU backend: glibc malloc keeps freed memory "
                 "(jaxclr/cpu/host_memory.py; %s=default turns it off)",
                 host_memory.ENV)
  if settings["eigen_convolutions"]:
    logging.info("CPU backend: convolutions on XLA's Eigen kernels, not "
                 "YNNPACK (jaxclr/cpu/runtime.py; %s=ynnpack turns it off)",
                 runtime.CONV_ENV)


def environment_switches(environ=None) -> dict:
  """The environment variables that switch the start-up settings
  (JAXCLR_CPU_CONV, JAXCLR_HOST_MALLOC) and their values, 'auto' unset:
  for benchmark records."""
  import os  # pylint: disable=g-import-not-at-top
  from jaxclr.cpu import (  # pylint: disable=g-import-not-at-top
      host_memory, runtime)
  environ = os.environ if environ is None else environ
  return {env: environ.get(env, "auto")
          for env in (runtime.CONV_ENV, host_memory.ENV)}


def eigen_convolutions() -> bool:
  """Whether this process's XLA_FLAGS keep convolutions out of YNNPACK."""
  from jaxclr.cpu import runtime  # pylint: disable=g-import-not-at-top
  return runtime.eigen_convolutions()


def _job_layout(backend, num_devices):
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend() if backend is None else backend
  num_devices = jax.device_count() if num_devices is None else num_devices
  return backend, num_devices


def resolve_kernel_grad(kernel_grad: str, *, backend: str | None = None,
                        num_devices: int | None = None,
                        compute_dtype: str = "float32") -> str:
  """'xla' or 'patches' for model.conv_kernel_grad: 'auto' is 'patches' on
  a CPU backend with one device in all, float32 compute and a tested jaxlib,
  'xla' elsewhere.

  One device only: each tap's matmul sums over the batch, so on a
  batch-sharded mesh it ends in an all-reduce, and an all-reduce inside the
  taps' loop escapes XLA:CPU's ordering of collectives across local devices
  (an 8-device step deadlocked in the test suite, 2026-12-05). float32
  only for 'auto': the per-tap form was measured in float32 only.
  """
  if kernel_grad not in KERNEL_GRADS:
    raise errors.ConfigError(f"model.conv_kernel_grad={kernel_grad!r}; "
                             f"valid: {', '.join(KERNEL_GRADS)}")
  backend, num_devices = _job_layout(backend, num_devices)
  if kernel_grad == "patches" and num_devices > 1:
    raise errors.ConfigError(
        f"model.conv_kernel_grad='patches' runs on one device, and this job "
        f"has {num_devices}; use 'auto' or 'xla'")
  if kernel_grad != "auto":
    return kernel_grad
  if (backend == "cpu" and num_devices == 1 and compute_dtype == "float32"
      and versions.untested("jaxlib") is None):
    return "patches"
  return "xla"


def resolve_library(library: str, *, backend: str | None = None,
                    num_devices: int | None = None,
                    compute_dtype: str = "float32") -> str:
  """'xla' or 'onednn' for model.conv_library: 'auto' is 'onednn' on a CPU
  backend with one device in all, float32 compute, where TensorFlow's
  oneDNN kernels run and the jaxlib and TensorFlow versions are tested;
  'xla' elsewhere. An explicit 'onednn' where it cannot run is refused."""
  if library not in LIBRARIES:
    raise errors.ConfigError(f"model.conv_library={library!r}; "
                             f"valid: {', '.join(LIBRARIES)}")
  backend, num_devices = _job_layout(backend, num_devices)
  if library == "xla":
    return library
  reason = None
  if backend != "cpu":
    reason = f"it runs on the CPU backend, and this job's is {backend!r}"
  elif num_devices > 1:
    reason = f"it runs on one device, and this job has {num_devices}"
  else:
    reason = versions.untested("jaxlib", "tensorflow") or _onednn_missing()
  if library == "onednn":
    if reason:
      raise errors.ConfigError(f"model.conv_library='onednn' cannot run "
                               f"here: {reason}; use 'auto' or 'xla'")
    return library
  if reason is None and compute_dtype == "float32":
    return "onednn"
  return "xla"


def _onednn_missing() -> str | None:
  from jaxclr.cpu import onednn_conv  # pylint: disable=g-import-not-at-top
  return onednn_conv.unavailable_reason()


def job_convolution(model_config, *, backend: str | None = None,
                    num_devices: int | None = None, log: bool = True):
  """The convolution a job builds its model with (models.simclr's `conv=`),
  from model.conv_library / model.conv_kernel_grad: None (XLA's own)
  unless a CPU path applies. With log, says in one INFO line what runs."""
  dtype = model_config.get("compute_dtype") or "float32"
  layout = dict(backend=backend, num_devices=num_devices, compute_dtype=dtype)
  library = resolve_library(model_config.get("conv_library") or "auto",
                            **layout)
  kernel_grad = resolve_kernel_grad(
      model_config.get("conv_kernel_grad") or "auto", **layout)
  if log:
    _log_choice(library, kernel_grad, **layout)
  if library == "xla" and kernel_grad == "xla":
    return None
  return functools.partial(conv2d, library=library, kernel_grad=kernel_grad)


def _log_choice(library, kernel_grad, *, backend, num_devices,
                compute_dtype):
  backend, num_devices = _job_layout(backend, num_devices)
  if backend != "cpu" or num_devices != 1:
    return
  if library == "onednn":
    logging.info("CPU backend: float32 convolutions on TensorFlow's oneDNN "
                 "kernels (jaxclr/cpu/onednn_conv.py; %s turns it off)",
                 _ONEDNN_OFF)
  elif kernel_grad == "patches":
    logging.info("CPU backend: convolution kernel gradients as per-tap "
                 "matmuls (jaxclr/cpu/patch_conv.py; "
                 "--config.model.conv_kernel_grad=xla turns it off)")
  else:
    # An untested version is said once, at the job's start (log_settings).
    why = None
    if compute_dtype != "float32" and versions.untested(
        "jaxlib", "tensorflow") is None:
      why = (f"compute_dtype={compute_dtype!r}; 'auto' takes the CPU "
             "paths for float32")
    logging.info("CPU backend: XLA's convolutions%s",
                 f" ({why})" if why else "")


def describe_failure(error: BaseException) -> str | None:
  """One line for a failure of jaxclr/cpu's custom calls (the oneDNN
  convolutions): a Python FFI handler that raised inside the step, or an
  FFI runtime that python_ffi's structs do not fit. It names the switch
  that turns the path off. None for any other error, or where no custom
  call of ours was ever built in this process."""
  onednn_conv = sys.modules.get("jaxclr.cpu.onednn_conv")
  if onednn_conv is None:
    return None
  python_ffi = onednn_conv.python_ffi
  target = onednn_conv.FFI_TARGET
  seen = set()
  while error is not None and id(error) not in seen:  # It and its causes.
    seen.add(id(error))
    text = str(error)
    if isinstance(error, python_ffi.FfiVersionError) and target in text:
      return (f"jaxclr's oneDNN convolutions cannot run on this jaxlib: "
              f"{_one_line(text)}; {_ONEDNN_OFF} turns them off")
    at = text.find(target + ": ")
    if at >= 0:  # The handler's "<target>: <type>: <message>"; first line.
      return (f"a oneDNN convolution failed inside the step "
              f"(jaxclr/cpu/onednn_conv.py): "
              f"{_one_line(text[at:].splitlines()[0])}; {_ONEDNN_OFF} "
              "turns that path off")
    error = error.__cause__ or error.__context__
  return None


def _one_line(text: str) -> str:
  return " ".join(text.split())


def conv2d(x, kernel, strides: int, padding, *, library: str,
           kernel_grad: str):
  """models.conv.conv2d on the CPU paths: oneDNN for float32 operands when
  library='onednn'; else the per-tap kernel gradient when
  kernel_grad='patches'; else XLA's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if library == "onednn" and x.dtype == jnp.float32:
    from jaxclr.cpu import onednn_conv  # pylint: disable=g-import-not-at-top
    return onednn_conv.conv2d(x, kernel, strides, padding)
  if kernel_grad == "patches":
    from jaxclr.cpu import patch_conv  # pylint: disable=g-import-not-at-top
    return patch_conv.conv2d(x, kernel, strides, padding)
  from jaxclr.models import (  # pylint: disable=g-import-not-at-top
      conv as conv_lib)
  return conv_lib.conv2d(x, kernel, strides, padding)
