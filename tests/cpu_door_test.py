"""jaxclr/cpu, the door: the tested versions (one declaration, the same as
pyproject's `cpu` extra) and what an untested one turns off; where the
Eigen-convolution flag is added and that it does what it is for in the
jaxlib installed; and that a failing custom call ends a job in one line
that names the switch to turn it off."""

import os
import subprocess
import sys
import tomllib
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packaging.requirements import Requirement

from jaxclr import cli, config as config_lib, cpu, errors
from jaxclr.cpu import host_memory, python_ffi, runtime as cpu_runtime
from jaxclr.cpu import versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTESTED_LINE = "is not a version the CPU paths were tested on"


def _env(**entries):
  # JAXCLR_HOST_MALLOC=default: prepare() leaves this process's malloc be.
  return {"JAX_PLATFORMS": "cpu", host_memory.ENV: "default", **entries}


def _fake_versions(monkeypatch, **fake):
  """versions.installed answers `fake`'s versions (None: not installed)."""
  real = versions.installed
  monkeypatch.setattr(versions, "installed",
                      lambda p: fake[p] if p in fake else real(p))


def test_the_tested_versions_are_the_cpu_extras_pins():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["cpu"]
  pins = {}
  for line in extra:
    req = Requirement(line)
    (spec,) = req.specifier  # One exact pin per distribution.
    assert spec.operator == "==", line
    pins[req.name] = spec.version
  assert pins == {"jaxlib": versions.TESTED["jaxlib"][0],
                  "tensorflow-cpu": versions.TESTED["tensorflow"][0]}
  assert all(len(v) == 1 for v in versions.TESTED.values())


def test_installed_versions_are_the_tested_ones():
  """This suite's environment is the tested one, or the tests of the fast
  paths below test nothing."""
  assert versions.untested("jaxlib", "tensorflow") is None


def test_added_on_cpu_for_a_tested_jaxlib():
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert cpu_runtime.use_eigen_convolutions_if_cpu(env)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                              + cpu_runtime.EIGEN_CONVOLUTIONS)
  assert cpu_runtime.eigen_convolutions(env["XLA_FLAGS"])


@pytest.mark.parametrize("env,jaxlib", [
    (_env(JAXCLR_CPU_CONV="ynnpack"), None),  # turned off
    ({"JAX_PLATFORMS": "cuda"}, None),        # not the CPU backend
    (_env(), "0.11.0"),                       # not tested there
    (_env(), "0.10.1"),
])
def test_not_added(monkeypatch, env, jaxlib):
  if jaxlib:
    _fake_versions(monkeypatch, jaxlib=jaxlib)
  before = dict(env)
  assert not cpu_runtime.use_eigen_convolutions_if_cpu(env)
  assert env == before


def test_eigen_forces_it_on_any_jaxlib(monkeypatch):
  _fake_versions(monkeypatch, jaxlib="0.11.0")
  env = _env(JAXCLR_CPU_CONV="eigen")
  assert cpu_runtime.use_eigen_convolutions_if_cpu(env)
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
  assert cpu_runtime.use_eigen_convolutions_if_cpu(env) is eigen
  assert env["XLA_FLAGS"] == flags


def test_bad_mode_is_refused():
  with pytest.raises(ValueError, match=r"JAXCLR_CPU_CONV='fast'; valid: "
                     r"auto, eigen, ynnpack"):
    cpu_runtime.use_eigen_convolutions_if_cpu(_env(JAXCLR_CPU_CONV="fast"))


def test_the_doors_view_of_the_start_up_switches():
  assert cpu.environment_switches({"JAXCLR_CPU_CONV": "ynnpack"}) == {
      "JAXCLR_CPU_CONV": "ynnpack", "JAXCLR_HOST_MALLOC": "auto"}
  # This process (tests/conftest.py) prepared as the jobs do.
  assert cpu.eigen_convolutions() == cpu_runtime.eigen_convolutions(
      os.environ["XLA_FLAGS"]) == (cpu_runtime.EIGEN_CONVOLUTIONS in
                                   os.environ["XLA_FLAGS"])


def _one_device_cpu_job(dtype="float32"):
  model = config_lib.pretrain_config().model
  model.compute_dtype = dtype
  return model


def _job_start(caplog, env):
  """What a job does at its start (cli.run_job), then its convolution
  (jobs/pretrain.py); returns (settings, conv, the INFO lines logged)."""
  caplog.clear()
  with caplog.at_level("INFO", logger="absl"):
    settings = cpu.prepare(env)
    cpu.log_settings(settings)
    conv = cpu.job_convolution(_one_device_cpu_job(), backend="cpu",
                               num_devices=1)
  return settings, conv, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("fake,flag", [
    ({"jaxlib": "0.11.0"}, False), ({"jaxlib": None}, False),
    ({"tensorflow": "2.22.0"}, True)])
