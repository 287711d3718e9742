"""SwAV: Sinkhorn-Knopp and the swapped-prediction loss against a NumPy
version of main_swav.py (distributed_sinkhorn with its all-reduces as sums
over ranks, each rank with its share of the queue), globally and on 8
devices, with per-device sums failing the tolerance; one step's wiring
(normalised and frozen prototypes, the queue); 1 = 8 devices over 3
multi-crop steps with the queue in use, and a planted per-device Sinkhorn
failing that test; exact resume after SIGKILL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.methods import prototypes, swav
from jaxclr.parallel import sharding

import dino_test
import methods_util
import train_test

NUM_STEPS = dino_test.NUM_STEPS


def tiny_swav_config(**fields):
  # 4 steps per epoch (64 examples, B=16): prototypes frozen for 2 steps;
  # a queue of 2 global batches written from step 0, so it joins Sinkhorn
  # at step 2, the third step.
  return methods_util.tiny_config(
      method="swav", swav__num_prototypes=32, swav__queue_size=32,
      swav__queue_start_epoch=0, swav__freeze_prototypes_epochs=0.5,
      augment__num_local_crops=2, augment__local_crop_size=4, **fields)


# ------------------------------------------------------------ the formula
def numpy_distributed_sinkhorn(outs, epsilon=0.05, iterations=3):
  """facebookresearch/swav main_swav.py distributed_sinkhorn in float64,
  for every rank at once: outs[r] [b, K] is rank r's `out` (its queue's
  scores, then its batch's); each dist.all_reduce is a sum over ranks.
  Returns each rank's codes [b, K]."""
  qs = [np.exp(np.asarray(o, np.float64) / epsilon).T for o in outs]
  b = qs[0].shape[1] * len(qs)  # Q.shape[1] * world_size.
  k = qs[0].shape[0]
  total = sum(q.sum() for q in qs)
  qs = [q / total for q in qs]
  for _ in range(iterations):
    rows = sum(q.sum(axis=1, keepdims=True) for q in qs)
    qs = [q / rows / k for q in qs]
    qs = [q / q.sum(axis=0, keepdims=True) / b for q in qs]
  return [(q * b).T for q in qs]


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_swav_loss(scores, codes, temperature=0.1):
  """main_swav.py train()'s loss in float64: scores [B, V, K] (crops in
  order, crops_for_assign = [0, 1]), codes[i] [B, K] of global crop i."""
  scores = np.asarray(scores, np.float64)
  views = scores.shape[1]
  loss = 0.0
  for i in range(2):
    subloss = 0.0
    for v in np.delete(np.arange(views), i):
      subloss -= np.mean(np.sum(
          codes[i] * _log_softmax(scores[:, v] / temperature), axis=1))
    loss += subloss / (views - 1)
  return loss / 2


def _unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _problem(seed, batch=16, views=4, dim=6, k=10, queue=32):
  """Cosine scores of unit projections with unit prototypes, a queue of
  unit projections per global crop, and the prototypes."""
  rng = np.random.default_rng(seed)
  kernel = _unit(rng.normal(size=(dim, k)), axis=0).astype(np.float32)
  z = _unit(rng.normal(size=(batch, views, dim))).astype(np.float32)
  scores = np.einsum("bvd,dk->bvk", z, kernel).astype(np.float32)
  q = _unit(rng.normal(size=(2, queue, dim))).astype(np.float32)
  return scores, q, kernel


def _sharded(mesh, x):
  return jax.device_put(x, sharding.batch_sharded(mesh))


def _sinkhorn_8(mesh, scores, queue_scores, weight, axis_name="data"):
  fn = functools.partial(swav.sinkhorn, epsilon=0.05, num_iters=3,
                         axis_name=axis_name)
  return jax.jit(jax.shard_map(
      fn, mesh=mesh, in_specs=(sharding.P("data"), sharding.P(),
                               sharding.P()),
      out_specs=sharding.P("data"), check_vma=axis_name is not None))(
          _sharded(mesh, scores), queue_scores, jnp.float32(weight))


