"""MoCo v2 and v3: their losses against NumPy ports of the reference code,
the momentum schedules, each step's loss and queue computed independently
from the networks it starts from, the step on 1 vs 8 devices (and its
negative control: the method's global statistic taken per device), exact
resume from a checkpoint and after SIGKILL."""

import functools
import math
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxclr import config as config_lib, losses
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.methods import byol, mocov2, mocov3, nnclr
from jaxclr.models.simclr import build_model
from jaxclr.parallel import sharding
from jaxclr.training import update

import byol_test
import methods_util
import reliability_test
import train_test

TAU = 0.2


def tiny_mocov2_config(**arg):
  # A queue of 3 global batches of 16; m 0.5, so the key encoder moves.
  return methods_util.tiny_config(**{
      "method": "mocov2", "mocov2__queue_size": 48, "mocov2__tau_base": 0.5,
      "mocov2__tau_final": 0.5, **arg})


def tiny_mocov3_config(**arg):
  return methods_util.tiny_config(**{
      "method": "mocov3", "mocov3__predictor_hidden_dim": 32,
      "mocov3__tau_base": 0.5, "mocov3__temperature": TAU, **arg})


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_moco_v2(q, k, queue, tau):
  """facebookresearch/moco moco/builder.py, MoCo.forward after the encoders:
  l_pos = q.k, l_neg = q queue^T, logits / T, cross-entropy with target 0;
  q, k normalised (the queue is stored normalised)."""
  q, k = unit(q), unit(k)
  l_pos = np.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ np.asarray(queue, np.float64).T
  logits = np.concatenate([l_pos, l_neg], axis=1) / tau
  logits -= logits.max(axis=1, keepdims=True)
  return np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[:, 0])


def numpy_enqueue(queue, keys, ptr):
  """builder.py _dequeue_and_enqueue on the gathered keys (rows here, the
  reference stores columns): (queue, new ptr)."""
  queue = np.array(queue, np.float64)
  queue[ptr:ptr + len(keys)] = unit(keys)
  return queue, (ptr + len(keys)) % len(queue)


def numpy_moco_v3(q, k, tau, world_size):
  """facebookresearch/moco-v3 moco/builder.py, forward: on each of
  world_size ranks ctr_loss(q1, k2) + ctr_loss(q2, k1) of its rows against
  every rank's keys (concat_all_gather), labels arange(N) + N * rank, cross-
  entropy x 2T; DDP averages the ranks' gradients, so the objective is the
  mean of the per-rank losses. q, k: [B, 2, D]."""
  n = len(q) // world_size
  per_rank = []
  for rank in range(world_size):
    rows = slice(rank * n, (rank + 1) * n)
    total = 0.0
    for qv, kv in ((0, 1), (1, 0)):
      logits = unit(q[rows, qv]) @ unit(k[:, kv]).T / tau
      logits -= logits.max(axis=1, keepdims=True)
      logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
      labels = np.arange(n) + n * rank
      total += -np.mean(logp[np.arange(n), labels]) * 2 * tau
    per_rank.append(total)
  return np.mean(per_rank)


@functools.lru_cache(maxsize=None)
def mesh8():
  return sharding.make_mesh("explicit")


def put(x):
  return jax.device_put(x, sharding.batch_sharded(mesh8()))


def random_views(seed, n=16, d=8):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, 2, d)).astype(np.float32)
  # Each view's key is near the other view's query: non-trivial metrics.
  k = (q[:, ::-1] + 0.8 * rng.normal(size=(n, 2, d))).astype(np.float32)
  return q, k


def test_mocov2_loss_equals_the_reference_on_1_and_8_devices():
  q, k = random_views(0)
  queue = unit(np.random.default_rng(1).normal(size=(40, 8))).astype(
      np.float32)
  want = numpy_moco_v2(q[:, 0], k[:, 1], queue, TAU)
  fn = jax.jit(lambda a, b, c: mocov2.moco_loss(a, b, c, temperature=TAU))
  got, metrics = fn(q[:, 0], k[:, 1], queue)
  got8, metrics8 = fn(put(q[:, 0]), put(k[:, 1]), queue)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got8, want, rtol=1e-5)
  assert 0 < float(metrics["contrast_acc"]) < 1
  np.testing.assert_allclose(metrics8["contrast_acc"], metrics["contrast_acc"])
  # Gradients reach the queries only, the same on any layout.
  grad = jax.jit(jax.grad(lambda a, b: mocov2.moco_loss(
      a, b, queue, temperature=TAU)[0], argnums=(0, 1)))
  (g1, gk), (g8, _) = grad(q[:, 0], k[:, 1]), grad(put(q[:, 0]), put(k[:, 1]))
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-7)
  assert np.abs(g1).max() > 0 and not np.any(gk)


