"""jaxclr/cpu/runtime.py: where the Eigen-convolution flag is added, that a
user's own choice wins, and that the flag does what it is for in the jaxlib
installed (convolutions leave YNNPACK; their values stay the same)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxclr.cpu import runtime as cpu_runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED = "0.10.2"


def _env(**entries):
  return {"JAX_PLATFORMS": "cpu", **entries}


def test_added_on_cpu_for_a_measured_jaxlib():
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert cpu_runtime.use_eigen_convolutions_if_cpu(env, MEASURED)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                              + cpu_runtime.EIGEN_CONVOLUTIONS)
  assert cpu_runtime.eigen_convolutions(env["XLA_FLAGS"])


@pytest.mark.parametrize("env,version", [
    (_env(JAXCLR_CPU_CONV="ynnpack"), MEASURED),     # turned off
    ({"JAX_PLATFORMS": "cuda"}, MEASURED),           # not the CPU backend
    (_env(), "0.11.0"),                              # not measured there
    (_env(), ""),                                    # jaxlib unknown
])
def test_not_added(env, version):
  before = dict(env)
  assert not cpu_runtime.use_eigen_convolutions_if_cpu(env, version)
  assert env == before


def test_eigen_forces_it_on_any_jaxlib():
  env = _env(JAXCLR_CPU_CONV="eigen")
  assert cpu_runtime.use_eigen_convolutions_if_cpu(env, "0.11.0")
  assert env["XLA_FLAGS"] == cpu_runtime.EIGEN_CONVOLUTIONS


@pytest.mark.parametrize("flags,eigen", [
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-dot",
     True),
    ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", False),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
     "--xla_cpu_experimental_ynn_fusion_type=-reduce", False),  # last wins
])
def test_a_users_own_flag_wins(flags, eigen):
  env = _env(XLA_FLAGS=flags, JAXCLR_CPU_CONV="eigen")
  assert cpu_runtime.use_eigen_convolutions_if_cpu(env, MEASURED) is eigen
  assert env["XLA_FLAGS"] == flags


def test_bad_mode_is_refused():
  with pytest.raises(ValueError, match=r"JAXCLR_CPU_CONV='fast'; valid: "
                     r"auto, eigen, ynnpack"):
    cpu_runtime.use_eigen_convolutions_if_cpu(_env(JAXCLR_CPU_CONV="fast"))


_CHILD = """
import sys
import numpy as np
from jaxclr.cpu import runtime as cpu_runtime
applied = cpu_runtime.use_eigen_convolutions_if_cpu()
import jax
from jax import lax
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 32, 32, 64), dtype=np.float32)
w = rng.standard_normal((3, 3, 64, 64), dtype=np.float32) / 24
conv = jax.jit(lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
text = conv.lower(x, w).compile().as_text()
bodies = {}  # computation name -> its text
for block in text.split("\\n\\n"):
  head = block.strip().split(" ", 1)[0].lstrip("%")
  bodies[head] = block
ynn_calls = [line.split("calls=%")[1].split(",")[0]
             for line in text.splitlines()
             if "__ynn_fusion" in line and "calls=%" in line]
conv_in_ynn = any("convolution(" in bodies.get(name, "") for name in ynn_calls)
np.save(sys.argv[1], np.asarray(conv(x, w)))
print(applied, conv_in_ynn)
"""


def _child(mode, out):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAXCLR_CPU_CONV": mode}
  result = subprocess.run([sys.executable, "-c", _CHILD, out], env=env,
                          cwd=REPO, check=True, capture_output=True, text=True)
  applied, conv_in_ynn = result.stdout.split()
  return applied == "True", conv_in_ynn == "True", np.load(out)


def test_the_flag_takes_convolutions_out_of_ynnpack(tmp_path):
  """In the jaxlib installed: with the flag the compiled convolution is not
  a YNNPACK fusion, without it (where jaxlib measured slower) it is; both
  give the same convolution to float32 round-off, checked against a float64
  reference."""
  if not cpu_runtime._jaxlib_version().startswith(cpu_runtime.MEASURED_JAXLIB):
    pytest.skip("the flag is added only on the jaxlib versions measured")
  eigen_applied, eigen_in_ynn, eigen = _child("eigen", str(tmp_path / "e.npy"))
  ynn_applied, ynn_in_ynn, ynn = _child("ynnpack", str(tmp_path / "y.npy"))
  assert eigen_applied and not ynn_applied
  assert not eigen_in_ynn and ynn_in_ynn
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 32, 32, 64), dtype=np.float32).astype(np.float64)
  w = (rng.standard_normal((3, 3, 64, 64), dtype=np.float32) / 24).astype(
      np.float64)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  reference = sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + 32, j:j + 32], w[i, j])
                  for i in range(3) for j in range(3))
  scale = np.abs(reference).max()
  for got in (eigen, ynn):
    assert np.abs(got - reference).max() < 1e-5 * scale
