"""SimSiam: the loss against a NumPy version of the authors' code (values
and gradients, globally and on 8 devices; no gradient through z), its step
on 1 and 8 devices, and the negative control: BatchNorm statistics of each
device's rows alone in the projector and predictor (SyncBatchNorm off)
fail that comparison. Its recipes hold the published values."""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.methods import simsiam
from jaxclr.models import heads
from jaxclr.parallel import sharding
from jaxclr.training.state import TrainState

import byol_test
import layout_util
import methods_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_simsiam(p, z):
  """facebookresearch/simsiam `main_simsiam.py`: loss = -(criterion(p1,
  z2).mean() + criterion(p2, z1).mean()) * 0.5 with criterion
  nn.CosineSimilarity(dim=1) (x.y / max(|x| |y|, 1e-8)), in float64.
  p, z: [B, 2, D]."""
  def cos(a, b):
    return np.sum(a * b, axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
  return -(cos(p[:, 0], z[:, 1]).mean() + cos(p[:, 1], z[:, 0]).mean()) * 0.5


def numpy_output_std(z):
  """The paper's collapse monitor (Fig. 2): std over the batch of the
  L2-normalised outputs, per dimension, averaged."""
  z = z.reshape(-1, z.shape[-1])
  unit = z / np.linalg.norm(z, axis=1, keepdims=True)
  return unit.std(axis=0).mean()


def random_outputs(seed=0, n=16, d=8):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 2, d))
  p = 0.7 * z[:, ::-1] + rng.normal(size=(n, 2, d))
  return p.astype(np.float32), z.astype(np.float32)


def test_loss_equals_the_authors_formula_globally_and_on_8_devices():
  p, z = random_outputs()
  want = numpy_simsiam(p.astype(np.float64), z.astype(np.float64))
  mesh = sharding.make_mesh("explicit")
  loss_fn = jax.jit(simsiam.simsiam_loss)
  for loss, metrics in (loss_fn(p, z), loss_fn(
      layout_util.put_sharded(p, mesh), layout_util.put_sharded(z, mesh))):
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["simsiam_output_std"],
                               numpy_output_std(z.astype(np.float64)),
                               rtol=1e-5)


def test_gradient_reaches_p_only_and_equals_the_float64_formula():
  p, z = random_outputs(1)
  z64 = z.astype(np.float64)
  want = layout_util.numeric_gradient(lambda x: numpy_simsiam(x, z64),
                                      p.astype(np.float64))
  mesh = sharding.make_mesh("explicit")

  def loss(p, z):
    return simsiam.simsiam_loss(p, z)[0]

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  for got_p, got_z in (grad_fn(p, z), grad_fn(
      layout_util.put_sharded(p, mesh), layout_util.put_sharded(z, mesh))):
    np.testing.assert_allclose(got_p, want, rtol=2e-4,
                               atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got_z, np.zeros_like(z))  # Stop-gradient.


def test_aligned_predictions_reach_minus_one_and_collapse_shows_in_the_std():
  p, z = random_outputs(2)
  loss, metrics = simsiam.simsiam_loss(3.0 * z[:, ::-1], z)
  np.testing.assert_allclose(loss, -1.0, rtol=1e-6)
  assert float(metrics["simsiam_output_std"]) > 0.1
  collapsed = np.broadcast_to(z[0, 0], z.shape)  # One output for all.
  _, metrics = simsiam.simsiam_loss(p, collapsed)
  assert float(metrics["simsiam_output_std"]) < 1e-6


def test_method_defaults_are_the_papers_and_bad_values_are_refused():
  config = methods_util.tiny_config(method="simsiam")
  assert config.simsiam.predictor_hidden_dim == 512
  config_lib.validate(config)
  bad = methods_util.tiny_config(method="simsiam",
                                 simsiam__predictor_hidden_dim=0)
  with pytest.raises(config_lib.ConfigError,
                     match=r"simsiam.predictor_hidden_dim=0 must be an int"):
    config_lib.validate(bad)


# ---- The step on 1 and 8 devices ----

def tiny_simsiam_config():
  # The authors' projector ends in BN without scale or offset.
  return methods_util.tiny_config(method="simsiam",
                                  simsiam__predictor_hidden_dim=32,
                                  model__proj_output_norm="bn_no_affine")


METRICS = ("loss", "simsiam_output_std", "probe_loss", "grad_norm")


