"""The method registry: a method defined here, outside jaxclr, registers
and trains through the pretraining job with no other file changed; the
config, validation, CLI and docs read the registry."""

import json
import os
import re
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib, errors, losses, methods
from jaxclr.data import input_pipeline
from jaxclr.parallel import sharding
from jaxclr.training import state as state_lib, update
from jaxclr.training.state import TrainState

import methods_util
import pretrain_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ToyState(TrainState):
  center: Any  # float32 [D]: a running mean of the global batch's z.


class ToyAlign(methods.Method):
  """Alignment of the two views' unit projections (Wang & Isola 2020's
  L_align, scaled by `weight`), with a running centre of z as extra state:
  a method as a user would write one."""
  name = "toy_align"
  summary = "alignment of the two views' unit projections (a test's method)"

  def defaults(self):
    return {"weight": 2.0, "center_momentum": 0.5}

  def check(self, opts, config):
    del config
    if not opts.weight > 0:
      raise errors.ConfigError(
          f"toy_align.weight={opts.weight!r} must be > 0")

  def init_state(self, opts, setup, rng):
    base = super().init_state(opts, setup, rng)
    return state_lib.extend(
        base, ToyState,
        center=jnp.zeros((setup.embedding_dim,), jnp.float32))

  def train_step(self, opts, setup, state, batch):
    def objective(views, inputs):
      del inputs
      z = losses.l2_normalize(views["z"])  # [B, 2, D]
      loss = opts.weight * jnp.mean(jnp.sum(
          jnp.square(z[:, 0] - z[:, 1]), axis=-1))
      return loss, {}, jnp.mean(views["z"], axis=(0, 1))

    new_state, metrics, batch_mean = update.model_update(
        state, batch, model=setup.model, optimizer=setup.optimizer,
        weight_decay=setup.weight_decay, objective=objective,
        augment_fn=setup.augment_fn)
    m = opts.center_momentum
    center = state_lib.where_applied(
        new_state.opt_state, m * state.center + (1.0 - m) * batch_mean,
        state.center)
    return new_state.replace(center=center), metrics


def reference_align(z, weight):
  """NumPy: weight * mean over images of |unit(z1) - unit(z2)|^2."""
  z = np.asarray(z, np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  return weight * np.mean(np.sum((z[:, 0] - z[:, 1]) ** 2, axis=-1))


@pytest.fixture
def toy_method():
  method = methods.register(ToyAlign())
  yield method
  methods.unregister(method.name)


def toy_config(steps=4, every=2, **fields):
  return methods_util.tiny_config(steps=steps, every=every, method="toy_align",
                                  **fields)


def test_a_registered_method_gets_a_config_section_and_validation(toy_method):
  config = toy_config()
  assert config.toy_align.to_dict() == {"weight": 2.0, "center_momentum": 0.5}
  config_lib.validate(config)
  method, opts = config_lib.method_options(config)
  assert method is toy_method and opts.weight == 2.0
  config.toy_align.weight = 0.0
  with pytest.raises(config_lib.ConfigError,
                     match=r"^toy_align.weight=0.0 must be > 0$"):
    config_lib.validate(config)
  # Its name cannot be taken twice, nor can it replace a config field.
  with pytest.raises(ValueError, match="name is taken"):
    methods.register(ToyAlign())
  clash = type("Clash", (ToyAlign,), {"name": "batch_size"})()
  methods.register(clash)
  try:
    with pytest.raises(ValueError, match="'batch_size' cannot have a config "
                       "section"):
      config_lib.pretrain_config()
  finally:
    methods.unregister("batch_size")


@pytest.mark.slow
def test_a_registered_method_steps_by_its_own_formula(toy_method):
  """The step the job builds from the registry: the logged loss is the
  method's formula on the projections of the network it started from, and
  its extra state moves as the method says."""
  del toy_method
  config = toy_config()
  mesh = sharding.make_mesh("explicit", jax.devices()[:1])
  trainer, _ = methods_util.make_trainer(config, mesh)
  spec = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      spec, input_pipeline.open_source(spec, "train"),
      batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  assert isinstance(state, ToyState)
  centre = np.zeros(config.model.proj_out_dim)
  for _ in range(2):
    batch = next(batches)
    before = jax.device_get(state)
    out = trainer.model.apply(
        {"params": before.params, "batch_stats": before.batch_stats},
        batch["images"].reshape((-1,) + batch["images"].shape[2:]),
        train=True, mutable=["batch_stats"])[0]
    z = np.asarray(out["z"]).reshape(config.batch_size, 2, -1)
    state, metrics = trainer.step_fn(state, sharding.global_batch(mesh, batch))
    np.testing.assert_allclose(metrics["loss"], reference_align(z, 2.0),
                               rtol=1e-5)
    centre = 0.5 * centre + 0.5 * z.mean(axis=(0, 1))
    np.testing.assert_allclose(state.center, centre, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_registered_method_trains_through_the_job_and_resumes_bitwise(
    toy_method, tmp_path):
  """pretrain.run, the function `python -m jaxclr.main` runs: four steps,
  a checkpoint every two, the extra state in it, and a resume from step 2
  that ends bitwise where the straight run did."""
  del toy_method
  config = toy_config()
  state, workdir = methods_util.assert_resume_is_bitwise(config, tmp_path)
  assert isinstance(state, ToyState) and np.any(state.center != 0)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["toy_align"] == {"weight": 2.0,
                                         "center_momentum": 0.5}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses_logged = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert len(losses_logged) == 4 and np.all(np.isfinite(losses_logged))


@pytest.mark.slow
def test_cli_refuses_an_unknown_method_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxclr.main",
       f"--config={pretrain_test.TINY_CONFIG}", "--config.method=moco",
       f"--workdir={tmp_path / 'w'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxclr:")]
  assert lines == ["jaxclr: error: method='moco' is unknown; valid: "
                   + ", ".join(methods.names())], proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_every_registered_method_validates_at_its_defaults():
  for name in methods.names():
    config = methods_util.tiny_config(method=name)
    config_lib.validate(config)
    method, opts = config_lib.method_options(config)
    assert set(opts) == set(method.defaults()), name
    assert method.summary and method.name == name


def test_the_docs_table_lists_every_method_and_loss():
  with open(os.path.join(REPO, "docs", "methods.md")) as f:
    text = f.read()
  rows = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
  assert set(methods.names()) <= rows, set(methods.names()) - rows
  assert set(losses.names()) <= rows, set(losses.names()) - rows


def test_no_method_or_loss_branch_outside_the_registries():
  """A new method needs no edit outside its own file: nothing else in
  jaxclr compares a method or loss name."""
  pattern = re.compile(r"method ==|method in \(|loss ==")
  found = []
  for root, _, files in os.walk(os.path.join(REPO, "jaxclr")):
    rel = os.path.relpath(root, REPO)
    if rel.startswith(("jaxclr/methods", "jaxclr/losses")):
      continue
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(root, name)) as f:
          for i, line in enumerate(f, 1):
            if pattern.search(line):
              found.append(f"{rel}/{name}:{i}")
  assert not found, found
