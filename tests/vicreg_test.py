"""VICReg: the loss against a NumPy version of the authors' code (values and
gradients, globally and on 8 devices), its step on 1 and 8 devices, and the
negative control: the variance and covariance of each device's rows alone
fail that comparison. Its recipes hold the published values."""

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest

from jaxclr import config as config_lib, losses
from jaxclr.losses import vicreg
from jaxclr.parallel import sharding
from jaxclr.training.state import TrainState

import layout_util
import methods_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not the published 25 / 25 / 1: weights of one size let each term's
# gradient show in the comparison.
OPTIONS = {"invariance_weight": 2.0, "variance_weight": 3.0,
           "covariance_weight": 5.0}


def numpy_vicreg(x, y, sim_coeff, std_coeff, cov_coeff):
  """facebookresearch/vicreg `main_vicreg.py`, `VICReg.forward`, in float64
  on the gathered (global) batch: F.mse_loss, the unbiased variance
  (torch's x.var), eps 1e-4, the two hinges averaged, covariance over
  batch_size - 1, off-diagonal squares over num_features.
  Returns (loss, invariance, variance, covariance)."""
  n, d = x.shape
  repr_loss = np.mean((x - y) ** 2)
  x, y = x - x.mean(axis=0), y - y.mean(axis=0)
  std_x = np.sqrt(x.var(axis=0, ddof=1) + 0.0001)
  std_y = np.sqrt(y.var(axis=0, ddof=1) + 0.0001)
  std_loss = (np.mean(np.maximum(1 - std_x, 0)) / 2
              + np.mean(np.maximum(1 - std_y, 0)) / 2)
  off = ~np.eye(d, dtype=bool)
  cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
  cov_loss = np.sum(cov_x[off] ** 2) / d + np.sum(cov_y[off] ** 2) / d
  loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
  return loss, repr_loss, std_loss, cov_loss


def _numpy_options():
  return {"sim_coeff": OPTIONS["invariance_weight"],
          "std_coeff": OPTIONS["variance_weight"],
          "cov_coeff": OPTIONS["covariance_weight"]}


def random_views(seed=0, n=16, d=8):
  """Correlated views whose dimensions' stds straddle 1 (some inside the
  hinge, some outside), away from its kink."""
  rng = np.random.default_rng(seed)
  std = np.linspace(0.3, 1.8, d)
  std[np.abs(std - 1.0) < 0.15] = 0.6
  z1 = rng.normal(size=(n, d)) * std + rng.normal(size=d)
  z2 = 0.8 * z1 + 0.3 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  return z1.astype(np.float32), z2.astype(np.float32)


def global_loss(z1, z2):
  return vicreg.vicreg_with_metrics(z1, z2, None, axis_name=None, **OPTIONS)


def sharded_loss(z1, z2, mesh):
  return losses.sharded("vicreg", (z1, z2), mesh=mesh, options=OPTIONS)


def test_loss_equals_the_authors_formula_globally_and_on_8_devices():
  z1, z2 = random_views()
  want = numpy_vicreg(z1.astype(np.float64), z2.astype(np.float64),
                      **_numpy_options())
  mesh = sharding.make_mesh("explicit")
  for loss, metrics in (
      jax.jit(global_loss)(z1, z2),
      jax.jit(functools.partial(sharded_loss, mesh=mesh))(
          *(layout_util.put_sharded(z, mesh) for z in (z1, z2)))):
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    for key, value in zip(("vicreg_invariance", "vicreg_variance",
                           "vicreg_covariance"), want[1:]):
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
  assert 0 < want[2]  # Some dimensions are inside the variance hinge.


@pytest.mark.slow
def test_gradients_equal_the_float64_formula_globally_and_on_8_devices():
  z1, z2 = random_views(1)
  z1_64, z2_64 = z1.astype(np.float64), z2.astype(np.float64)
  want1 = layout_util.numeric_gradient(
      lambda x: numpy_vicreg(x, z2_64, **_numpy_options())[0], z1_64)
  want2 = layout_util.numeric_gradient(
      lambda x: numpy_vicreg(z1_64, x, **_numpy_options())[0], z2_64)
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


def test_each_term_vanishes_where_the_paper_says():
  """Identical views: no invariance cost. Unit-variance decorrelated
  dimensions (std >= 1): no variance or covariance cost. A collapsed view:
  the full hinge, mean relu(1 - sqrt(1e-4)) = 0.99."""
  rng = np.random.default_rng(2)
  n, d = 64, 8
  centred = rng.normal(size=(n, d))
  centred -= centred.mean(axis=0)
  q, _ = np.linalg.qr(centred)  # Orthonormal, zero-mean columns.
  z = (q * np.sqrt(n - 1) * 1.5).astype(np.float32)  # Std 1.5, cov 0.
  _, metrics = global_loss(z, z)
  assert float(metrics["vicreg_invariance"]) == 0.0
  assert float(metrics["vicreg_variance"]) == 0.0
  assert float(metrics["vicreg_covariance"]) < 1e-10
  collapsed = np.ones((n, d), np.float32)
  _, metrics = global_loss(collapsed, collapsed)
  np.testing.assert_allclose(metrics["vicreg_variance"], 0.99, rtol=1e-6)