def comparable(run):
  """The predictor's first BN mean is zero up to round-off, as BYOL's (z is
  centred by the projector's last BN): checked, then left out of the
  relative comparison (tests/byol_test.py)."""
  state, metrics = run
  assert np.abs(state.batch_stats["predictor"]["bn0"]["mean"]).max() < 1e-6
  return state.replace(batch_stats=byol_test.without_predictor_mean(
      state.batch_stats)), metrics


@functools.lru_cache(maxsize=None)
def one_device_run():
  return layout_util.run_steps(tiny_simsiam_config(),
                               layout_util.one_device_mesh())


@pytest.mark.slow
def test_three_steps_on_8_devices_equal_one_device():
  ref = one_device_run()
  run = layout_util.run_steps(tiny_simsiam_config(),
                              sharding.make_mesh("explicit"))
  assert type(run[0]) is TrainState  # No extra state, no momentum encoder.
  head = run[0].params["projection_head"]
  assert "bn1" not in head and "bn1" in run[0].batch_stats["projection_head"]
  layout_util.assert_same_run(comparable(run), comparable(ref), METRICS)


class PerDeviceBatchNorm(nn.Module):
  """The planted bug: BatchNorm normalising each device's rows by their own
  statistics (SyncBatchNorm off). The rows [2B] are (image, view) ordered
  and sharded by image, so device k holds the k-th of `groups` contiguous
  blocks. Same variables as nn.BatchNorm (scale, bias; mean, var)."""
  use_running_average: bool
  momentum: float
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  use_fast_variance: bool = False
  use_bias: bool = True
  use_scale: bool = True
  groups: int = 8

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (dim,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (dim,),
                           jnp.float32)
    if self.use_running_average:
      y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    else:
      # (init runs on a 2-image dummy: one block there.)
      groups = 1 if self.is_initializing() else self.groups
      blocks = x.reshape(groups, -1, dim)
      mean = blocks.mean(axis=1, keepdims=True)
      var = jnp.square(blocks - mean).mean(axis=1, keepdims=True)
      y = ((blocks - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(
          x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(axis=(0, 1))
        ra_var.value = m * ra_var.value + (1 - m) * var.mean(axis=(0, 1))
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (dim,),
                         self.param_dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (dim,),
                         self.param_dtype)
    return y.astype(self.dtype)


def per_device_batch_norm(train, momentum, epsilon, dtype):
  return functools.partial(PerDeviceBatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype)


@pytest.mark.slow
def test_negative_control_per_device_batch_norm_fails(monkeypatch):
  ref = one_device_run()
  # The projector's and predictor's BatchNorms (heads.py); the encoder's
  # stay global.
  monkeypatch.setattr(heads, "make_batch_norm", per_device_batch_norm)
  run = layout_util.run_steps(tiny_simsiam_config(),
                              sharding.make_mesh("explicit"))
  layout_util.assert_planted_bug_fails(run, ref, METRICS)


# ---- Recipes ----

def _load(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py"), arg)


def test_cifar_recipe_is_solo_learns():
  c = _load("simsiam")
  assert (c.method, c.optimizer, c.learning_rate, c.momentum,
          c.weight_decay, c.batch_size, c.num_epochs, c.warmup_epochs) == (
              "simsiam", "sgd", 0.5, 0.9, 1e-5, 256, 1000, 10.0)
  assert (c.model.depth, c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim, c.model.proj_output_norm) == (
              18, 3, 2048, 2048, "bn_no_affine")
  assert c.simsiam.predictor_hidden_dim == 512
  assert (c.augment.color_jitter_strength, c.augment.use_blur,
          c.augment.blur_prob) == (0.5, True, 0.5)


def test_imagenet_preset_is_the_papers():
  c = _load("imagenet", "method=simsiam")
  assert (c.method, c.batch_size, c.num_epochs, c.warmup_epochs,
          c.optimizer, c.learning_rate, c.momentum, c.weight_decay) == (
              "simsiam", 512, 100, 0.0, "sgd", 0.05, 0.9, 1e-4)
  assert (c.model.depth, c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim, c.model.proj_output_norm) == (
              50, 3, 2048, 2048, "bn_no_affine")
  assert c.simsiam.predictor_hidden_dim == 512
  assert tuple(c.augment.crop_area_range) == (0.2, 1.0)
  assert c.augment.color_jitter_strength == 0.5
