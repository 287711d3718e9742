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
import re
import resource
import shutil
import socket
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclr import cli, errors
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.training import (checkpoint, metrics, optim,
                             workdir as workdir_lib, workdir_lock)

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


@pytest.mark.slow
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
  # The lock is released on the way out (here through errors.Preempted).
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
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


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_equals_uninterrupted(reference,
                                                                 tmp_path,
                                                                 caplog):
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
  # SIGKILL left the lock; its process is gone, so the next run takes it.
  assert workdir_lock.read(os.path.join(workdir, workdir_lock.LOCK_FILE)
                           ).pid == proc.pid
  caplog.set_level("WARNING")
  pretrain.run(tiny_config(), workdir)
  assert "Took over the workdir lock" in caplog.text
  assert f"no process {proc.pid} is running" in caplog.text
  assert_states_equal(load_checkpoint(workdir, STEPS),
                      load_checkpoint(reference, STEPS))
  # Same data order and augmentation: every step's loss matches.
  assert losses_by_step(workdir) == losses_by_step(reference)


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"),
                                recursive=True) if os.path.isfile(f)
           and os.sep + "d" + os.sep in f]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- a save that fails ----

# Larger than metrics.jsonl, the event file and the child's log at 12 steps
# (< 40 kB together), smaller than every array file of a checkpoint.
FILE_SIZE_LIMIT = 256 * 1024


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "prlimit"),
                    reason="needs Linux prlimit")
def test_failed_save_stops_the_run_and_the_rerun_resumes(reference, tmp_path):
  """A real write error in the first save after the first checkpoint: once
  step 3 is committed, the running job's file-size limit drops below a
  checkpoint's array files, so the kernel refuses those writes (EFBIG, as a
  full disk gives ENOSPC; Python ignores SIGXFSZ). The job stops within
  two steps of that save, before the next one, with one line naming the
  checkpoint directory, the cause and the intact checkpoint, status 7; the
  rerun resumes from that checkpoint and ends bitwise where an
  uninterrupted run does."""
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  proc, log = start_main(workdir, tmp_path / "failing.log")
  wait_for_step(proc, workdir, EVERY + 1)
  while EVERY not in workdir_lib.checkpoint_steps(workdir):
    assert proc.poll() is None
    time.sleep(0.02)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                   (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
  rc = proc.wait(timeout=300)
  log.close()
  out = (tmp_path / "failing.log").read_text()
  assert rc == errors.EXIT_SAVE_FAILED, out[-3000:]
  at = out.find("Traceback")
  assert at < 0, out[max(0, at - 1500):at + 3000]
  lines = [l for l in out.splitlines() if l.startswith("jaxclr")]
  assert len(lines) == 1, lines
  found = re.fullmatch(
      r"jaxclr: error: could not save checkpoint (\d+) in (\S+) \((.+)\); "
      r"stopped at step (\d+)\. Committed checkpoints are untouched \(the "
      r"newest, (\S+), is intact\): .*", lines[0])
  assert found, lines[0]
  failed, where, cause, stopped, newest = found.groups()
  failed, stopped = int(failed), int(stopped)
  assert where == ckpt_dir and cause.startswith("File too large: "), lines[0]
  assert failed % EVERY == 0 and EVERY < failed < STEPS
  # As soon as the write failed: after a step (the per-step check, see the
  # next test) or at the latest at the next save, which waits for this one.
  assert failed <= stopped <= failed + EVERY, lines[0]
  print(f"save {failed} failed; stopped at step {stopped}")
  assert newest == os.path.join(ckpt_dir, str(failed - EVERY))
  committed = workdir_lib.checkpoint_steps(workdir)
  assert committed[-1] == failed - EVERY, committed
  # Orbax's old checkpoints are deleted only after a commit: all still here.
  assert committed == list(range(EVERY, failed, EVERY))[-3:], committed
  assert max(logged_steps(workdir)) == stopped
  proc, log = start_main(workdir, tmp_path / "rerun.log")
  rc = proc.wait(timeout=420)
  log.close()
  out = (tmp_path / "rerun.log").read_text()
  assert rc == 0, out[-3000:]
  assert f"Resumed from {newest} " in out
  assert "Incomplete checkpoint" in out  # The failed save's leftovers.
  assert_states_equal(load_checkpoint(workdir, STEPS),
                      load_checkpoint(reference, STEPS))
  assert losses_by_step(workdir) == losses_by_step(reference)


def test_failed_async_save_is_found_by_the_per_step_check(tmp_path):
  """CheckpointStore.raise_if_save_failed, which the loop calls after each
  step, raises a failed background write without another save (Orbax alone
  raises it at the next save) and never blocks: while the write runs, and
  after one that succeeded (the negative control), it returns."""
  store = checkpoint.CheckpointStore(tmp_path / "ckpt", max_to_keep=3)
  # ~1.2 MB of incompressible floats: larger than the limit below.
  state = {"w": jax.random.normal(jax.random.key(0), (300_000,))}

  def poll_until_done(at_step):
    deadline = time.monotonic() + 120
    while store.manager.is_saving_in_progress():
      store.raise_if_save_failed(at_step=at_step)
      assert time.monotonic() < deadline
      time.sleep(0.01)
    store.raise_if_save_failed(at_step=at_step)

  store.save(1, state, {"step": 1}, force=True)
  poll_until_done(at_step=2)  # Succeeds: no error.
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, hard))
  try:
    store.save(2, state, {"step": 2}, force=True)  # Returns; writes behind.
    with pytest.raises(errors.SaveError) as e:
      poll_until_done(at_step=3)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  message = str(e.value)
  assert message.startswith(f"could not save checkpoint 2 in {tmp_path}/ckpt "
                            "(File too large: ValueError: "), message
  assert "; stopped at step 3. " in message
  assert f"(the newest, {tmp_path}/ckpt/1, is intact)" in message
  store.close()
  assert checkpoint.CheckpointStore(tmp_path / "ckpt").all_steps() == [1]


