"""jaxclr/host_memory.py: where the CPU allocator settings apply, and that
they remove the page faults they are for (in most calls)."""

import os
import resource
import subprocess
import sys

import pytest

from jaxclr import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("platforms,expected", [
    ("cpu", True), ("CPU", True), ("cpu,cuda", True), ("cuda", False),
    ("tpu", False), ("cuda,cpu", False)])
def test_jax_platforms_decides_first(platforms, expected):
  assert host_memory.backend_will_be_cpu({"JAX_PLATFORMS": platforms}) is (
      expected)


def test_modes():
  assert not host_memory.keep_freed_memory_if_cpu(
      {host_memory.ENV: "default", "JAX_PLATFORMS": "cpu"})
  assert not host_memory.keep_freed_memory_if_cpu({"JAX_PLATFORMS": "cuda"})
  with pytest.raises(ValueError, match=r"JAXCLR_HOST_MALLOC='on'; valid"):
    host_memory.keep_freed_memory_if_cpu({host_memory.ENV: "on"})


_CHILD = """
import resource, sys
from jaxclr import host_memory
applied = host_memory.keep_freed_memory_if_cpu({"JAXCLR_HOST_MALLOC": sys.argv[1]})
import jax, jax.numpy as jnp
x = jnp.ones((256, 32, 32, 64))  # 64 MiB: over glibc's 32 MiB mmap cap.
f = jax.jit(lambda x: x * 2 + 1)
for _ in range(10):  # The heap grows to its steady size over a few calls.
  f(x).block_until_ready()
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[4], min(faults))
"""


def _faults_per_call(mode):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env,
                       cwd=REPO, check=True, capture_output=True, text=True)
  applied, median, least = out.stdout.split()
  return applied == "True", float(median), float(least)


def test_tuned_allocator_stops_refaulting_each_output():
  """64 MiB of output is 16,384 pages: with glibc's defaults every call
  faults them in again; with the settings, once the heap has grown to its
  steady size, most calls fault (almost) none. (Now and then a call still
  gets fresh pages, when the previous output is not yet freed as the next
  is allocated: hence the median over 9 calls.)"""
  applied, tuned, _ = _faults_per_call("tuned")
  not_applied, _, default_least = _faults_per_call("default")
  assert applied and not not_applied
  pages = 256 * 32 * 32 * 64 * 4 // resource.getpagesize()
  assert default_least >= 0.9 * pages
  assert tuned < 0.05 * pages