def test_sinkhorn_equals_the_distributed_reference_globally_and_sharded():
  scores, queue, kernel = _problem(0)
  out = scores[:, 0]
  want = np.concatenate(numpy_distributed_sinkhorn([out]))
  # The reference on 8 ranks of 2 rows gives the same codes: the sums are
  # global once all-reduced.
  np.testing.assert_allclose(np.concatenate(numpy_distributed_sinkhorn(
      np.split(out, 8))), want, rtol=1e-12)
  got = jax.jit(functools.partial(swav.sinkhorn, epsilon=0.05,
                                  num_iters=3))(out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  mesh = sharding.make_mesh("explicit")
  empty = np.zeros((0, out.shape[1]), np.float32)
  np.testing.assert_allclose(_sinkhorn_8(mesh, out, empty, 0.0), want,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got).sum(axis=1), 1.0, rtol=1e-5)


def test_sinkhorn_with_the_queue_equals_per_rank_queues():
  """Our replicated queue joins every sum once; the reference's per-rank
  queues (any split of the same rows) give the same batch codes."""
  scores, queue, kernel = _problem(1)
  out, queue_scores = scores[:, 0], queue[0] @ kernel  # [16, K], [32, K]
  ranks = [np.concatenate([qr, br]) for qr, br in zip(
      np.split(queue_scores, 8), np.split(out, 8))]
  want = np.concatenate([c[-2:] for c in numpy_distributed_sinkhorn(ranks)])
  mesh = sharding.make_mesh("explicit")
  got = _sinkhorn_8(mesh, out, queue_scores, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  got1 = jax.jit(functools.partial(swav.sinkhorn, epsilon=0.05,
                                   num_iters=3))(out, queue_scores, 1.0)
  np.testing.assert_allclose(got1, want, rtol=1e-5, atol=1e-7)
  # A queue not yet in use (weight 0) takes no part at all.
  np.testing.assert_allclose(
      _sinkhorn_8(mesh, out, queue_scores, 0.0),
      np.concatenate(numpy_distributed_sinkhorn([out])), rtol=1e-5, atol=1e-7)


def test_tolerance_catches_per_device_sinkhorn_sums():
  scores, _, _ = _problem(2)
  out = scores[:, 0]
  want = np.concatenate(numpy_distributed_sinkhorn([out]))
  mesh = sharding.make_mesh("explicit")
  empty = np.zeros((0, out.shape[1]), np.float32)
  got = _sinkhorn_8(mesh, out, empty, 0.0, axis_name=None)
  rel = train_test.relative_difference(got, want)
  assert rel > 1000 * 1e-5, rel


def test_many_sinkhorn_rounds_equipartition_the_global_batch():
  """The codes' fixed point: each prototype gets B/K of the batch's mass
  (over all 8 shards, not per shard)."""
  scores, _, _ = _problem(3, batch=64, k=8)
  fn = functools.partial(swav.sinkhorn, epsilon=0.05, num_iters=300,
                         axis_name="data")
  mesh = sharding.make_mesh("explicit")
  codes = np.asarray(jax.jit(jax.shard_map(
      fn, mesh=mesh, in_specs=sharding.P("data"),
      out_specs=sharding.P("data")))(_sharded(mesh, scores[:, 0])))
  np.testing.assert_allclose(codes.sum(axis=0), 64 / 8, rtol=1e-4)
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)


def _loss_fn(mesh):
  kw = {"temperature": 0.1, "epsilon": 0.05, "num_iters": 3}
  if mesh is None:
    return jax.jit(functools.partial(swav.swav_loss, **kw))
  return jax.jit(functools.partial(swav.sharded_swav_loss, mesh=mesh, **kw))


@pytest.mark.parametrize("views,with_queue", [(2, False), (5, False),
                                              (5, True)])
def test_loss_equals_numpy_globally_and_on_8_devices(views, with_queue):
  scores, queue, kernel = _problem(4, views=views)
  codes = []
  for i in range(2):
    if with_queue:
      rows = np.concatenate([queue[i] @ kernel, scores[:, i]])
      codes.append(numpy_distributed_sinkhorn([rows])[0][-16:])
    else:
      codes.append(numpy_distributed_sinkhorn([scores[:, i]])[0])
  want = numpy_swav_loss(scores, codes)
  q = queue if with_queue else None
  weight = jnp.float32(1.0 if with_queue else 0.0)
  mesh = sharding.make_mesh("explicit")
  got, _ = _loss_fn(None)(scores, q, kernel, weight)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got8, _ = _loss_fn(mesh)(_sharded(mesh, scores), q, kernel, weight)
  np.testing.assert_allclose(got8, want, rtol=1e-5)
  # Gradients (through the scores only: the codes are constants).
  g1 = jax.grad(lambda s: _loss_fn(None)(s, q, kernel, weight)[0])(scores)
  g8 = jax.jit(jax.grad(lambda s: _loss_fn(mesh)(s, q, kernel, weight)[0]))(
      _sharded(mesh, scores))
  # The codes' sums are reduced in another order on 8 devices: float32
  # round-off of ~1e-7 relative in the codes, so compare the whole array.
  assert train_test.relative_difference(g8, g1) < 1e-5
  np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)


