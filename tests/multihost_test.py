"""Multi-process runs on 127.0.0.1: the same numbers as one process, bounded
failure when a peer dies, and layout errors before any compilation.

Each run is a real `python -m jaxclr.main` (or launch/local.sh) subprocess,
jax.distributed over gloo, with a tiny config on the synthetic dataset and on
the embedded default (digits). Both datasets give the same compiled programs
(same shapes, 10 classes), so the runs share the test session's persistent
compilation cache. Every subprocess has a timeout
and is killed in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclr.config import ConfigError
from jaxclr.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(REPO, "launch", "local.sh")
RUN_TIMEOUT_S = 900  # Per job; compilation on a loaded 2-core machine is slow.
DEAD_PEER_BOUND_S = 60

TINY = [
    "--config", os.path.join(REPO, "configs", "default.py"),
    "--config.dataset=synthetic", "--config.synthetic.num_examples=64",
    "--config.synthetic.num_classes=10", "--config.model.width_multiplier=0.125",
    "--config.image_size=8", "--config.batch_size=16",
    "--config.num_train_steps=3", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=100",
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices_per_process: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                      f"{devices_per_process}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  cache = jax.config.jax_compilation_cache_dir
  if cache:  # Reuse the session's persistent cache (see conftest.py).
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env


def start(args, env, log_path) -> subprocess.Popen:
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  # Own process group, so that killing it also stops local.sh's children.
  return subprocess.Popen(args, env=env, cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen):
  if proc.poll() is None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
  with contextlib.suppress(subprocess.TimeoutExpired):
    proc.wait(timeout=10)


def wait_all(procs: dict[str, subprocess.Popen], timeout: float):
  deadline = time.monotonic() + timeout
  for name, p in procs.items():
    try:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      raise AssertionError(f"{name} did not finish within {timeout} s") from None


def read_log(path: str, tail: int = 6000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-tail:]


def jaxclr_cmd(*extra: str) -> list[str]:
  return [sys.executable, "-m", "jaxclr.main", *TINY, *extra]


def load_final_state(workdir: str, item: str = "state"
                     ) -> dict[str, np.ndarray]:
  """The newest checkpoint's `item` as host arrays, keyed by tree path."""
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  path = os.path.join(workdir, "checkpoints", str(steps[-1]), item)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
    state = ckptr.restore(path, abstract)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}


def load_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_layouts(dataset: str, *extra: str, single=(("1x8", 8), ("1x1", 1))):
  """The tiny run on `dataset` as 2 processes x 4 devices and as each
  one-process layout of `single`, concurrently; yields (root, {layout:
  workdir})."""
  root = tempfile.mkdtemp(prefix=f"jaxclr_multihost_{dataset}_")
  dirs = {k: os.path.join(root, k) for k in ["2x4"] + [n for n, _ in single]}
  args = [*TINY, f"--config.dataset={dataset}", *extra]
  env = child_env(4)
  env["PYTHON"] = sys.executable
  env["JAXCLR_PORT"] = str(free_port())
  procs = {}
  t0 = time.monotonic()
  try:
    procs["2x4"] = start(["bash", LOCAL_SH, "2", "4", *args,
                          f"--workdir={dirs['2x4']}"], env,
                         os.path.join(root, "2x4.log"))
    for name, n in single:
      # The convolutions every layout computes the same way: 'auto' would
      # give the one-device run the per-tap kernel gradient
      # (jaxclr/models/conv.py) and oneDNN's kernels (onednn_conv.py),
      # equal to XLA's only to round-off, which can flip a kNN neighbour;
      # this compares layouts, conv_test / onednn_conv_test the forms.
      same_form = (["--config.model.conv_kernel_grad=xla",
                    "--config.model.conv_library=xla"] if n == 1 else [])
      procs[name] = start(
          [sys.executable, "-m", "jaxclr.main", *args, *same_form,
           f"--workdir={dirs[name]}"], child_env(n),
          os.path.join(root, f"{name}.log"))
    wait_all(procs, RUN_TIMEOUT_S)
    for name, p in procs.items():
      assert p.returncode == 0, (
          f"{name} failed ({p.returncode}):\n"
          + read_log(os.path.join(root, f"{name}.log")))
    print(f"{dataset} layout runs took {time.monotonic() - t0:.0f} s")
    yield root, dirs
  finally:
    for p in procs.values():
      kill_group(p)