@pytest.mark.slow
def test_mocov3_loss_equals_the_reference_on_1_and_8_devices():
  q, k = random_views(2)
  want = numpy_moco_v3(q, k, TAU, world_size=8)
  # The mean of per-rank losses is the global batch's loss: also 1 rank.
  np.testing.assert_allclose(numpy_moco_v3(q, k, TAU, 1), want, rtol=1e-10)
  got, _ = jax.jit(functools.partial(mocov3.symmetric_loss,
                                     temperature=TAU))(q, k)
  sharded = jax.jit(functools.partial(mocov3.sharded_loss, mesh=mesh8(),
                                      temperature=TAU))
  got8, metrics8 = sharded(put(q), put(k))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got8, want, rtol=1e-5)
  assert 0 < float(metrics8["contrast_acc"]) < 1
  g1 = jax.grad(lambda a: mocov3.symmetric_loss(a, k, temperature=TAU)[0])(q)
  g8 = jax.jit(jax.grad(lambda a: sharded(a, put(k))[0]))(put(q))
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-7)


def test_momentum_schedules_are_the_references():
  total = 50
  for step in (0, 7, 25, 49, 50):
    # facebookresearch/moco-v3 main_moco.py adjust_moco_momentum (--moco-m
    # 0.99, --moco-m-cos), per step instead of per fractional epoch.
    want_v3 = 1 - 0.5 * (1 + math.cos(math.pi * step / total)) * (1 - 0.99)
    np.testing.assert_allclose(byol.target_tau(step, total, 0.99, 1.0),
                               want_v3, atol=1e-7)
    # vturrisi/solo-learn solo/utils/momentum.py MomentumUpdater.update_tau
    # (mocov2plus.yaml: 0.99 -> 0.999).
    want_v2plus = 0.999 - (0.999 - 0.99) * (
        math.cos(math.pi * step / total) + 1) / 2
    np.testing.assert_allclose(byol.target_tau(step, total, 0.99, 0.999),
                               want_v2plus, atol=1e-7)
    # MoCo v2: a constant m.
    np.testing.assert_allclose(byol.target_tau(step, total, 0.999, 0.999),
                               0.999, atol=1e-7)


def run_steps(config, mesh, num_steps):
  """Yields (state before, batch, state after, metrics) of num_steps steps."""
  trainer, _ = methods_util.make_trainer(config, mesh)
  spec = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      spec, input_pipeline.open_source(spec, "train"),
      batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  for _ in range(num_steps):
    batch = next(batches)
    before = jax.device_get(state)
    state, metrics = trainer.step_fn(state, sharding.global_batch(mesh, batch))
    yield before, batch, jax.device_get(state), jax.device_get(metrics)


def per_view_outputs(model, variables, batch):
  """The network's outputs [B, 2, ...] on the batch, BatchNorm per view."""
  inputs = update.flatten_views(update.images_as_float(batch["images"]))
  return jax.device_get(update.apply_network(model, variables, inputs,
                                             per_view_bn=True)[0])


def online(state):
  return {"params": state.params, "batch_stats": state.batch_stats}