def test_queue_schedule_and_fifo():
  write, in_use = zip(*[swav.queue_schedule(s, start_step=4, queue_size=32,
                                            batch_size=16) for s in range(8)])
  assert [bool(w) for w in write] == [False] * 4 + [True] * 4
  assert [bool(u) for u in in_use] == [False] * 6 + [True] * 2
  # No queue: never written, never in use (the logged flag stays 0).
  assert not any(bool(f) for s in range(8) for f in swav.queue_schedule(
      s, start_step=4, queue_size=0, batch_size=16))
  queue = np.arange(12, dtype=np.float32).reshape(6, 2)
  rows = -np.ones((2, 2), np.float32)
  got = np.asarray(swav.push(queue, rows, True))
  np.testing.assert_array_equal(got, np.concatenate([rows, queue[:4]]))
  np.testing.assert_array_equal(swav.push(queue, rows, False), queue)


def test_prototypes_are_normalised_per_prototype():
  rng = np.random.default_rng(5)
  params = {"prototypes": {"kernel": rng.normal(size=(6, 9))},
            "encoder": {"x": np.ones(3)}}
  got = swav.normalized_prototypes(params)
  np.testing.assert_allclose(np.linalg.norm(got["prototypes"]["kernel"],
                                            axis=0), 1.0, rtol=1e-6)
  assert got["encoder"] is params["encoder"]


