"""The jaxlib and TensorFlow versions jaxclr's CPU paths were tested with.

The one place they are declared (pyproject.toml's `cpu` extra pins the
same; tests/cpu_door_test.py checks that the two agree). The oneDNN custom
calls read XLA's FFI C structs through ctypes (python_ffi.py) and set an
experimental XLA flag (runtime.py): both depend on the exact jaxlib, and
the custom calls on TensorFlow's kernels. On any other version jaxclr
runs XLA's plain path.
"""

from __future__ import annotations

import importlib.metadata

TESTED = {"jaxlib": ("0.10.2",), "tensorflow": ("2.21.0",)}
# The distributions that provide each package.
_DISTRIBUTIONS = {"jaxlib": ("jaxlib",),
                  "tensorflow": ("tensorflow-cpu", "tensorflow")}


def installed(package: str) -> str | None:
  """The installed version of `package` (a key of TESTED), or None."""
  for dist in _DISTRIBUTIONS[package]:
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def untested(*packages: str) -> str | None:
  """None when every package's installed version is a tested one, else a
  phrase saying which is not (for the one-line message)."""
  for package in packages:
    version = installed(package)  # Looked up here, so tests can fake it.
    if version not in TESTED[package]:
      return (f"{package} {version or 'not installed'} is not a version the "
              f"CPU paths were tested on ({', '.join(TESTED[package])})")
  return None