@pytest.fixture(scope="module")
def layout_runs():
  yield from run_layouts("synthetic")


@pytest.fixture(scope="module")
def digits_layout_runs(layout_runs):
  del layout_runs  # After it: its compiled programs are in the cache.
  # With the periodic kNN at the last step: features all-gathered from every
  # process's slice of the eval batches, the bank sharded over all devices.
  yield from run_layouts("digits", "--config.eval_every_steps=3")


def test_plan_reads_flags_then_env_and_binds_loopback():
  env = {"JAXCLR_COORDINATOR_ADDRESS": "127.0.0.1:1234",
         "JAXCLR_NUM_PROCESSES": "4", "JAXCLR_PROCESS_ID": "2"}
  p = distributed.plan(environ=env)
  assert (p.coordinator_address, p.num_processes, p.process_id) == (
      "127.0.0.1:1234", 4, 2)
  assert p.coordinator_bind_address == "127.0.0.1:1234"  # Not [::]:1234.
  assert p.initialization_timeout <= 60 and p.heartbeat_timeout_seconds <= 60
  p = distributed.plan(process_id=3, environ=env)  # Flags win over env.
  assert p.process_id == 3
  p = distributed.plan(coordinator_address="10.0.0.1:99", num_processes=2,
                       process_id=0, environ={})
  assert p.coordinator_bind_address is None  # Real hosts: JAX's default.
  assert distributed.plan(mode="off", environ=env) is None
  assert distributed.plan(environ={}) is None
  assert distributed.plan(num_processes=1, environ={}) is None


def test_plan_detects_launchers_and_leaves_values_to_jax():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "16"}
  p = distributed.plan(environ=slurm)
  assert p is not None and "SLURM" in p.reason
  assert (p.coordinator_address, p.num_processes, p.process_id) == (
      None, None, None)
  assert distributed.plan(environ={**slurm, "SLURM_NTASKS": "1"}) is None
  assert distributed.plan(environ={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://x:1",
                                   "OMPI_COMM_WORLD_SIZE": "2"}) is not None
  assert "Cloud TPU" in distributed.plan(environ={}, cloud_tpu_vm=True).reason


@pytest.mark.parametrize("kwargs, env, needle", [
    (dict(num_processes=2), {}, "--coordinator_address, --process_id"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
     {}, "--process_id=2 must be in [0, num_processes=2)"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0),
     {}, "must be host:port"),
    (dict(mode="on"), {}, "nothing describes the job"),
    (dict(mode="sometimes"), {}, "valid: auto, on, off"),
    (dict(), {"JAXCLR_NUM_PROCESSES": "two"}, "JAXCLR_NUM_PROCESSES='two'"),
])
def test_plan_rejects_incomplete_or_bad_layouts(kwargs, env, needle):
  with pytest.raises(ConfigError) as e:
    distributed.plan(environ=env, **kwargs)
  assert needle in str(e.value)