# ------------------------------------------------------------ the step
@pytest.mark.slow
def test_steps_follow_the_formula_queue_and_frozen_prototypes():
  """The job's step on one device: the logged loss is numpy_swav_loss of
  the scores (normalised prototypes, both passes) with the reference's
  codes (queue included once full); the queue takes each step's unit
  projections of the global crops, newest first; the prototypes stay the
  normalised ones (params and momentum) for 2 steps, then move."""
  config = tiny_swav_config()
  mesh = sharding.make_mesh("explicit", jax.devices()[:1])
  trainer, plan = methods_util.make_trainer(config, mesh)
  data = config_lib.data_spec(config)
  batches = input_pipeline.pretrain_batches(
      data, input_pipeline.open_source(data, "train"),
      batch_size=16, start_step=0, process_index=0, process_count=1)
  state = trainer.init_fn(jax.random.key(config.seed))
  assert isinstance(state, swav.SwavTrainState)
  written = []
  flat = lambda x: x.reshape((-1,) + x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
  for step in range(NUM_STEPS):
    batch = next(batches)
    before = jax.device_get(state)
    params = swav.normalized_prototypes(before.params)
    variables = {"params": params, "batch_stats": before.batch_stats}
    outs = [trainer.model.apply(variables, flat(batch[key]), train=True,
                                mutable=["batch_stats"])[0]
            for key in ("images", "local_images")]
    scores = np.concatenate([np.asarray(o["prototype_scores"]).reshape(
        16, 2, -1) for o in outs], axis=1)
    kernel = np.asarray(params["prototypes"]["kernel"])
    in_use = step >= 2
    codes = []
    for i in range(2):
      rows = scores[:, i]
      if in_use:
        rows = np.concatenate([before.queue[i] @ kernel, rows])
      codes.append(numpy_distributed_sinkhorn([rows])[0][-16:])
    state, metrics = trainer.step_fn(state, sharding.global_batch(mesh, batch))
    after = jax.device_get(state)
    np.testing.assert_allclose(metrics["loss"],
                               numpy_swav_loss(scores, codes), rtol=2e-5)
    assert float(metrics["swav_queue_in_use"]) == float(in_use)
    written.insert(0, _unit(np.asarray(outs[0]["z"], np.float64)).reshape(
        16, 2, -1))
    want_queue = np.concatenate(written + [np.zeros((16, 2, 16))] * 2)[:32]
    np.testing.assert_allclose(after.queue, want_queue.transpose(1, 0, 2),
                               rtol=1e-4, atol=1e-6)
    got_kernel = after.params["prototypes"]["kernel"]
    if step < prototypes.frozen_steps(0.5, plan.steps_per_epoch):
      # The normalised prototypes as the step computed them (XLA's sum and
      # division round within a few ulp of NumPy's), with no update on top:
      # the smallest one, weight decay alone, would move them by lr x wd =
      # 6e-6 relative; and their momentum is bitwise unchanged.
      np.testing.assert_allclose(got_kernel, kernel, rtol=1e-6, atol=0)
      for a, b in zip(dino_test._prototype_leaves(after)[1:],  # pylint: disable=protected-access
                      dino_test._prototype_leaves(before)[1:]):  # pylint: disable=protected-access
        np.testing.assert_array_equal(a, b)
    else:
      assert np.abs(got_kernel - kernel).max() > 1e-6


@functools.lru_cache(maxsize=None)
def one_device_run():
  return dino_test.run_steps(tiny_swav_config(),
                             sharding.make_mesh("explicit", jax.devices()[:1]))


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_swav_steps_are_layout_invariant(axis_type):
  """3 multi-crop steps, the last with the queue in Sinkhorn: 8 devices
  equal 1 (parameters, BN statistics, optimizer state, queue)."""
  ref_state, ref_metrics = one_device_run()
  state, metrics = dino_test.run_steps(tiny_swav_config(),
                                       sharding.make_mesh(axis_type))
  assert float(metrics["swav_queue_in_use"]) == 1.0
  dino_test.assert_same_run(state, metrics, ref_state, ref_metrics,
                            ("queue",), ("loss", "probe_loss", "grad_norm"))


@pytest.mark.slow
def test_layout_tolerance_catches_per_device_sinkhorn_sums(monkeypatch):
  ref_state, ref_metrics = one_device_run()
  real = swav.sinkhorn
  monkeypatch.setattr(swav, "sinkhorn", lambda *a, axis_name=None, **kw: (
      real(*a, axis_name=None, **kw)))
  state, metrics = dino_test.run_steps(tiny_swav_config(),
                                       sharding.make_mesh("explicit"))
  rel = train_test.relative_difference(train_test.flat_concat(state.params),
                                       train_test.flat_concat(ref_state.params))
  assert rel > 100 * train_test.WHOLE_TREE_RTOL["params"], rel
  with pytest.raises(AssertionError):
    dino_test.assert_same_run(state, metrics, ref_state, ref_metrics,
                              ("queue",), ("loss",))


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_with_queue_and_prototypes(tmp_path):
  state = methods_util.assert_sigkill_resume_is_bitwise(
      tiny_swav_config(steps=6, every=2), tmp_path)
  assert np.any(state["queue"] != 0)


def test_recipes_are_the_published_ones():
  """configs/swav.py: solo-learn's CIFAR-10 SwAV; configs/imagenet.py:
  method=swav: swav_100ep_pretrain.sh (docs/losses.md, SwAV)."""
  c = dino_test._config_file("swav")  # pylint: disable=protected-access
  assert (c.method, c.optimizer, c.learning_rate, c.weight_decay,
          c.trust_coefficient, c.batch_size, c.num_epochs,
          c.model.depth) == ("swav", "lars", 0.6, 1e-6, 0.02, 256, 1000, 18)
  assert (c.model.num_proj_layers, c.model.proj_hidden_dim,
          c.model.proj_out_dim) == (2, 2048, 128)
  assert c.swav.to_dict() == {
      "num_prototypes": 3000, "temperature": 0.1, "epsilon": 0.05,
      "sinkhorn_iterations": 3, "queue_size": 3840, "queue_start_epoch": 50,
      "freeze_prototypes_epochs": 2.0}
  assert (c.augment.color_jitter_strength, c.augment.use_blur) == (1.0, True)
  c = dino_test._config_file("imagenet", "method=swav")  # pylint: disable=protected-access
  assert (c.optimizer, c.learning_rate, c.batch_size, c.weight_decay,
          c.trust_coefficient, c.warmup_epochs) == (
              "lars", 0.3, 4096, 1e-6, 1e-3, 10.0)
  a = c.augment
  assert (a.crop_area_range, a.num_local_crops, a.local_crop_size,
          a.local_crop_area_range) == ((0.14, 1.0), 6, 96, (0.05, 0.14))
  assert (c.swav.num_prototypes, c.swav.queue_size,
          c.swav.freeze_prototypes_epochs) == (3000, 0, 1.0)
