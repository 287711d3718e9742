"""NNCLR: the loss against a NumPy formula (globally and sharded), the
support set as a FIFO of global batches, layout invariance, exact resume."""

import functools

import jax
import numpy as np
import pytest

from jaxclr.methods import nnclr
from jaxclr.parallel import sharding

import byol_test
import methods_util
import train_test

TEMPERATURE = 0.2


def tiny_nnclr_config(**arg):
  # 3 batches of 16: the FIFO wraps around after 3 steps.
  return methods_util.tiny_config(method="nnclr",
                                  nnclr__predictor_hidden_dim=32,
                                  nnclr__queue_size=48, **arg)


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_nnclr(z1, z2, p1, p2, labels, support, support_labels, offset, tau):
  """The paper's pseudo-code, written out in float64."""
  z1, z2, p1, p2, s = (unit(x) for x in (z1, z2, p1, p2, support))

  def ce(anchors, cols):
    logits = anchors @ cols.T / tau
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.mean(np.diag(logp))

  i1, i2 = np.argmax(z1 @ s.T, -1), np.argmax(z2 @ s.T, -1)
  loss = 0.5 * (ce(s[i1], p2) + ce(s[i2], p1))
  agree = [(labels[j] >= 0) and (support_labels[i[j]] == labels[j])
           for i in (i1, i2) for j in range(len(labels))]
  known = 2 * np.sum(labels >= 0)
  new = s.copy()
  new[offset:offset + len(z1)] = z1
  new_labels = support_labels.copy()
  new_labels[offset:offset + len(z1)] = labels
  return loss, sum(agree) / max(known, 1), new, new_labels


def random_inputs(seed=0, n=16, d=8, k=48):
  rng = np.random.default_rng(seed)
  z1, z2, p1, p2 = (rng.normal(size=(n, d)).astype(np.float32)
                    for _ in range(4))
  labels = rng.integers(-1, 3, size=n).astype(np.int32)
  support = unit(rng.normal(size=(k, d))).astype(np.float32)
  support_labels = rng.integers(-1, 3, size=k).astype(np.int32)
  return z1, z2, p1, p2, labels, support, support_labels


def test_loss_and_support_update_equal_numpy_globally_and_sharded():
  z1, z2, p1, p2, labels, support, support_labels = random_inputs()
  offset = 16
  want = numpy_nnclr(z1, z2, p1, p2, labels, support, support_labels, offset,
                     TEMPERATURE)
  got = jax.jit(functools.partial(nnclr.nn_contrastive_loss,
                                  temperature=TEMPERATURE))(
      z1, z2, p1, p2, labels, support, support_labels, offset)
  mesh = sharding.make_mesh("explicit")
  views = {"z": np.stack([z1, z2], 1), "p": np.stack([p1, p2], 1)}
  put = functools.partial(jax.device_put, device=sharding.batch_sharded(mesh))
  got8 = jax.jit(functools.partial(
      nnclr.sharded_nn_contrastive_loss, mesh=mesh, temperature=TEMPERATURE))(
          jax.tree.map(put, views), put(labels), support, support_labels,
          offset)
  for loss, metrics, new, new_labels in (got, got8):
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    np.testing.assert_allclose(metrics["nn_label_agreement"], want[1],
                               rtol=1e-6)
    np.testing.assert_allclose(new, want[2], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new_labels, want[3])


@pytest.mark.slow
def test_gradients_through_p_are_the_global_ones_on_8_devices():
  z1, z2, p1, p2, labels, support, support_labels = random_inputs(1)
  mesh = sharding.make_mesh("explicit")
  put = functools.partial(jax.device_put, device=sharding.batch_sharded(mesh))

  def global_loss(p):
    return nnclr.nn_contrastive_loss(z1, z2, p[:, 0], p[:, 1], labels,
                                     support, support_labels, 0,
                                     temperature=TEMPERATURE)[0]

  def sharded_loss(p):
    views = {"z": put(np.stack([z1, z2], 1)), "p": p}
    return nnclr.sharded_nn_contrastive_loss(
        views, put(labels), support, support_labels, 0, mesh=mesh,
        temperature=TEMPERATURE)[0]

  p = np.stack([p1, p2], 1)
  g1 = jax.grad(global_loss)(p)
  g8 = jax.jit(jax.grad(sharded_loss))(put(p))
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-7)
  assert np.abs(g1).max() > 0


def test_nearest_neighbour_of_a_support_row_is_itself():
  z1, z2, p1, p2, labels, support, support_labels = random_inputs(2)
  z1 = 5.0 * support[:16]  # Each view-1 row is a (scaled) support row.
  labels = support_labels[:16]
  _, metrics, _, _ = nnclr.nn_contrastive_loss(
      z1, z1, p1, p2, labels, support, support_labels, 0,
      temperature=TEMPERATURE)
  known = labels >= 0
  assert known.any()
  np.testing.assert_allclose(metrics["nn_label_agreement"], 1.0)


@pytest.mark.slow
def test_support_set_after_k_steps_is_the_last_global_batches_in_order():
  """Each step writes the L2-normalised view-1 projections of its global
  batch, computed by the network the step starts from; after 4 steps of a
  3-batch FIFO the set is the batches of steps 2, 3, 4 (oldest first)."""
  config = tiny_nnclr_config()
  written = []
  for state, batch, z in methods_util.steps_with_projections(
      config, sharding.make_mesh("explicit"), 4):
    if batch is None:
      assert np.all(state.support_labels == -1)
      continue
    written.append(unit(z[:, 0]))
    offset = nnclr.write_offset(len(written) - 1, config.nnclr.queue_size,
                                config.batch_size)
    np.testing.assert_array_equal(
        state.support_labels[offset:offset + config.batch_size],
        batch["labels"])
  ordered = nnclr.ordered_support(state.support, state.step,
                                  config.batch_size)
  np.testing.assert_allclose(ordered, np.concatenate(written[1:]),
                             rtol=1e-4, atol=1e-5)


@functools.lru_cache(maxsize=None)
def one_device_run():
  return train_test.run_steps(
      tiny_nnclr_config(), sharding.make_mesh("explicit", jax.devices()[:1]))


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_nnclr_step_is_layout_invariant(axis_type):
  ref_state, ref_metrics = one_device_run()
  state, metrics = train_test.run_steps(tiny_nnclr_config(),
                                        sharding.make_mesh(axis_type))
  # The predictor's first BN mean is zero up to round-off (byol_test).
  for s in (state, ref_state):
    assert np.abs(s.batch_stats["predictor"]["bn0"]["mean"]).max() < 1e-6
  train_test.assert_same_state(*(s.replace(
      batch_stats=byol_test.without_predictor_mean(s.batch_stats))
      for s in (state, ref_state)))
  assert train_test.relative_difference(state.support, ref_state.support) < (
      train_test.WHOLE_TREE_RTOL["params"])
  np.testing.assert_array_equal(state.support_labels, ref_state.support_labels)
  for key in ("loss", "contrast_acc", "nn_label_agreement", "probe_loss",
              "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


@pytest.mark.slow
def test_resume_is_bitwise_with_the_support_set(tmp_path):
  config = tiny_nnclr_config(steps=4, every=2)
  state, _ = methods_util.assert_resume_is_bitwise(config, tmp_path)
  assert isinstance(state, nnclr.NnclrTrainState)
  assert (np.asarray(state.support_labels) >= 0).sum() == 3 * config.batch_size
