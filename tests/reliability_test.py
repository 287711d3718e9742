"""Preemption, exact resume after SIGTERM/SIGKILL, damaged checkpoints,
config mismatch, and the non-finite guard, on configs/synthetic_tiny.py.

Compiled programs: the base run (shared by the in-process runs, the NaN
runs, whose NaN comes in through the data, and, through the persistent
compilation cache, the `python -m jaxclr.main` subprocesses).
"""

import glob
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclr import cli
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.training import checkpoint, metrics, optim, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "synthetic_tiny", os.path.join(REPO, "configs", "synthetic_tiny.py"))
synthetic_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_tiny)
STEPS, EVERY = 12, 3
CONFIG_ARG = f"configs/synthetic_tiny.py:steps={STEPS},every={EVERY}"


def tiny_config(**overrides):
  c = synthetic_tiny.get_config(f"steps={STEPS},every={EVERY}")
  for k, v in overrides.items():
    c[k] = v
  return c


def child_env():
  """The child sees the test's 8 CPU devices and its compilation cache, so
  it compiles the base program at most once across the session."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def start_main(workdir, log_path):
  cmd = [sys.executable, "-m", "jaxclr.main", "--config", CONFIG_ARG,
         "--workdir", workdir]
  log = open(log_path, "w")
  return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log,
                          stderr=subprocess.STDOUT), log


def logged_steps(workdir):
  return [r["step"] for r in metrics.read_records(workdir)]


def wait_for_step(proc, workdir, step, timeout=420):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(s >= step for s in logged_steps(workdir)):
      return
    assert proc.poll() is None, f"child exited early with {proc.returncode}"
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f"step {step} not logged within {timeout}s")


def load_checkpoint(workdir, step):
  """The saved TrainState as a dict of arrays, read without any model code."""
  path = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR, str(step), "state")
  return jax.device_get(ocp.StandardCheckpointer().restore(path))


def assert_states_equal(a, b):
  """Bitwise: every leaf of two pytrees (states or parts of them)."""
  la, ta = jax.tree.flatten_with_path(a)
  lb, tb = jax.tree.flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def losses_by_step(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["total_loss"] for r in map(json.loads, f)
            if "total_loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  pretrain.run(tiny_config(), workdir)
  return workdir


def test_sigterm_saves_current_step_exits_4_and_rerun_resumes(reference,
                                                              tmp_path):
  workdir = str(tmp_path / "run")
  proc, log = start_main(workdir, tmp_path / "first.log")
  # Step 4 is past the first checkpoint (3), so the save must be a new one.
  wait_for_step(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=180)
  log.close()
  out = (tmp_path / "first.log").read_text()
  assert rc == cli.EXIT_PREEMPTED, out[-3000:]
  assert "Traceback" not in out
  saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
  assert 4 <= saved < STEPS
  # The step the loop had reached when the signal came, not the last
  # periodic one; committed (no temporary directory left behind).
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  assert saved in workdir_lib.checkpoint_steps(workdir)
  assert not glob.glob(os.path.join(ckpt_dir, f"*{checkpoint.TMP_SUFFIX}"))
  assert int(load_checkpoint(workdir, saved)["step"]) == saved
  # Re-running the same command resumes from it and finishes.
  proc, log = start_main(workdir, tmp_path / "second.log")
  rc = proc.wait(timeout=420)
  log.close()
  out = (tmp_path / "second.log").read_text()
  assert rc == 0, out[-3000:]
  assert f"Resumed from {ckpt_dir}/{saved}" in out
  assert_states_equal(load_checkpoint(workdir, STEPS),
                      load_checkpoint(reference, STEPS))


def test_sigkill_at_random_step_then_resume_equals_uninterrupted(reference,
                                                                 tmp_path):
  workdir = str(tmp_path / "run")
  kill_after = random.Random(time.time_ns()).randint(4, STEPS - 2)
  proc, log = start_main(workdir, tmp_path / "killed.log")
  wait_for_step(proc, workdir, kill_after)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  log.close()
  # A kill before the first save committed leaves no checkpoint: step 0.
  last_committed = max(workdir_lib.checkpoint_steps(workdir), default=0)
  assert last_committed <= max(logged_steps(workdir))
  # Saves are async: the checkpoint started at step kE commits in the
  # background, and the save at (k+1)E waits for it (step (k+1)E is logged
  # just before that save). So at most 2E logged steps are lost.
  assert max(logged_steps(workdir)) - last_committed <= 2 * EVERY
  pretrain.run(tiny_config(), workdir)
  assert_states_equal(load_checkpoint(workdir, STEPS),
                      load_checkpoint(reference, STEPS))
  # Same data order and augmentation: every step's loss matches.
  assert losses_by_step(workdir) == losses_by_step(reference)


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"),
                                recursive=True) if os.path.isfile(f)
           and os.sep + "d" + os.sep in f]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip_one_byte", "truncate"])
def test_damaged_latest_checkpoint_is_set_aside_and_previous_resumed(
    reference, tmp_path, damage, caplog):
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference, workdir)
  ckpts = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  target = _largest_data_file(os.path.join(ckpts, str(STEPS)))
  data = bytearray(open(target, "rb").read())
  if damage == "flip_one_byte":  # TensorStore reads this back silently.
    data[len(data) // 2] ^= 0x10
  else:
    data = data[:len(data) // 3]
  with open(target, "wb") as f:
    f.write(data)
  # An interrupted save (Orbax's temporary directory) is ignored too.
  os.makedirs(os.path.join(ckpts, f"{STEPS + 3}{checkpoint.TMP_SUFFIX}"))
  caplog.set_level("WARNING")
  pretrain.run(tiny_config(), workdir)
  text = caplog.text
  assert f"Checkpoint {ckpts}/{STEPS} cannot be restored" in text
  assert f"Resuming from {ckpts}/{STEPS - EVERY}" in text
  assert "Incomplete checkpoint" in text
  # Kept aside, not deleted; the step was redone and equals the original.
  aside = glob.glob(os.path.join(ckpts, f"{checkpoint.CORRUPT_PREFIX}{STEPS}_*"))
  assert len(aside) == 1 and os.path.isdir(aside[0])
  assert_states_equal(load_checkpoint(workdir, STEPS),
                      load_checkpoint(reference, STEPS))


def test_no_checkpoint_is_moved_when_none_restores(reference, tmp_path):
  """A changed model fails on every checkpoint: that is not corruption."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config = tiny_config(allow_config_mismatch=True)
  config.model.proj_out_dim = 8
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint in"):
    pretrain.run(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_config_mismatch_is_refused_listing_fields(reference, monkeypatch):
  monkeypatch.setattr(pretrain, "create_trainer", None)  # Fails if reached.
  config = tiny_config(batch_size=32, dataset="digits")
  config.model.depth = 34
  with pytest.raises(workdir_lib.WorkdirError) as e:
    pretrain.run(config, reference)
  message = str(e.value)
  assert "\n" not in message
  for diff in ("batch_size: 16 -> 32", "dataset: 'synthetic' -> 'digits'",
               "model.depth: 18 -> 34", "allow_config_mismatch=True"):
    assert diff in message
  # Cadence and schedule length may change without a refusal.
  workdir_lib.prepare(reference, tiny_config(log_every_steps=5),
                      is_primary=True)


def test_fields_added_after_a_run_started_do_not_block_its_resume(reference,
                                                                 tmp_path):
  """A config.json written before a field existed lacks it; resuming with the
  field at its default (the behaviour the run had) is allowed, with any
  other value it is a listed difference."""
  workdir = str(tmp_path / "old")
  shutil.copytree(reference, workdir)
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  assert saved["augment"].pop("transfer_dtype") == "float32"
  with open(path, "w") as f:
    json.dump(saved, f)
  workdir_lib.prepare(workdir, tiny_config(), is_primary=True)
  config = tiny_config()
  config.augment.transfer_dtype = "uint8"
  with pytest.raises(workdir_lib.WorkdirError,
                     match="augment.transfer_dtype: '<absent>' -> 'uint8'"):
    workdir_lib.prepare(workdir, config, is_primary=True)


def test_require_pretraining_workdir(reference, tmp_path):
  assert workdir_lib.require_pretraining_workdir(reference)["dataset"] == \
      "synthetic"
  with pytest.raises(workdir_lib.WorkdirError, match="does not exist"):
    workdir_lib.require_pretraining_workdir(str(tmp_path / "nope"))
  with pytest.raises(workdir_lib.WorkdirError,
                     match="not a jaxclr pretraining workdir"):
    workdir_lib.require_pretraining_workdir(str(tmp_path))


NAN_STEP = 5


def inject_nan_batch(monkeypatch, bad_step: int):
  """The batch of the update that produces `bad_step` becomes all NaN (the
  data path in, so the production step holds no test hook)."""
  real = input_pipeline.pretrain_batches

  def batches(*args, start_step, **kwargs):
    for step, b in enumerate(real(*args, start_step=start_step, **kwargs),
                             start_step):
      if step + 1 == bad_step:
        b = {**b, "images": np.full_like(b["images"], np.nan)}
      yield b

  monkeypatch.setattr(input_pipeline, "pretrain_batches", batches)


def test_injected_nan_stops_without_saving(tmp_path, monkeypatch):
  workdir = str(tmp_path / "nan")
  inject_nan_batch(monkeypatch, NAN_STEP)
  with pytest.raises(pretrain.NonFiniteError) as e:
    pretrain.run(tiny_config(), workdir)
  message = str(e.value)
  ckpts = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  assert (f"non-finite gradient in 1 update(s) between step {NAN_STEP - 1} "
          f"and step {NAN_STEP}") in message
  assert f"last good checkpoint: {ckpts}/3)" in message
  # Nothing at or after the bad step (the periodic save at 6 was refused).
  assert workdir_lib.checkpoint_steps(workdir) == [3]
  assert not glob.glob(os.path.join(ckpts, f"*{checkpoint.TMP_SUFFIX}"))
  # The bad step's record is logged (it shows the NaN), nothing after it.
  assert max(logged_steps(workdir)) == NAN_STEP
  assert np.isnan(losses_by_step(workdir)[NAN_STEP])


def _leaves(tree, keep=lambda path: True):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if keep(jax.tree_util.keystr(p))}