def test_method_defaults_are_the_papers_and_bad_values_are_refused():
  config = methods_util.tiny_config(method="vicreg")
  assert (config.vicreg.invariance_weight, config.vicreg.variance_weight,
          config.vicreg.covariance_weight) == (25.0, 25.0, 1.0)
  config_lib.validate(config)
  bad = methods_util.tiny_config(method="vicreg",
                                 vicreg__variance_weight=-1.0)
  with pytest.raises(config_lib.ConfigError,
                     match=r"vicreg.variance_weight=-1.0 must be >= 0"):
    config_lib.validate(bad)


# ---- The step on 1 and 8 devices ----

def tiny_vicreg_config():
  # The authors' projector: no BN on z (its std is what the loss is about).
  return methods_util.tiny_config(method="vicreg",
                                  model__proj_output_norm="none")


METRICS = ("loss", "vicreg_invariance", "vicreg_variance",
           "vicreg_covariance", "probe_loss", "grad_norm")


@functools.lru_cache(maxsize=None)
def one_device_run():
  return layout_util.run_steps(tiny_vicreg_config(),
                               layout_util.one_device_mesh())


@pytest.mark.slow
def test_three_steps_on_8_devices_equal_one_device():
  ref = one_device_run()
  run = layout_util.run_steps(tiny_vicreg_config(),
                              sharding.make_mesh("explicit"))
  assert type(run[0]) is TrainState  # No extra state.
  assert "bn1" not in run[0].params["projection_head"]  # z is the Dense's.
  layout_util.assert_same_run(run, ref, METRICS)


def per_device_variance_and_covariance(z1, z2, labels, *, axis_name,
                                       invariance_weight, variance_weight,
                                       covariance_weight):
  """The planted bug: the variance and covariance of each device's rows
  (their mean over the devices), the invariance still global."""
  del labels
  invariance = vicreg.invariance_term(z1, z2, axis_name=axis_name)
  terms = [vicreg.variance_covariance_terms(z, axis_name=None)
           for z in (z1, z2)]
  variance = jax.lax.pmean(0.5 * (terms[0][0] + terms[1][0]), axis_name)
  covariance = jax.lax.pmean(terms[0][1] + terms[1][1], axis_name)
  loss = (invariance_weight * invariance + variance_weight * variance
          + covariance_weight * covariance)
  return loss, {"vicreg_invariance": invariance, "vicreg_variance": variance,
                "vicreg_covariance": covariance}


@pytest.mark.slow
def test_negative_control_per_device_variance_and_covariance_fail(
    monkeypatch):
  ref = one_device_run()
  buggy = dataclasses.replace(losses.get("vicreg"),
                              fn=per_device_variance_and_covariance)
  monkeypatch.setitem(losses._REGISTRY, "vicreg", buggy)  # pylint: disable=protected-access
  run = layout_util.run_steps(tiny_vicreg_config(),
                              sharding.make_mesh("explicit"))
  layout_util.assert_planted_bug_fails(run, ref, METRICS)


# ---- Recipes ----

def _load(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py"), arg)


def test_cifar_recipe_is_solo_learns():
  c = _load("vicreg")
  assert (c.method, c.optimizer, c.learning_rate, c.trust_coefficient,
          c.weight_decay, c.batch_size, c.num_epochs, c.warmup_epochs) == (
              "vicreg", "lars", 0.3, 0.02, 1e-4, 256, 1000, 10.0)
  assert (c.model.depth, c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim, c.model.proj_output_norm) == (
              18, 3, 2048, 2048, "none")
  assert tuple(c.augment.crop_area_range) == (0.2, 1.0)
  # solo-learn's 25 on the sum of the two views' hinges is 50 on their mean.
  assert (c.vicreg.invariance_weight, c.vicreg.variance_weight,
          c.vicreg.covariance_weight) == (25.0, 50.0, 1.0)


def test_imagenet_preset_is_the_papers():
  c = _load("imagenet", "method=vicreg")
  assert (c.method, c.batch_size, c.num_epochs, c.warmup_epochs,
          c.learning_rate, c.weight_decay, c.trust_coefficient) == (
              "vicreg", 2048, 1000, 10.0, 0.2, 1e-6, 1e-3)
  assert (c.model.depth, c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim, c.model.proj_output_norm) == (
              50, 3, 8192, 8192, "none")
  assert (c.vicreg.invariance_weight, c.vicreg.variance_weight,
          c.vicreg.covariance_weight) == (25.0, 25.0, 1.0)