def assert_layouts_agree(dirs):
  """2x4 == each other layout in dirs (1x8, 1x1): metrics per step and every
  array of the final state.

  Returns the training records; evaluation records (periodic kNN) must be
  identical across layouts too."""
  records = {k: load_metrics(d) for k, d in dirs.items()}
  evals = {k: [r for r in v if "loss" not in r] for k, v in records.items()}
  assert all(evals[k] == evals["2x4"] for k in evals), evals
  metrics = {k: [r for r in v if "loss" in r] for k, v in records.items()}
  assert [m["step"] for m in metrics["2x4"]] == [1, 2, 3]
  timing = {"steps_per_sec", "images_per_sec"}
  others = [k for k in dirs if k != "2x4"]
  for other in others:
    assert [m["step"] for m in metrics[other]] == [1, 2, 3]
    for a, b in zip(metrics["2x4"], metrics[other]):
      assert set(a) == set(b)
      for k in set(a) - timing:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6,
                                   err_msg=f"{k} at step {a['step']}, {other}")
  states = {k: load_final_state(d) for k, d in dirs.items()}
  assert int(states["2x4"]["['step']"]) == 3
  worst = {}
  for other in others:
    assert set(states[other]) == set(states["2x4"])
    for k, a in states["2x4"].items():
      b = states[other][k]
      assert a.shape == b.shape and a.dtype == b.dtype, k
      if np.issubdtype(a.dtype, np.floating):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{k} 2x4 vs {other}")
        worst[other] = max(worst.get(other, 0.0),
                           float(np.max(np.abs(a - b), initial=0.0)))
      else:
        np.testing.assert_array_equal(a, b, err_msg=f"{k} 2x4 vs {other}")
  print(f"max |state difference| 2x4 vs {' / '.join(others)}: {worst}")
  return metrics


# Each method with state: its options for the tiny run, and the state part
# the comparison must include.
STATEFUL_METHODS = {
    "byol": (["--config.byol.predictor_hidden_dim=16"], "target"),
    "nnclr": (["--config.nnclr.predictor_hidden_dim=16",
               "--config.nnclr.queue_size=32"], "support"),
    "mocov2": (["--config.mocov2.queue_size=32"], "queue"),
    "mocov3": (["--config.mocov3.predictor_hidden_dim=16"], "target"),
}


@pytest.mark.slow  # Two processes and an 8-device one, per method.
@pytest.mark.parametrize("method", sorted(STATEFUL_METHODS))
def test_methods_with_state_on_two_processes_match_one(method):
  """BYOL's EMA target, NNCLR's support set and MoCo v2's queue (written
  from the global batch) and MoCo's momentum encoders are part of the state
  compared: the same on 2 processes as on one process with the same 8
  devices."""
  options, part = STATEFUL_METHODS[method]
  extra = [f"--config.method={method}", *options]
  runs = run_layouts("synthetic", *extra, single=(("1x8", 8),))
  _, dirs = next(runs)
  try:
    assert_layouts_agree(dirs)
    state = load_final_state(dirs["2x4"])
    assert any(k.startswith(f".{part}") or f"'{part}'" in k for k in state), (
        sorted(state)[:5])
  finally:
    runs.close()


@pytest.mark.slow
def test_two_processes_match_one_process(layout_runs):
  assert_layouts_agree(layout_runs[1])


@pytest.mark.slow
def test_two_processes_match_one_process_on_digits(digits_layout_runs,
                                                   layout_runs):
  """The embedded default: each process reads its own slice of the real
  digits images, and the global batches still come out the same."""
  metrics = assert_layouts_agree(digits_layout_runs[1])
  knn = [r for r in load_metrics(digits_layout_runs[1]["2x4"])
         if "eval/knn_top1" in r]
  assert [r["step"] for r in knn] == [3], knn
  assert 0.1 < knn[0]["eval/knn_top1"] <= 1.0  # Chance is 0.1.
  synthetic = load_metrics(layout_runs[1]["1x1"])
  # Really different data: the losses are not the synthetic run's.
  assert metrics["1x1"][0]["loss"] != synthetic[0]["loss"]


EVAL_JOBS = {
    # Paper protocol for 4 steps (1347 x 0.6 // 256 + 1; labelled_batches per
    # process), the few-label
    # L-BFGS probes and the kNN on the all-gathered features.
    "linear_eval": ["--config",
                    os.path.join(REPO, "configs", "linear_eval.py") +
                    ":protocol=paper", "--config.num_epochs=0.6",
                    "--config.labels_per_class=(1, 5)",
                    "--config.num_label_draws=2"],
    # All layers on 5 labels per class, 3 steps, BN over the global batch.
    "finetune": ["--config",
                 os.path.join(REPO, "configs", "finetune.py") + ":per_class=5",
                 "--config.num_train_steps=3", "--config.eval_batch_size=64"],
}


