"""Barlow Twins: the loss against a NumPy version of the authors' code
(values and gradients, globally and on 8 devices), its step on 1 and 8
devices, and the negative control: standardising each device's rows alone
fails that comparison. Its recipes hold the published values."""

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest

from jaxclr import config as config_lib, losses
from jaxclr.losses import barlow_twins, batch_stats
from jaxclr.parallel import sharding
from jaxclr.training.state import TrainState

import layout_util
import methods_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"barlow_lambda": 0.05, "barlow_scale": 0.5}


def numpy_barlow_twins(z1, z2, lambd, scale):
  """facebookresearch/barlowtwins `main.py`, `BarlowTwins.forward`, in
  float64 on the whole batch: its self.bn is BatchNorm1d(affine=False) in
  training mode (biased variance, eps 1e-5), c = bn(z1)^T bn(z2) / N,
  loss = on_diag + lambd * off_diag, times a scale (solo-learn's
  `solo/losses/barlow.py` scale_loss; 1 in the authors' code).
  Returns (loss, on-diagonal sum, off-diagonal sum)."""
  def bn(z):
    return (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + 1e-5)
  c = bn(z1).T @ bn(z2) / z1.shape[0]
  on_diag = np.sum((np.diagonal(c) - 1.0) ** 2)
  off_diag = np.sum(c[~np.eye(c.shape[0], dtype=bool)] ** 2)
  return scale * (on_diag + lambd * off_diag), on_diag, off_diag


def random_views(seed=0, n=16, d=8):
  """Two correlated views with columns of different means and scales."""
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + rng.normal(
      size=d)
  z2 = z1 @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=(n, d))
  return z1.astype(np.float32), z2.astype(np.float32)


def global_loss(z1, z2, options=None):
  return barlow_twins.barlow_twins_with_metrics(
      z1, z2, None, axis_name=None, **(options or OPTIONS))


def sharded_loss(z1, z2, mesh, options=None):
  return losses.sharded("barlow_twins", (z1, z2), mesh=mesh,
                        options=options or OPTIONS)


def test_loss_equals_the_authors_formula_globally_and_on_8_devices():
  z1, z2 = random_views()
  want, on_diag, off_diag = numpy_barlow_twins(
      z1.astype(np.float64), z2.astype(np.float64), **_numpy_options())
  mesh = sharding.make_mesh("explicit")
  for loss, metrics in (
      jax.jit(global_loss)(z1, z2),
      jax.jit(functools.partial(sharded_loss, mesh=mesh))(
          *(layout_util.put_sharded(z, mesh) for z in (z1, z2)))):
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["bt_on_diagonal"], on_diag, rtol=1e-5)
    np.testing.assert_allclose(metrics["bt_off_diagonal"], off_diag,
                               rtol=1e-5)


def _numpy_options():
  return {"lambd": OPTIONS["barlow_lambda"], "scale": OPTIONS["barlow_scale"]}


@pytest.mark.slow
def test_gradients_equal_the_float64_formula_globally_and_on_8_devices():
  z1, z2 = random_views(1)
  z1_64, z2_64 = z1.astype(np.float64), z2.astype(np.float64)
  want1 = layout_util.numeric_gradient(
      lambda x: numpy_barlow_twins(x, z2_64, **_numpy_options())[0], z1_64)
  want2 = layout_util.numeric_gradient(
      lambda x: numpy_barlow_twins(z1_64, x, **_numpy_options())[0], z2_64)
  mesh = sharding.make_mesh("explicit")
  g_global = jax.grad(lambda a, b: global_loss(a, b)[0], argnums=(0, 1))(
      z1, z2)
  g_sharded = jax.jit(jax.grad(
      lambda a, b: sharded_loss(a, b, mesh)[0], argnums=(0, 1)))(
          layout_util.put_sharded(z1, mesh), layout_util.put_sharded(z2, mesh))
  for got1, got2 in (g_global, g_sharded):
    for got, want in ((got1, want1), (got2, want2)):
      np.testing.assert_allclose(got, want, rtol=2e-4,
                                 atol=2e-5 * np.abs(want).max())


def test_decorrelated_identical_views_cost_nothing():
  """Columns standardised and orthogonal over the batch, the same in both
  views: c is the identity (up to BN's epsilon), so the loss is ~0."""
  rng = np.random.default_rng(2)
  n, d = 32, 8
  centred = rng.normal(size=(n, d))
  centred -= centred.mean(axis=0)
  q, _ = np.linalg.qr(centred)  # Orthonormal columns, still zero-mean.
  z = (q * np.sqrt(n)).astype(np.float32)
  loss, metrics = global_loss(z, z)
  # c_ii = 1 / (1 + 1e-5): on-diagonal ~ d * 1e-10.
  assert float(metrics["bt_on_diagonal"]) < 1e-8
  assert float(metrics["bt_off_diagonal"]) < 1e-9
  assert float(loss) < 1e-8
  shuffled = rng.permutation(z)  # Same statistics, pairs broken: costly.
  assert float(global_loss(z, shuffled)[0]) > 1.0


