"""A one-device CPU job's step on every convolution path jaxclr/cpu can
give it (model.conv_library x model.conv_kernel_grad, float32 and
bfloat16), and the README's CPU-sized ImageNet config on one device, in
this process and as a job in a one-device process."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxclr import config as config_lib, cpu
from jaxclr.parallel import sharding

import multihost_test
import train_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = os.path.join(REPO, "configs", "imagenet.py")
PATHS = [(library, kernel_grad) for library in ("xla", "onednn")
         for kernel_grad in ("xla", "patches")]


@pytest.fixture
def one_device_mesh(monkeypatch):
  """A one-device mesh, and the jobs' convolution resolved for one device
  in all (jobs/pretrain.py asks jax.device_count(): 8 in this process), as
  in a one-device process."""
  resolve = cpu.job_convolution
  monkeypatch.setattr(cpu, "job_convolution", lambda model_config, **kw:
                      resolve(model_config, **{**kw, "num_devices": 1}))
  return sharding.make_mesh("explicit", jax.devices()[:1])


def _with(config, dtype, library, kernel_grad):
  config.model.update(compute_dtype=dtype, conv_library=library,
                      conv_kernel_grad=kernel_grad)
  return config


def _assert_finite(state, metrics):
  for leaf in jax.tree.leaves((state.params, state.batch_stats, metrics)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@functools.lru_cache(maxsize=None)
def _xla_result(dtype):
  """Two steps on XLA's convolutions, the reference for the CPU paths."""
  config = _with(train_test.tiny_config(), dtype, "xla", "xla")
  return train_test.run_steps(config,
                              sharding.make_mesh("explicit",
                                                 jax.devices()[:1]))


def test_auto_picks_among_the_paths_tested_here():
  """'auto' on one CPU device: oneDNN and the per-tap gradient for float32,
  XLA's for bfloat16 (jaxclr/cpu: resolve_library, resolve_kernel_grad)."""
  layout = dict(backend="cpu", num_devices=1)
  assert (cpu.resolve_library("auto", compute_dtype="float32", **layout),
          cpu.resolve_kernel_grad("auto", compute_dtype="float32",
                                  **layout)) == ("onednn", "patches")
  assert (cpu.resolve_library("auto", compute_dtype="bfloat16", **layout),
          cpu.resolve_kernel_grad("auto", compute_dtype="bfloat16",
                                  **layout)) == ("xla", "xla")
  assert {("onednn", "patches"), ("xla", "xla")} <= set(PATHS)


def _paths(dtype):
  """PATHS, the settings that build the same step as another setting
  marked slow: oneDNN takes every float32 convolution whatever the kernel
  gradient's setting, and no bfloat16 one (jaxclr/cpu: conv2d)."""
  same = {"float32": {("onednn", "xla")},
          "bfloat16": {("onednn", "xla"), ("onednn", "patches")}}[dtype]
  return [pytest.param(*p, marks=pytest.mark.slow) if p in same else p
          for p in PATHS]


@pytest.mark.slow
@pytest.mark.parametrize("library,kernel_grad", _paths("float32"))
def test_float32_step_on_each_path_equals_xlas(one_device_mesh, library,
                                               kernel_grad):
  """Two steps: finite, and equal to XLA's convolutions' to float32
  round-off (the tolerances of train_test's device-layout test, whose
  negative control is there: the same sums in another order)."""
  config = _with(train_test.tiny_config(), "float32", library, kernel_grad)
  state, metrics = train_test.run_steps(config, one_device_mesh)
  _assert_finite(state, metrics)
  ref_state, ref_metrics = _xla_result("float32")
  train_test.assert_same_state(state, ref_state)
  for key in ("loss", "contrast_acc", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("library,kernel_grad", _paths("bfloat16"))
def test_bfloat16_step_on_each_path(one_device_mesh, library, kernel_grad):
  """Two steps, finite (the per-tap kernel gradient's bfloat16 matmul is
  the one XLA:CPU refused: DotThunk BF16 x BF16 = F32)."""
  config = _with(train_test.tiny_config(), "bfloat16", library, kernel_grad)
  state, metrics = train_test.run_steps(config, one_device_mesh)
  assert int(state.step) == train_test.NUM_STEPS
  _assert_finite(state, metrics)


@pytest.mark.slow
def test_imagenet_tiny_on_one_device(one_device_mesh):
  """configs/imagenet.py:tiny (bfloat16, device colour and blur, uint8
  views, ImageNet stem), the README's CPU-sized config: its 'auto'
  convolutions on one device."""
  config = config_lib.load_config_file(IMAGENET, "tiny")
  assert config.model.compute_dtype == "bfloat16"
  assert cpu.job_convolution(config.model) is None  # XLA's, for bfloat16.
  state, metrics = train_test.run_steps(config, one_device_mesh)
  assert int(state.step) == train_test.NUM_STEPS
  _assert_finite(state, metrics)


@pytest.mark.slow
def test_imagenet_tiny_job_in_a_one_device_process(tmp_path):
  """The README's CPU-sized command, in a process with one CPU device."""
  env = multihost_test.child_env(1)
  env["XLA_FLAGS"] = ""  # One CPU device: XLA's default.
  proc = subprocess.run(
      [sys.executable, "-m", "jaxclr.main", f"--config={IMAGENET}:tiny",
       f"--workdir={tmp_path / 'w'}"], env=env, cwd=REPO,
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "XLA's convolutions (compute_dtype='bfloat16'" in proc.stderr
  assert os.path.isdir(tmp_path / "w" / "checkpoints" / "2")