def test_skip_policy_skips_only_the_bad_update(tmp_path, monkeypatch):
  workdir = str(tmp_path / "skip")
  config = tiny_config(nonfinite_policy="skip", num_train_steps=NAN_STEP + 1,
                       checkpoint_every_steps=1)
  inject_nan_batch(monkeypatch, NAN_STEP)
  last = pretrain.run(config, workdir)
  assert last["skipped_updates"] == 1
  before, bad, after = (load_checkpoint(workdir, s)
                        for s in (NAN_STEP - 1, NAN_STEP, NAN_STEP + 1))
  assert int(bad["step"]) == NAN_STEP
  assert int(after["opt_state"]["total_notfinite"]) == 1
  momentum = lambda path: "trace" in path
  for a, b in ((before["params"], bad["params"]),
               (before["batch_stats"], bad["batch_stats"]),
               (_leaves(before["opt_state"], momentum),
                _leaves(bad["opt_state"], momentum))):
    assert_states_equal(a, b)  # The update was skipped...
  assert not np.array_equal(  # ...and training went on after it.
      jax.tree.leaves(bad["params"])[0], jax.tree.leaves(after["params"])[0])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after["params"]))
  # The update after the skip used the schedule at its own step, as logged
  # (an optimizer counting its own updates would lag one step behind).
  plan = optim.training_plan(config, config.synthetic.num_examples)
  schedule = optim.learning_rate_schedule(plan)
  applied = after["opt_state"]["inner_state"]["hyperparams"]["learning_rate"]
  assert float(applied) == pytest.approx(float(schedule(NAN_STEP)), rel=1e-6)
  assert float(schedule(NAN_STEP)) != pytest.approx(
      float(schedule(NAN_STEP - 1)), rel=1e-3)
  logged = {r["step"]: r["learning_rate"]
            for r in metrics.read_records(workdir) if "learning_rate" in r}
  assert logged[NAN_STEP + 1] == pytest.approx(float(applied), rel=1e-6)