# ---- the workdir lock ----

HOLD = ("import sys, time; from jaxclr.training import workdir_lock; "
        "workdir_lock.acquire(sys.argv[1]); print('held', flush=True); "
        "time.sleep(float(sys.argv[2])); {end}")


def start_holder(workdir, end="pass", seconds=600):
  """A process that takes the workdir's lock as a job does, then sleeps."""
  os.makedirs(workdir, exist_ok=True)
  proc = subprocess.Popen(
      [sys.executable, "-c", HOLD.format(end=end), workdir, str(seconds)],
      cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def lock_path(workdir):
  return os.path.join(workdir, workdir_lock.LOCK_FILE)


@pytest.mark.slow
def test_second_job_on_a_workdir_in_use_is_refused(tmp_path):
  """The command, on a workdir whose lock a live process holds: one line
  naming that process's host and pid, status 2, before any compilation and
  without writing into the workdir; the holder's lock is untouched."""
  workdir = str(tmp_path / "busy")
  holder = start_holder(workdir)
  try:
    before = open(lock_path(workdir)).read()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jaxclr.main", "--config", CONFIG_ARG,
         "--workdir", workdir], cwd=REPO, env=child_env(),
        capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxclr")]
    assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, lines
    assert (f"is in use by another jaxclr job (host {socket.gethostname()}, "
            f"pid {holder.pid}, running since ") in lines[0], lines[0]
    assert f"delete {lock_path(workdir)}" in lines[0]
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]
    assert open(lock_path(workdir)).read() == before
    print(f"refused in {time.monotonic() - t0:.1f} s")
    # In-process too, as errors.WorkdirBusy (what the CLI printed).
    with pytest.raises(errors.WorkdirBusy, match=f"pid {holder.pid}"):
      workdir_lib.prepare(workdir, tiny_config(), is_primary=True)
  finally:
    holder.kill()
    holder.wait()