@pytest.mark.slow
def test_mocov2_steps_follow_the_reference_and_the_queue_is_a_ring():
  """Each step's loss is the reference's on the queries of the online
  network and the keys of the key encoder it starts from, against the
  queue before the step; the queue then holds the global batch's keys at
  the reference's queue_ptr, so after 4 steps of a 3-batch ring it holds
  the keys of steps 2, 3, 4 (in ring order)."""
  config = tiny_mocov2_config()
  b = config.batch_size
  key_model = build_model(config, 0)
  queue, ptr = None, 0
  for step, (before, batch, after, metrics) in enumerate(
      run_steps(config, mesh8(), 4)):
    assert isinstance(before, mocov2.MocoV2TrainState)
    if queue is None:
      queue = np.asarray(before.queue[0], np.float64)
      np.testing.assert_allclose(np.linalg.norm(queue, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(before.queue[0], queue, rtol=1e-4, atol=1e-5)
    z = per_view_outputs(
        build_model(config, config.synthetic.num_classes), online(before),
        batch)["z"]
    keys = per_view_outputs(key_model, before.target, batch)["z"]
    np.testing.assert_allclose(
        metrics["loss"],
        numpy_moco_v2(z[:, 0], keys[:, 1], queue, config.mocov2.temperature),
        rtol=1e-4)
    queue, ptr = numpy_enqueue(queue, keys[:, 1], ptr)
    assert ptr == nnclr.write_offset(step + 1, 48, b)
  np.testing.assert_allclose(after.queue[0], queue, rtol=1e-4, atol=1e-5)
  assert float(metrics["moco_momentum"]) == pytest.approx(0.5)


@pytest.mark.slow  # Its own compilation on one device: tens of seconds.
def test_mocov2_symmetric_keeps_a_queue_per_direction():
  """symmetric=True (solo-learn's v2+): the loss is the mean of both
  directions' (queue[0] holds view-2 keys, queue[1] view-1 keys)."""
  config = tiny_mocov2_config(mocov2__symmetric=True)
  key_model = build_model(config, 0)
  (before, batch, after, metrics), = run_steps(
      config, sharding.make_mesh("explicit", jax.devices()[:1]), 1)
  z = per_view_outputs(build_model(config, config.synthetic.num_classes),
                       online(before), batch)["z"]
  keys = per_view_outputs(key_model, before.target, batch)["z"]
  tau = config.mocov2.temperature
  want = 0.5 * (numpy_moco_v2(z[:, 0], keys[:, 1], before.queue[0], tau) +
                numpy_moco_v2(z[:, 1], keys[:, 0], before.queue[1], tau))
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
  for d, kv in ((0, 1), (1, 0)):
    np.testing.assert_allclose(after.queue[d, :16], unit(keys[:, kv]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mocov3_steps_follow_the_reference():
  """Each step's loss is the reference's on the predictions of the online
  network and the keys of the momentum encoder it starts from; the
  momentum encoder then moves by the scheduled EMA."""
  config = tiny_mocov3_config()
  for step, (before, batch, after, metrics) in enumerate(
      run_steps(config, mesh8(), 2)):
    out = per_view_outputs(
        build_model(config, config.synthetic.num_classes,
                    config.mocov3.predictor_hidden_dim), online(before), batch)
    keys = per_view_outputs(build_model(config, 0), before.target, batch)["z"]
    np.testing.assert_allclose(
        metrics["loss"], numpy_moco_v3(out["p"], keys, TAU, world_size=8),
        rtol=1e-4)
    tau = 1 - 0.5 * (1 + math.cos(math.pi * step / 8)) * (1 - 0.5)
    assert float(metrics["moco_momentum"]) == pytest.approx(tau)
    moved = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, before.target,
                         byol.target_part(online(after)))
    for got, want in zip(jax.tree.leaves(after.target),
                         jax.tree.leaves(moved)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bad_moco_sections_are_refused_in_one_line():
  cases = [
      (tiny_mocov2_config(mocov2__queue_size=40),
       r"^mocov2.queue_size=40 must be a positive multiple of batch_size=16 "),
      (tiny_mocov2_config(mocov2__tau_base=0.9, mocov2__tau_final=0.5),
       r"^mocov2.tau_base=0.9, tau_final=0.5: need 0 <= tau_base <= "),
      (tiny_mocov3_config(mocov3__temperature=0.0),
       r"^mocov3.temperature=0.0 must be > 0$"),
      (tiny_mocov3_config(mocov3__tau_final=1.5),
       r"^mocov3.tau_base=0.5, tau_final=1.5: need"),
  ]
  for config, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(config)


# ---- 1 vs 8 devices, with negative controls ----

NUM_LAYOUT_STEPS = 3  # The queue is read on steps 2 and 3.


def layout_runs(config_fn, monkeypatch=None, bug=None):
  """(1-device result, 8-device result) of NUM_LAYOUT_STEPS steps; with
  bug=(module, name, replacement), the 8-device run has it planted."""
  monkeypatch.setattr(train_test, "NUM_STEPS", NUM_LAYOUT_STEPS)
  one = train_test.run_steps(config_fn(),
                             sharding.make_mesh("explicit", jax.devices()[:1]))
  if bug is not None:
    monkeypatch.setattr(*bug)
  eight = train_test.run_steps(config_fn(), mesh8())
  return one, eight


def extra_state_difference(state, ref_state):
  """Relative difference of the method's own state (target, queue)."""
  diffs = [train_test.relative_difference(train_test.flat_concat(
      state.target), train_test.flat_concat(ref_state.target))]
  if hasattr(state, "queue"):
    diffs.append(train_test.relative_difference(state.queue, ref_state.queue))
  return max(diffs)


def assert_same_run(result, ref):
  (state, metrics), (ref_state, ref_metrics) = result, ref
  strip = byol_test.without_predictor_mean
  if "predictor" in state.batch_stats:
    # The predictor's first BN mean is zero up to round-off (byol_test).
    state, ref_state = (s.replace(batch_stats=strip(s.batch_stats))
                        for s in (state, ref_state))
  train_test.assert_same_state(state, ref_state)
  assert extra_state_difference(state, ref_state) < (
      train_test.WHOLE_TREE_RTOL["params"])
  for key in ("loss", "contrast_acc", "probe_loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


def enqueue_local_keys(queue, keys, offset, *, mesh):
  """The classic bug: each device writes its own keys only (no gather), so
  the devices' queues differ and none holds the global batch."""
  def write(q, k, start):
    return lax.dynamic_update_slice(q, losses.l2_normalize(k), (start, 0))
  return jax.shard_map(write, mesh=mesh, in_specs=(P(), P("data"), P()),
                       out_specs=P(), check_vma=False)(queue, keys, offset)


def local_negatives(q, k, *, temperature, axis_name=None, _real=
                    mocov3.contrastive_loss):
  """The classic bug: each device contrasts its queries with its own keys."""
  loss, metrics = _real(q, k, temperature=temperature, axis_name=None)
  return lax.pmean((loss, metrics), axis_name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mocov3"])
def test_step_is_layout_invariant_and_the_negative_control_fails(
    method, monkeypatch):
  config_fn = {"mocov2": tiny_mocov2_config,
               "mocov3": tiny_mocov3_config}[method]
  bug = {"mocov2": (mocov2, "enqueue", enqueue_local_keys),
         "mocov3": (mocov3, "contrastive_loss", local_negatives)}[method]
  one, eight = layout_runs(config_fn, monkeypatch)
  assert_same_run(eight, one)
  _, buggy = layout_runs(config_fn, monkeypatch, bug)
  diff = train_test.relative_difference(
      train_test.flat_concat(buggy[0].params),
      train_test.flat_concat(one[0].params))
  assert diff > 100 * train_test.WHOLE_TREE_RTOL["params"], diff
  with pytest.raises(AssertionError):
    assert_same_run(buggy, one)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mocov3"])
def test_resume_is_bitwise_with_the_momentum_encoder_and_queue(method,
                                                               tmp_path):
  config_fn = {"mocov2": tiny_mocov2_config,
               "mocov3": tiny_mocov3_config}[method]
  state, _ = methods_util.assert_resume_is_bitwise(
      config_fn(steps=4, every=2), tmp_path)
  assert isinstance(state, byol.ByolTrainState)
  if method == "mocov2":
    assert isinstance(state, mocov2.MocoV2TrainState)


# ---- SIGKILL in the middle of a run, then resume ----

SIGKILL_OPTIONS = {
    "mocov2": {"mocov2.queue_size": 48, "mocov2.tau_base": 0.5,
               "mocov2.tau_final": 0.5},
    "mocov3": {"mocov3.predictor_hidden_dim": 32, "mocov3.tau_base": 0.5,
               "mocov3.temperature": TAU},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SIGKILL_OPTIONS))
def test_sigkill_then_resume_equals_the_uninterrupted_run(method, tmp_path):
  """`python -m jaxclr.main` killed (SIGKILL) at a random step after its
  first checkpoint, then resumed: the final state, momentum encoder and
  queue included, equals the uninterrupted run's bit for bit, and so does
  every step's loss (tests/reliability_test.py's SIGKILL test, for a method
  with state)."""
  steps, every = reliability_test.STEPS, reliability_test.EVERY
  options = {"method": method, **SIGKILL_OPTIONS[method]}
  config = methods_util.tiny_config(
      steps=steps, every=every,
      **{k.replace(".", "__"): v for k, v in options.items()})
  reference = str(tmp_path / "reference")
  pretrain.run(config, reference)
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "jaxclr.main", "--config",
         reliability_test.CONFIG_ARG, "--workdir", workdir,
         *(f"--config.{k}={v}" for k, v in options.items())]
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=reliability_test.REPO,
                            env=reliability_test.child_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    kill_after = random.Random(time.time_ns()).randint(every + 1, steps - 2)
    reliability_test.wait_for_step(proc, workdir, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  pretrain.run(config, workdir)
  final = reliability_test.load_checkpoint(workdir, steps)
  assert "target" in final and (method != "mocov2" or "queue" in final)
  reliability_test.assert_states_equal(
      final, reliability_test.load_checkpoint(reference, steps))
  assert (reliability_test.losses_by_step(workdir) ==
          reliability_test.losses_by_step(reference))