def test_loss_ignores_each_dimension_s_offset_and_scale():
  z1, z2 = random_views(3)
  rng = np.random.default_rng(3)
  scale, offset = rng.uniform(0.1, 10.0, z1.shape[1]), rng.normal(
      size=z1.shape[1]) * 5
  np.testing.assert_allclose(
      global_loss((z1 * scale + offset).astype(np.float32), z2)[0],
      global_loss(z1, z2)[0], rtol=1e-4)


def test_method_defaults_are_the_authors_and_bad_values_are_refused():
  config = methods_util.tiny_config(method="barlow_twins")
  assert (config.barlow_twins.barlow_lambda,
          config.barlow_twins.barlow_scale) == (0.0051, 1.0)
  config_lib.validate(config)
  for field, value, message in (
      ("barlow_lambda", -0.1, "barlow_twins.barlow_lambda=-0.1 must be >= 0"),
      ("barlow_scale", 0.0, "barlow_twins.barlow_scale=0.0 must be > 0")):
    bad = methods_util.tiny_config(method="barlow_twins",
                                   **{f"barlow_twins__{field}": value})
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)


# ---- The step on 1 and 8 devices ----

def tiny_barlow_config():
  # The authors' projector: no BN on z (the loss standardises).
  return methods_util.tiny_config(method="barlow_twins",
                                  model__proj_output_norm="none")


METRICS = ("loss", "bt_on_diagonal", "bt_off_diagonal", "probe_loss",
           "grad_norm")


@functools.lru_cache(maxsize=None)
def one_device_run():
  return layout_util.run_steps(tiny_barlow_config(),
                               layout_util.one_device_mesh())


@pytest.mark.slow
def test_three_steps_on_8_devices_equal_one_device():
  ref = one_device_run()
  run = layout_util.run_steps(tiny_barlow_config(),
                              sharding.make_mesh("explicit"))
  assert type(run[0]) is TrainState  # No extra state.
  assert "bn1" not in run[0].params["projection_head"]  # z is the Dense's.
  layout_util.assert_same_run(run, ref, METRICS)


def per_device_standardisation(z1, z2, labels, *, axis_name, barlow_lambda,
                               barlow_scale):
  """The planted bug (solo-learn's local BatchNorm1d): each device
  standardises its own rows; the cross-correlation is still summed over
  the devices."""
  del labels
  eps = barlow_twins.STANDARDIZE_EPSILON
  z1n = batch_stats.standardized(z1, None, eps)
  z2n = batch_stats.standardized(z2, None, eps)
  c = batch_stats.cross_product(z1n, z2n, axis_name) / (
      batch_stats.global_count(z1, axis_name))
  on_diag, off_diag = barlow_twins.barlow_twins_terms(c)
  return barlow_scale * (on_diag + barlow_lambda * off_diag), {
      "bt_on_diagonal": on_diag, "bt_off_diagonal": off_diag}


@pytest.mark.slow
def test_negative_control_per_device_standardisation_fails(monkeypatch):
  ref = one_device_run()
  buggy = dataclasses.replace(losses.get("barlow_twins"),
                              fn=per_device_standardisation)
  monkeypatch.setitem(losses._REGISTRY, "barlow_twins", buggy)  # pylint: disable=protected-access
  run = layout_util.run_steps(tiny_barlow_config(),
                              sharding.make_mesh("explicit"))
  layout_util.assert_planted_bug_fails(run, ref, METRICS)


# ---- Recipes ----

def _load(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py"), arg)


def test_cifar_recipe_is_solo_learns():
  c = _load("barlow_twins")
  assert (c.method, c.optimizer, c.learning_rate, c.trust_coefficient,
          c.weight_decay, c.batch_size, c.num_epochs, c.warmup_epochs) == (
              "barlow_twins", "lars", 0.3, 0.02, 1e-4, 256, 1000, 10.0)
  assert (c.model.depth, c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim, c.model.proj_output_norm) == (
              18, 3, 2048, 2048, "none")
  assert (c.barlow_twins.barlow_lambda, c.barlow_twins.barlow_scale) == (
      0.0051, 0.1)


def test_imagenet_preset_is_the_authors_released_command():
  c = _load("imagenet", "method=barlow_twins")
  assert (c.method, c.batch_size, c.num_epochs, c.warmup_epochs,
          c.learning_rate, c.weight_decay, c.trust_coefficient) == (
              "barlow_twins", 2048, 1000, 10.0, 0.2, 1e-6, 1e-3)
  assert (c.model.depth, c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim, c.model.proj_output_norm) == (
              50, 3, 8192, 8192, "none")
  assert (c.barlow_twins.barlow_lambda, c.barlow_twins.barlow_scale) == (
      0.0051, 0.024)
  # Arguments given override the recipe's batch and epochs.
  c = _load("imagenet", "method=barlow_twins,batch=256,epochs=100")
  assert (c.batch_size, c.num_epochs) == (256, 100)
