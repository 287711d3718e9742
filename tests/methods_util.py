"""Shared pieces of the per-method tests (byol, nnclr, InfoNCE queue)."""

import os
import shutil

import jax
import numpy as np

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.parallel import sharding
from jaxclr.training import optim

import pretrain_test
import train_test


def tiny_config(steps=8, every=3, **fields):
  """configs/synthetic_tiny.py with `fields` set (dots for nested ones)."""
  c = config_lib.load_config_file(train_test.TINY_CONFIG,
                                  f"steps={steps},every={every}")
  for name, value in fields.items():
    *parents, leaf = name.split("__")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def make_trainer(config, mesh):
  src = input_pipeline.open_source(config_lib.data_spec(config), "train")
  info = input_pipeline.dataset_info(src)
  plan = optim.training_plan(config, info.num_train_examples)
  return pretrain.create_trainer(config, mesh, plan, info.num_classes), plan


def steps_with_projections(config, mesh, num_steps):
  """Runs num_steps steps; yields (state after, batch, z [B, 2, D] of the
  batch computed by the network the step started from)."""
  trainer, _ = make_trainer(config, mesh)
  spec = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      spec, input_pipeline.open_source(spec, "train"),
      batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  yield jax.device_get(state), None, None
  for _ in range(num_steps):
    batch = next(batches)
    before = jax.device_get(state)
    out = trainer.model.apply(
        {"params": before.params, "batch_stats": before.batch_stats},
        batch["images"].reshape((-1,) + batch["images"].shape[2:]),
        train=True, mutable=["batch_stats"])[0]
    z = np.asarray(out["z"]).reshape(config.batch_size, 2, -1)
    state, _ = trainer.step_fn(state, sharding.global_batch(mesh, batch))
    yield jax.device_get(state), batch, z


def assert_resume_is_bitwise(config, tmp_path):
  """Trains 4 steps with a checkpoint every 2, then again from step 2: the
  two step-4 states are equal bit for bit. Returns the resumed state."""
  workdir = str(tmp_path / "run")
  pretrain.run(config, workdir)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  pretrain.run(config, resumed)
  want, _, _ = pretrain_test.restore_state(config, workdir, step=4)
  got, _, _ = pretrain_test.restore_state(config, resumed, step=4)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  return got, workdir


def config_flags(config, base) -> list[str]:
  """--config.KEY=VALUE flags that turn `base` into `config` (scalar
  fields), for a `python -m jaxclr.main` child."""
  from jaxclr.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  want = workdir_lib.flatten(workdir_lib.config_to_dict(config))
  have = workdir_lib.flatten(workdir_lib.config_to_dict(base))
  flags = []
  for key, value in sorted(want.items()):
    if have.get(key) != value:
      assert not isinstance(value, (list, tuple, dict)), key
      flags.append(f"--config.{key}={value}")
  return flags


def assert_sigkill_resume_is_bitwise(config, tmp_path, kill_after=4):
  """Trains `config` (configs/synthetic_tiny.py plus fields) straight, in
  process; then runs it as `python -m jaxclr.main`, SIGKILLs the child once
  a checkpoint is committed and step `kill_after` is logged, and resumes
  in process: the last checkpoints of both runs are equal bit for bit
  (tests/reliability_test.py's SIGKILL test, for a method's extra state).
  Returns that checkpoint's state (a dict of arrays)."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import reliability_test  # pylint: disable=g-import-not-at-top
  from jaxclr.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  steps, every = config.num_train_steps, config.checkpoint_every_steps
  straight = str(tmp_path / "straight")
  pretrain.run(config, straight)
  arg = f"steps={steps},every={every}"
  base = config_lib.load_config_file(train_test.TINY_CONFIG, arg)
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "jaxclr.main", "--config",
         f"configs/synthetic_tiny.py:{arg}", "--workdir", workdir,
         *config_flags(config, base)]
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=reliability_test.REPO,
                            env=reliability_test.child_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    reliability_test.wait_for_step(proc, workdir, kill_after)
    deadline = time.time() + 300
    while not workdir_lib.checkpoint_steps(workdir):
      assert proc.poll() is None and time.time() < deadline, (
          (tmp_path / "killed.log").read_text()[-3000:])
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  resumed_from = max(workdir_lib.checkpoint_steps(workdir))
  assert 0 < resumed_from < steps
  pretrain.run(config, workdir)
  want = reliability_test.load_checkpoint(straight, steps)
  got = reliability_test.load_checkpoint(workdir, steps)
  reliability_test.assert_states_equal(got, want)
  return got