def test_lock_is_released_at_exit_also_after_an_error(tmp_path):
  done = start_holder(str(tmp_path / "ok"), seconds=0)
  assert done.wait(timeout=60) == 0
  failed = start_holder(str(tmp_path / "failed"), seconds=0,
                        end="raise SystemExit('boom')")
  assert failed.wait(timeout=60) == 1
  for name in ("ok", "failed"):
    assert not os.path.exists(lock_path(str(tmp_path / name))), name


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
  """SIGKILLed holder (pid gone), a reboot (another boot id), a reused pid
  (a live pid whose process started later): each lock is taken over with a
  warning saying why. Negative controls: a live holder, and a holder on
  another host (its liveness is unknowable here), are refused."""
  caplog.set_level("WARNING")
  killed = start_holder(str(tmp_path / "killed"))
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  me = workdir_lock.this_process()
  live = start_holder(str(tmp_path / "live"))
  try:
    planted = {
        "rebooted": workdir_lock.Holder(**{**me.__dict__, "pid": live.pid,
                                           "boot_id": "another-boot"}),
        "reused": workdir_lock.Holder(**{**me.__dict__, "pid": live.pid,
                                         "process_start": "1"}),
        "elsewhere": workdir_lock.Holder(**{**me.__dict__,
                                            "host": "other-host"}),
    }
    for name, holder in planted.items():
      os.makedirs(tmp_path / name)
      with open(lock_path(str(tmp_path / name)), "w") as f:
        json.dump(holder.__dict__, f)
    reasons = {"killed": f"no process {killed.pid} is running",
               "rebooted": "its host has rebooted since",
               "reused": f"pid {live.pid} now belongs to a later process"}
    for name, reason in reasons.items():
      caplog.clear()
      lock = workdir_lock.acquire(str(tmp_path / name))
      assert lock.holder.pid == os.getpid()
      assert workdir_lock.read(lock_path(str(tmp_path / name))) == lock.holder
      assert "Took over the workdir lock" in caplog.text, name
      assert reason in caplog.text, (name, caplog.text)
      lock.release()
      assert not os.path.exists(lock_path(str(tmp_path / name)))
    for name, pid in (("live", live.pid), ("elsewhere", me.pid)):
      with pytest.raises(errors.WorkdirBusy, match=f"pid {pid}"):
        workdir_lock.acquire(str(tmp_path / name))
    assert workdir_lock.read(lock_path(str(tmp_path / "live"))).pid == live.pid
  finally:
    live.kill()
    live.wait()


def test_only_the_closed_loop_callbacks_of_a_failed_save_are_silenced():
  """cli's unraisable hook drops TensorStore's 'Event loop is closed'
  reports from loop.call_soon_threadsafe (each write finishing after a
  failed save closed its loop), and passes every other report on."""
  seen = []
  hook = cli._QuietClosedLoopCallbacks(seen.append)  # pylint: disable=protected-access

  def call_soon_threadsafe():
    raise RuntimeError("Event loop is closed")

  def other():
    raise RuntimeError("Event loop is closed")

  for fn in (call_soon_threadsafe, other, lambda: 1 / 0):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      hook(types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                 exc_traceback=e.__traceback__,
                                 err_msg=None, object=None))
  assert [type(u.exc_value).__name__ for u in seen] == [
      "RuntimeError", "ZeroDivisionError"]


def test_only_asyncios_report_of_an_orphaned_failed_write_is_silenced():
  """The console filter drops asyncio's 'exception was never retrieved'
  report of a TensorStore write error (the save's failure is already one
  line) and keeps asyncio's other reports and everyone else's."""
  import logging  # pylint: disable=g-import-not-at-top
  quiet = cli._QuietLibraries()  # pylint: disable=protected-access

  def record(name, msg, error):
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord(name, logging.ERROR, "/x/asyncio/base_events.py",
                             1, msg, (), exc_info)

  write_error = ValueError('OUT_OF_RANGE: Error writing "params.w/0" in '
                           "OCDBT database")
  orphan = "_GatheringFuture exception was never retrieved\nfuture: <...>"
  assert not quiet.filter(record("asyncio", orphan, write_error))
  assert quiet.filter(record("asyncio", orphan, ValueError("other")))
  assert quiet.filter(record("asyncio", "Task was destroyed", write_error))
  assert quiet.filter(record("jaxclr", orphan, write_error))


def test_truncate_jsonl_drops_later_records_and_a_cut_short_line(tmp_path):
  """A resumed run drops the records past its checkpoint, and a last line
  that a kill (or a full disk) cut short; whole records stay as written."""
  path = str(tmp_path / metrics.METRICS_FILE)
  whole = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
  with open(path, "w") as f:
    f.writelines(whole + [whole[0][:9]])  # '{"step": ' and nothing more.
  metrics.truncate_jsonl(path, last_step=2)
  with open(path) as f:
    assert f.read() == "".join(whole[:2])