@pytest.fixture(scope="module")
def eval_layout_runs(digits_layout_runs):
  """Both evaluation jobs on the digits run's 1x8 checkpoint, as 2 processes
  x 4 devices (launch/local.sh, JAXCLR_MODULE) and as 1 x 8, concurrently;
  yields {job: {layout: OUT}}."""
  root, pretrain_dirs = digits_layout_runs
  pretrained = f"--config.pretrained_workdir={pretrain_dirs['1x8']}"
  outs, procs = {}, {}
  t0 = time.monotonic()
  try:
    for job, args in EVAL_JOBS.items():
      outs[job] = {k: os.path.join(root, f"{job}_{k}") for k in ("2x4", "1x8")}
      env = {**child_env(4), "PYTHON": sys.executable,
             "JAXCLR_PORT": str(free_port()),
             "JAXCLR_MODULE": f"jaxclr.{job}"}
      procs[f"{job} 2x4"] = start(
          ["bash", LOCAL_SH, "2", "4", *args, pretrained,
           f"--workdir={outs[job]['2x4']}"], env,
          os.path.join(root, f"{job}_2x4.log"))
      procs[f"{job} 1x8"] = start(
          [sys.executable, "-m", f"jaxclr.{job}", *args, pretrained,
           f"--workdir={outs[job]['1x8']}"], child_env(8),
          os.path.join(root, f"{job}_1x8.log"))
    wait_all(procs, RUN_TIMEOUT_S)
    for name, p in procs.items():
      log = os.path.join(root, name.replace(" ", "_") + ".log")
      assert p.returncode == 0, f"{name} failed ({p.returncode}):\n" + \
          read_log(log)
    print(f"evaluation layout runs took {time.monotonic() - t0:.0f} s")
    yield outs
  finally:
    for p in procs.values():
      kill_group(p)