def test_an_untested_version_runs_xla_and_says_why_once(monkeypatch, caplog,
                                                        fake, flag):
  """Faked installed versions: XLA's convolutions, the Eigen flag only on a
  tested jaxlib, explicit 'onednn' refused, and one INFO line naming the
  version; against the tested versions' own run as the control."""
  env = _env(XLA_FLAGS="")
  settings, conv, lines = _job_start(caplog, env)
  assert settings["untested"] is None and env["XLA_FLAGS"]
  assert conv.keywords == {"library": "onednn", "kernel_grad": "patches"}
  assert not [line for line in lines if UNTESTED_LINE in line]

  _fake_versions(monkeypatch, **fake)
  env = _env(XLA_FLAGS="")
  settings, conv, lines = _job_start(caplog, env)
  (package, version), = fake.items()
  assert settings["eigen_convolutions"] is flag
  assert bool(env["XLA_FLAGS"]) is flag
  said = [line for line in lines if UNTESTED_LINE in line]
  assert len(said) == 1, lines
  assert f"{package} {version or 'not installed'} {UNTESTED_LINE}" in said[0]
  if package == "jaxlib":
    assert "XLA's own convolutions, none of jaxclr/cpu's" in said[0]
    assert conv is None  # XLA's, forward and gradients.
  else:  # jaxlib tested: the per-tap gradient (no custom call) stays.
    assert "XLA's convolutions, not TensorFlow's oneDNN kernels" in said[0]
    assert conv.keywords == {"library": "xla", "kernel_grad": "patches"}
  with pytest.raises(config_lib.ConfigError,
                     match=f"'onednn' cannot run here: {package}"):
    cpu.resolve_library("onednn", backend="cpu", num_devices=1)


def test_bfloat16_auto_runs_xla_and_says_why(caplog):
  with caplog.at_level("INFO", logger="absl"):
    conv = cpu.job_convolution(_one_device_cpu_job("bfloat16"),
                               backend="cpu", num_devices=1)
  assert conv is None
  assert any("XLA's convolutions (compute_dtype='bfloat16'" in r.getMessage()
             for r in caplog.records)


def _raising_conv2d(**unused_kwargs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  raise tf.errors.ResourceExhaustedError(
      None, None, "OOM when allocating tensor with shape[4,6,6,5]\nmore")


def _onednn_step():
  x = jnp.ones((4, 6, 6, 3), jnp.float32)
  w = jnp.ones((3, 3, 3, 5), jnp.float32)
  return jax.jit(lambda x, w: cpu.conv2d(
      x, w, 1, ((1, 1), (1, 1)), library="onednn", kernel_grad="xla"))(x, w)


def _job_edge(capsys, fn):
  """fn() at a job's edge (cli.run_job's user_errors_exit): its exit
  status and what it printed to stderr."""
  with pytest.raises(SystemExit) as exit_info:
    with cli.user_errors_exit():
      jax.block_until_ready(fn())
  return exit_info.value.code, capsys.readouterr().err


def test_a_failing_custom_call_ends_the_job_in_one_line(monkeypatch, capsys,
                                                        caplog):
  """TensorFlow's kernel fails inside the compiled step's custom call: one
  line naming the switch, the user-error status, the traceback only in
  the INFO log."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(_onednn_step()[:, 1:-1, 1:-1], 27.0)
  monkeypatch.setattr(tf.raw_ops, "Conv2D", _raising_conv2d)
  with caplog.at_level("INFO", logger="absl"):
    status, err = _job_edge(capsys, _onednn_step)
  assert status == errors.EXIT_USER_ERROR
  assert err.splitlines() == [
      "jaxclr: error: a oneDNN convolution failed inside the step "
      "(jaxclr/cpu/onednn_conv.py): jaxclr_onednn_conv2d: "
      "ResourceExhaustedError: OOM when allocating tensor with "
      "shape[4,6,6,5]; --config.model.conv_library=xla turns that path off"]
  # The handler's traceback, at INFO.
  assert any(r.levelname == "INFO" and r.exc_info and "_raising_conv2d" in
             "".join(traceback.format_exception(*r.exc_info))
             for r in caplog.records)


def test_an_ffi_runtime_the_structs_do_not_fit_ends_the_job_in_one_line(
    monkeypatch, capsys):
  monkeypatch.setattr(python_ffi, "_REGISTERED", {})  # Register anew.
  monkeypatch.setattr(python_ffi, "_runtime_version", lambda frame: (1, 0))
  status, err = _job_edge(capsys, _onednn_step)
  assert status == errors.EXIT_USER_ERROR
  (line,) = err.splitlines()
  assert line.startswith("jaxclr: error: jaxclr's oneDNN convolutions cannot "
                         "run on this jaxlib: FFI target "
                         "'jaxclr_onednn_conv2d' not registered")
  assert "XLA's FFI API is version 1.0" in line
  assert line.endswith("--config.model.conv_library=xla turns them off")


def test_other_errors_keep_their_traceback():
  """Control: an error that is not our custom call's (another FFI
  target's included) is not turned into a user error."""
  def failing(inputs, outputs, attrs):
    del inputs, outputs, attrs
    raise ValueError("not jaxclr/cpu's")

  python_ffi.register("jaxclr_test_door_failing", failing)
  fn = jax.jit(lambda x: jax.ffi.ffi_call(
      "jaxclr_test_door_failing", jax.ShapeDtypeStruct(x.shape, x.dtype))(x))
  with pytest.raises(jax.errors.JaxRuntimeError, match="not jaxclr/cpu's"):
    with cli.user_errors_exit():
      jax.block_until_ready(fn(jnp.ones(2)))
  with pytest.raises(RuntimeError, match="jaxclr_onednn_conv2d"):
    with cli.user_errors_exit():
      raise RuntimeError("No FFI handler registered for jaxclr_onednn_conv2d")
  assert cpu.describe_failure(KeyError("x")) is None


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


@pytest.mark.slow
def test_the_flag_takes_convolutions_out_of_ynnpack(tmp_path):
  """In the jaxlib installed: with the flag the compiled convolution is not
  a YNNPACK fusion, without it (where jaxlib measured slower) it is; both
  give the same convolution to float32 round-off, checked against a float64
  reference."""
  if versions.untested("jaxlib"):
    pytest.skip("the flag is added only on the jaxlib versions tested")
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