def load_results(out: str) -> dict:
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_linear_eval_on_two_processes_matches_one(eval_layout_runs):
  """Features, paper-protocol head, few-label probes and kNN: 2x4 == 1x8."""
  dirs = eval_layout_runs["linear_eval"]
  a, b = (load_results(dirs[k]) for k in ("2x4", "1x8"))
  assert a["num_train_examples"] == b["num_train_examples"] == 1347
  assert a["num_eval_examples"] == b["num_eval_examples"] == 450
  assert a["paper"]["steps"] == 1347 * 0.6 // 256 + 1 == 4
  assert set(a["few_label_top1"]) == {"1", "5"}
  for key in ("top1", "top5", "knn_top1", "few_label_top1",
              "few_label_top1_std"):
    assert a[key] == b[key], (key, a[key], b[key])
  heads = [load_final_state(dirs[k]) for k in ("2x4", "1x8")]
  assert int(heads[0]["['step']"]) == 4
  for k, x in heads[0].items():
    np.testing.assert_allclose(x, heads[1][k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
  # Process 0 alone writes: one results.json, one TensorBoard writer.
  names = [sorted("events" if f.startswith("events.out") else f
                  for f in os.listdir(dirs[k])) for k in ("2x4", "1x8")]
  assert names[0] == names[1] and names[0].count("events") == 1, names


@pytest.mark.slow
def test_finetune_on_two_processes_matches_one(eval_layout_runs):
  """All layers fine-tuned with BN over the global batch: the same state and
  accuracy from 2 processes x 4 devices as from 1 x 8."""
  dirs = eval_layout_runs["finetune"]
  a, b = (load_results(dirs[k]) for k in ("2x4", "1x8"))
  assert a["steps"] == b["steps"] == 3 and a["num_labelled_examples"] == 50
  assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
  states = [load_final_state(dirs[k]) for k in ("2x4", "1x8")]
  assert set(states[0]) == set(states[1])
  for k, x in states[0].items():
    np.testing.assert_allclose(x, states[1][k], rtol=1e-4, atol=1e-5,
                               err_msg=k)


@pytest.mark.slow
def test_only_process_zero_writes(layout_runs):
  root, dirs = layout_runs
  log = read_log(os.path.join(root, "2x4.log"), tail=10**7)
  # The step lines and the start-up summary: console logging is per process,
  # but metric lines come from process 0 only.
  assert "[0] " in log and "[1] " in log
  assert any(line.startswith("[0] ") and "step 3/3" in line
             for line in log.splitlines())
  assert not any(line.startswith("[1] ") and "step 3/3" in line
                 for line in log.splitlines())
  summary = [line for line in log.splitlines() if "jaxclr pretraining:" in line]
  assert len(summary) >= 1
  assert ("2 process(es) x 4 device(s) (8 total, cpu); global batch 16 images"
          " = 8 per process = 2 per device" in summary[0])
  events = [f for f in os.listdir(dirs["2x4"]) if f.startswith("events.out")]
  assert len(events) == 1, events  # One TensorBoard writer: process 0's.
  assert len(load_metrics(dirs["2x4"])) == 3  # Not one record per process.


@pytest.mark.slow
def test_batch_not_dividing_is_rejected_before_compiling(tmp_path):
  """batch 12 over 2 processes x 4 devices: both exit 2, naming the numbers."""
  port = free_port()
  procs, logs = [], []
  t0 = time.monotonic()
  try:
    for i in range(2):
      logs.append(str(tmp_path / f"p{i}.log"))
      procs.append(start(jaxclr_cmd(
          f"--workdir={tmp_path / 'w'}", "--config.batch_size=12",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={i}"), child_env(4), logs[-1]))
    wait_all({f"process {i}": p for i, p in enumerate(procs)}, 240)
  finally:
    for p in procs:
      kill_group(p)
  for p, log in zip(procs, logs):
    text = read_log(log)
    assert p.returncode == 2, text
    assert ("batch_size=12 must be divisible by the number of devices (8) "
            "and of processes (2)") in text, text
    assert "Traceback" not in text, text
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
  print(f"rejected in {time.monotonic() - t0:.0f} s (no compilation)")


@pytest.mark.slow
def test_dead_peer_stops_the_other_within_bound(tmp_path, layout_runs):
  """SIGKILL process 1 once the job is starting (compiling); process 0 must
  exit within DEAD_PEER_BOUND_S with status 6 and one line naming process 1
  (peer_loss_test.py kills mid-step and restarts)."""
  del layout_runs  # Only to reuse its compiled programs from the cache.
  port = free_port()
  workdir = tmp_path / "w"
  procs, logs = [], []
  try:
    for i in range(2):
      logs.append(str(tmp_path / f"p{i}.log"))
      procs.append(start(jaxclr_cmd(
          f"--workdir={workdir}", "--config.num_train_steps=3",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={i}"), child_env(4), logs[-1]))
    deadline = time.monotonic() + 300
    # Running: both joined, checked the layout and started the Orbax manager.
    while not ("jaxclr pretraining:" in read_log(logs[1], 10**6)
               and (workdir / "checkpoints").exists()):
      assert procs[0].poll() is None and procs[1].poll() is None, (
          read_log(logs[0]) + read_log(logs[1]))
      assert time.monotonic() < deadline, "job did not start"
      time.sleep(0.2)
    killed_at = time.monotonic()
    os.killpg(procs[1].pid, signal.SIGKILL)
    try:
      procs[0].wait(timeout=DEAD_PEER_BOUND_S + 30)
    except subprocess.TimeoutExpired:
      raise AssertionError("process 0 still running "
                           f"{DEAD_PEER_BOUND_S + 30} s after its peer died"
                           ) from None
    took = time.monotonic() - killed_at
  finally:
    for p in procs:
      kill_group(p)
  text = read_log(logs[0], 10**6)
  print(f"process 0 exited {procs[0].returncode} {took:.1f} s after its peer "
        "was killed")
  assert procs[0].returncode == 6, text[-3000:]  # errors.EXIT_PEER_LOST
  assert took <= DEAD_PEER_BOUND_S, text[-3000:]
  assert f"jaxclr: error: lost process 1 of 2 (host {socket.gethostname()}, " \
         f"pid {procs[1].pid}): " in text, text[-3000:]


@pytest.mark.slow
def test_unreachable_coordinator_fails_within_timeout(tmp_path):
  """Process 1 of 2 alone: it must give up (non-zero) instead of waiting."""
  env = {**child_env(1), "JAXCLR_INIT_TIMEOUT_S": "5"}
  proc = start(jaxclr_cmd(f"--workdir={tmp_path / 'w'}",
                          f"--coordinator_address=127.0.0.1:{free_port()}",
                          "--num_processes=2", "--process_id=1"),
               env, str(tmp_path / "p1.log"))
  t0 = time.monotonic()
  try:
    proc.wait(timeout=120)
  finally:
    kill_group(proc)
  took = time.monotonic() - t0
  text = read_log(str(tmp_path / "p1.log"))
  assert proc.returncode != 0, text
  assert "connect timeout 5 s" in text and "DEADLINE_EXCEEDED" in text, text
  assert took < DEAD_PEER_BOUND_S, took


# ---- launch scripts (no JAX, no cloud: fakes on PATH) ----

def write_exe(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return str(path)


def test_local_sh_stops_the_others_when_one_fails(tmp_path):
  """Fake python: process 1 exits 7; process 0 would sleep for 5 minutes."""
  fake = write_exe(tmp_path / "python", f"""#!/usr/bin/env bash
for a in "$@"; do case $a in --process_id=*) id=${{a#*=}};; esac; done
echo "$$" > {tmp_path}/pid$id
echo "args: $*"; echo "xla: $XLA_FLAGS"
if [[ $id == 1 ]]; then sleep 1; exit 7; fi
exec sleep 300
""")
  t0 = time.monotonic()
  out = subprocess.run(["bash", LOCAL_SH, "2", "3", "--config", "c.py",
                        "--workdir", "w d"],
                       env={**os.environ, "PYTHON": fake,
                            "JAXCLR_PORT": str(free_port())},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 7, out.stderr
  assert time.monotonic() - t0 < 30
  assert "process 1 exited with status 7" in out.stderr
  pid0 = int((tmp_path / "pid0").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid0, 0)  # Stopped, not left running.
  lines = out.stdout.splitlines()
  assert any(l.startswith("[0] args: -m jaxclr.main --coordinator_address="
                          "127.0.0.1:") and "--num_processes=2 --process_id=0"
             " --config c.py --workdir w d" in l for l in lines), lines
  # local.sh replaces the device count in the caller's XLA_FLAGS and keeps
  # the rest (here the suite's own, e.g. jaxclr/cpu/runtime.py's flag).
  xla = [l.split("xla:", 1)[1].split() for l in lines if l.startswith("[1] xla:")]
  assert xla and xla[0][-1] == "--xla_force_host_platform_device_count=3", lines
  assert not any(f.startswith("--xla_force_host_platform_device_count=")
                 for f in xla[0][:-1]), lines
  assert sorted(xla[0][:-1]) == sorted(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count=")), lines


def test_local_sh_usage_errors():
  for args in ([], ["0"], ["two"], ["2", "0", "--config", "c"]):
    out = subprocess.run(["bash", LOCAL_SH, *args], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr, args


def test_launch_scripts_run_the_chosen_job(tmp_path):
  """JAXCLR_MODULE picks the evaluation jobs; anything else is refused."""
  fake = write_exe(tmp_path / "python", '#!/usr/bin/env bash\necho "$*"\n')
  env = {**os.environ, "PYTHON": fake, "JAXCLR_PORT": str(free_port())}
  out = subprocess.run(["bash", LOCAL_SH, "2", "--config", "c.py"],
                       env={**env, "JAXCLR_MODULE": "jaxclr.linear_eval"},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert sorted(l.split(" --coordinator")[0] for l in out.stdout.splitlines()
                ) == ["[0] -m jaxclr.linear_eval", "[1] -m jaxclr.linear_eval"]
  tpu = os.path.join(REPO, "launch", "tpu_vm.sh")
  slurm = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
  for script in (LOCAL_SH, tpu, slurm):
    args = ["2"] if script == LOCAL_SH else ["--dry-run"] if script == tpu \
        else []
    out = subprocess.run(["bash", script, *args],
                         env={**env, **TPU_ENV, "JAXCLR_MODULE": "os"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, (script, out.stderr)
    assert "JAXCLR_MODULE=os; valid: jaxclr.main" in " ".join(
        out.stderr.split()), out.stderr
  out = subprocess.run(["bash", tpu, "--dry-run"],
                       env={**env, **TPU_ENV, "PATH": "/usr/bin:/bin",
                            "JAXCLR_MODULE": "jaxclr.finetune",
                            "CONFIG": "configs/finetune.py:1pct"},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert ("python3\\ -m\\ jaxclr.finetune\\ --distributed=on\\ --config\\ "
          "configs/finetune.py:1pct\\ --workdir") in out.stdout, out.stdout


TPU_ENV = {"TPU_NAME": "simclr", "ZONE": "us-central2-b",
           "ACCELERATOR_TYPE": "v4-32", "WORKDIR": "/mnt/shared/run"}


def test_tpu_vm_sh_requires_its_variables():
  env = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"),
                        "--dry-run"], env={**env, "ZONE": "z"},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 2
  assert "set TPU_NAME ACCELERATOR_TYPE WORKDIR" in out.stderr, out.stderr
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"),
                        "--dry-run"], env={**env, **TPU_ENV,
                                           "WORKDIR": "gs://b/run"},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 2 and "gs://b/run" in out.stderr


def test_tpu_vm_sh_dry_run_prints_the_whole_lifecycle():
  env = {**os.environ, **TPU_ENV, "PROJECT": "proj",
         "PATH": "/usr/bin:/bin"}  # No gcloud: a real call would fail.
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"),
                        "--dry-run", "--", "--config.batch_size=4096"],
                       env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  cmds = [l for l in out.stdout.splitlines() if l.startswith("+ ")]
  common = "--zone=us-central2-b --project=proj"
  assert cmds[0] == ("+ gcloud compute tpus tpu-vm create simclr " + common +
                     " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  assert cmds[1].startswith("+ git -C ") and " archive " in cmds[1]
  assert " scp " in cmds[2] and "simclr:jaxclr.tar.gz --worker=all" in cmds[2]
  assert cmds[3].startswith("+ gcloud compute tpus tpu-vm ssh simclr "
                            "--worker=all " + common + " --command=")
  assert "pip\\ install" in cmds[3] and "jax\\\\\\[tpu\\\\\\]" in cmds[3]
  assert cmds[4].startswith("+ gcloud compute tpus tpu-vm ssh simclr "
                            "--worker=all " + common + " --command=")
  assert ("python3\\ -m\\ jaxclr.main\\ --distributed=on\\ --config\\ "
          "configs/imagenet.py\\ --workdir\\ /mnt/shared/run\\ "
          "--config.batch_size=4096") in cmds[4]
  assert cmds[5] == ("+ gcloud compute tpus tpu-vm delete simclr " + common +
                     " --quiet")
  assert len(cmds) == 6


def test_slurm_sbatch_runs_srun_with_the_forwarded_flags(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "srun", '#!/usr/bin/env bash\necho "srun $*"\n')
  script = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  env.pop("WORKDIR", None)
  out = subprocess.run(["bash", script], env=env, capture_output=True,
                       text=True, timeout=30)
  assert out.returncode != 0 and "set WORKDIR" in out.stderr
  out = subprocess.run(["bash", script, "--config.batch_size=4096"],
                       env={**env, "WORKDIR": "/shared/r"},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == (
      "srun --kill-on-bad-exit=1 python -m jaxclr.main --config "
      "configs/imagenet.py --workdir /shared/r --config.batch_size=4096")
  out = subprocess.run(["bash", script],
                       env={**env, "WORKDIR": "/shared/e",
                            "JAXCLR_MODULE": "jaxclr.linear_eval",
                            "CONFIG": "configs/linear_eval.py:dataset=imagenet"},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == (
      "srun --kill-on-bad-exit=1 python -m jaxclr.linear_eval --config "
      "configs/linear_eval.py:dataset=imagenet --workdir /shared/e")
  with open(script) as f:
    header = f.read()
  for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8"):
    assert line in header
