"""SupCon (both forms), triplet, N-pair and InfoNCE against NumPy float64
loops written from the reference code, global and sharded over 8 devices
(jaxclr/losses and its registry); Barlow Twins and VICReg against the NumPy
transcriptions of tests/barlow_twins_test.py and tests/vicreg_test.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxclr import losses
from jaxclr.parallel import sharding

import barlow_twins_test
import vicreg_test

N, D = 16, 8  # Images, embedding size: 2 per device on the 8-device mesh.
TAU, MARGIN = 0.2, 0.5


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def views(z):
  """[N, 2, D] -> the 2N unit views, ordered view-1 rows then view-2 rows."""
  return unit(np.concatenate([z[:, 0], z[:, 1]]))


def keys(labels, num_images):
  """Positive key of each of the 2N views: the label, or the image when the
  label is -1 or there are no labels."""
  key = []
  for k in range(2 * num_images):
    i = k % num_images
    if labels is None or labels[i] < 0:
      key.append(("image", i))
    else:
      key.append(("class", int(labels[i])))
  return key


def ref_supcon(z, labels, tau):
  v, key = views(z), keys(labels, len(z))
  per_anchor = []
  for a in range(len(v)):
    others = [j for j in range(len(v)) if j != a]
    positives = [p for p in others if key[p] == key[a]]
    log_denominator = np.log(sum(np.exp(v[a] @ v[j] / tau) for j in others))
    per_anchor.append(-np.mean([v[a] @ v[p] / tau - log_denominator
                                for p in positives]))
  return np.mean(per_anchor)


def ref_supcon_in(z, labels, tau):
  """vturrisi/solo-learn solo/losses/simclr.py, simclr_loss_func with class
  indexes (what solo/methods/supcon.py trains with): per anchor,
  -log(pos / (pos + neg)), pos and neg the sums of exp(s/tau) over the
  other views of its class and over the views of other classes."""
  v, key = views(z), keys(labels, len(z))
  per_anchor = []
  for a in range(len(v)):
    pos = sum(np.exp(v[a] @ v[j] / tau) for j in range(len(v))
              if j != a and key[j] == key[a])
    neg = sum(np.exp(v[a] @ v[j] / tau) for j in range(len(v))
              if key[j] != key[a])
    per_anchor.append(-np.log(pos / (pos + neg)))
  return np.mean(per_anchor)


def sq_dist(a, b):
  return float(np.sum((a - b) ** 2))


def ref_triplet(z, labels, margin, mining):
  """The mean hinge over the mined triplets, and the triplets (a, p, n)."""
  v, key = views(z), keys(labels, len(z))
  hinges, triplets = [], []
  for a in range(len(v)):
    positives = [j for j in range(len(v)) if j != a and key[j] == key[a]]
    negatives = [j for j in range(len(v)) if key[j] != key[a]]
    if not negatives:
      continue
    d = {j: sq_dist(v[a], v[j]) for j in range(len(v))}
    if mining == "batch_hard":
      pairs = [(max(positives, key=d.get), min(negatives, key=d.get))]
    else:
      pairs = []
      for p in positives:
        farther = [n for n in negatives if d[n] > d[p]]
        pairs.append((p, min(farther, key=d.get) if farther
                      else max(negatives, key=d.get)))
    for p, n in pairs:
      hinges.append(max(d[p] - d[n] + margin, 0.0))
      triplets.append((a, p, n))
  return np.mean(hinges), triplets


def ref_npair(z, reg_lambda=0.002):
  """tensorflow/tensorflow tensorflow/contrib/losses/python/metric_learning/
  metric_loss_ops.py, npairs_loss with one label per pair: the softmax
  cross-entropy of the unnormalised similarities f_i . f_j+, plus
  0.25 reg_lambda (mean |f|^2 + mean |f+|^2); written as Sohn's
  log(1 + sum_{j != i} exp(f_i.f_j+ - f_i.f_i+))."""
  f, f_pos = (np.asarray(z[:, v], np.float64) for v in (0, 1))
  per_anchor = []
  for i in range(len(z)):
    s = sum(np.exp(f[i] @ f_pos[j] - f[i] @ f_pos[i])
            for j in range(len(z)) if j != i)
    per_anchor.append(np.log1p(s))
  reg = 0.25 * reg_lambda * (np.mean(np.sum(f * f, -1)) +
                             np.mean(np.sum(f_pos * f_pos, -1)))
  return np.mean(per_anchor) + reg


def ref_infonce(z, tau, queue=()):
  f, f_pos = unit(z[:, 0]), unit(z[:, 1])
  negatives = [unit(q) for q in queue if np.any(q != 0)]
  per_anchor = []
  for i in range(len(z)):
    logits = [f[i] @ f_pos[j] / tau for j in range(len(z))]
    logits += [f[i] @ q / tau for q in negatives]
    per_anchor.append(np.log(np.sum(np.exp(logits))) - logits[i])
  return np.mean(per_anchor)


def embeddings(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, 2, D)).astype(np.float32)
  z[:, 1] = z[:, 0] + 1.5 * z[:, 1]  # Positives closer, non-trivial metrics.
  labels = rng.integers(0, 4, N).astype(np.int32)
  labels[:3] = -1  # Unlabelled images: classes of their own.
  return z, labels


# Per registry loss: the independent reference, and whether labels are read.
REFERENCES = {
    "supcon": lambda z, l: ref_supcon(z, l, TAU),
    "supcon_in": lambda z, l: ref_supcon_in(z, l, TAU),
    "triplet_batch_hard": lambda z, l: ref_triplet(z, l, MARGIN, "batch_hard")[0],
    "triplet_semi_hard": lambda z, l: ref_triplet(z, l, MARGIN, "semi_hard")[0],
    "npair": lambda z, l: ref_npair(z),
    "infonce": lambda z, l: ref_infonce(z, TAU),
    # At the registry's default options (option_defaults, below).
    "barlow_twins": lambda z, l: barlow_twins_test.numpy_barlow_twins(
        *np.moveaxis(z.astype(np.float64), 1, 0), lambd=0.0051,
        scale=1.0)[0],
    "vicreg": lambda z, l: vicreg_test.numpy_vicreg(
        *np.moveaxis(z.astype(np.float64), 1, 0), sim_coeff=25.0,
        std_coeff=25.0, cov_coeff=1.0)[0],
}


@functools.lru_cache(maxsize=None)
def mesh():
  m = sharding.make_mesh("explicit")
  assert m.devices.size == 8
  return m


@functools.lru_cache(maxsize=None)
def global_and_sharded(name):
  """Jitted value_and_grad (w.r.t. z) of the global and the sharded loss."""
  loss = losses.get(name)
  options = {**losses.option_defaults(), "temperature": TAU,
             "hidden_norm": True, "margin": MARGIN}
  read = {k: options[k] for k in loss.options}

  def global_loss(z, labels):
    return loss.fn(z[:, 0], z[:, 1], labels, axis_name=None, **read)

  def sharded_loss(z, labels):
    return losses.sharded(name, z, labels, mesh=mesh(), options=options)

  return (jax.jit(jax.value_and_grad(global_loss, has_aux=True)),
          jax.jit(jax.value_and_grad(sharded_loss, has_aux=True)))


def test_every_registered_loss_has_a_reference_here():
  assert set(REFERENCES) | {"nt_xent"} == set(losses.names())


@pytest.mark.parametrize("name,with_labels", [
    (name, with_labels) for name in sorted(REFERENCES)
    for with_labels in (False, True)
    if losses.get(name).class_labels or not with_labels])
def test_loss_matches_reference_globally_and_sharded(name, with_labels):
  z, labels = embeddings()
  labels = labels if with_labels else None
  expected = REFERENCES[name](z, labels)
  global_fn, sharded_fn = global_and_sharded(name)
  batch = sharding.batch_sharded(mesh())
  # The same program serves both cases: no labels == every label -1.
  device_labels = np.full(N, -1, np.int32) if labels is None else labels
  (loss_g, metrics_g), grad_g = global_fn(jnp.asarray(z),
                                          jnp.asarray(device_labels))
  (loss_s, metrics_s), grad_s = sharded_fn(jax.device_put(z, batch),
                                           jax.device_put(device_labels, batch))
  np.testing.assert_allclose(loss_g, expected, rtol=2e-5)
  np.testing.assert_allclose(loss_s, expected, rtol=2e-5)
  assert np.abs(np.asarray(grad_g)).max() > 0
  # Gradients flow through the gather, and are not averaged twice.
  np.testing.assert_allclose(grad_s, grad_g, rtol=1e-4, atol=1e-6)
  assert set(metrics_s) == set(metrics_g)
  for key in metrics_g:
    np.testing.assert_allclose(metrics_s[key], metrics_g[key], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  if "contrast_acc" in metrics_g:  # Not Barlow Twins' or VICReg's.
    assert 0.0 < metrics_g["contrast_acc"] < 1.0


@pytest.mark.slow
def test_supcon_with_one_label_per_image_is_half_nt_xent():
  """One label per image: P(i) = {i's other view}, so SupCon's mean over the
  2N anchors is half of nt_xent (mean over view-1 + mean over view-2)."""
  z, _ = embeddings(seed=1)
  z1, z2 = jnp.asarray(z[:, 0]), jnp.asarray(z[:, 1])
  nt_xent = losses.nt_xent(z1, z2, temperature=TAU)
  supcon_fn = jax.jit(functools.partial(losses.supcon_with_metrics,
                                        temperature=TAU))
  for labels in (None, jnp.arange(N, dtype=jnp.int32)):
    supcon, _ = supcon_fn(z1, z2, labels)
    np.testing.assert_allclose(2 * supcon, nt_xent, rtol=1e-6)
  np.testing.assert_allclose(supcon, ref_supcon(z, None, TAU), rtol=2e-6)


def mined_on(num_devices, mining, z, labels):
  fn = functools.partial(losses.mined_triplets, mining=mining)
  if num_devices == 1:
    return jax.device_get(jax.jit(fn)(z[:, 0], z[:, 1], labels))
  fn = functools.partial(fn, axis_name="data")
  sharded = jax.shard_map(lambda a, b, l: fn(a, b, l), mesh=mesh(),
                          in_specs=(P("data"),) * 3, out_specs=P("data"))
  batch = sharding.batch_sharded(mesh())
  return jax.device_get(jax.jit(sharded)(
      *(jax.device_put(x, batch) for x in (z[:, 0], z[:, 1], labels))))


def column(k, n=N):
  """Reference view index (view-1 rows, then view-2) -> (image, view)."""
  return k % n, k // n


def test_batch_hard_mining_is_the_same_on_1_and_8_devices_and_the_reference():
  z, labels = embeddings(seed=2)
  one = mined_on(1, "batch_hard", z, labels)
  eight = mined_on(8, "batch_hard", z, labels)
  np.testing.assert_array_equal(one[0], eight[0])
  np.testing.assert_array_equal(one[1], eight[1])
  pos_col, neg_col = one
  _, triplets = ref_triplet(z, labels, MARGIN, "batch_hard")
  assert len(triplets) == 2 * N
  for a, p, n in triplets:  # Reference and loss use the same column order.
    image, view = column(a)
    assert (pos_col[image, view], neg_col[image, view]) == (p, n)


def test_semi_hard_mining_is_the_same_on_1_and_8_devices_and_the_reference():
  z, labels = embeddings(seed=3)
  one = mined_on(1, "semi_hard", z, labels)
  np.testing.assert_array_equal(one, mined_on(8, "semi_hard", z, labels))
  _, triplets = ref_triplet(z, labels, MARGIN, "semi_hard")
  assert np.sum(one >= 0) == len(triplets) > 2 * N  # Class positives too.
  for a, p, n in triplets:
    image, view = column(a)
    assert one[image, view, p] == n


def test_semi_hard_falls_back_to_the_farthest_negative():
  # Anchor 0's positive (its own second view) is far; both negatives are
  # nearer than it, so none is semi-hard: the farther of the two is used.
  z1 = np.array([[1, 0], [0.9, 0.1], [0.6, 0.8]], np.float32)
  z2 = np.array([[-1, 0.1], [0.8, 0.3], [0.5, 0.8]], np.float32)
  neg_col = jax.device_get(jax.jit(functools.partial(
      losses.mined_triplets, mining="semi_hard"))(z1, z2))
  v = views(np.stack([z1, z2], 1))
  d = [sq_dist(v[0], v[j]) for j in range(6)]
  negatives = [1, 2, 4, 5]
  assert all(d[n] < d[3] for n in negatives)
  assert neg_col[0, 0, 3] == max(negatives, key=lambda j: d[j])
  assert neg_col[0, 0, 0] == -1  # Not a positive column: itself.


def test_npair_l2_regulariser():
  z, _ = embeddings(seed=4)
  loss, _ = losses.npair_with_metrics(z[:, 0], z[:, 1], embedding_l2=0.5)
  np.testing.assert_allclose(loss, ref_npair(z, reg_lambda=0.5), rtol=2e-5)
  plain, _ = losses.npair_with_metrics(z[:, 0], z[:, 1], embedding_l2=0.0)
  np.testing.assert_allclose(loss - plain, ref_npair(z, 0.5) - ref_npair(z, 0),
                             rtol=1e-4)


def test_npair_of_unit_vectors_is_infonce_at_temperature_1():
  """What an N-pair run of jaxclr <= this change computed (normalised
  embeddings, no L2 term): config/legacy.py reads such a run as
  loss='infonce', temperature=1."""
  z, _ = embeddings(seed=7)
  u = unit(z).astype(np.float32)
  npair_unit, _ = losses.npair_with_metrics(u[:, 0], u[:, 1],
                                            embedding_l2=0.0)
  infonce, _ = losses.infonce_with_metrics(z[:, 0], z[:, 1], temperature=1.0)
  np.testing.assert_allclose(npair_unit, infonce, rtol=1e-6)
  assert abs(float(npair_unit) - ref_npair(z, 0.0)) > 1e-2  # Not the raw form.


def test_supcon_in_is_l_in_less_log_positives_and_l_out_for_pairs():
  """Khosla et al.'s L_in has 1/|P(i)| inside the log; solo-learn's form
  drops it: supcon_in = L_in - mean_i log|P(i)|. With one positive per
  anchor every form is the same."""
  z, labels = embeddings(seed=8)
  fn = functools.partial(losses.supcon_in_with_metrics, temperature=TAU)
  got, _ = jax.jit(fn)(z[:, 0], z[:, 1], labels)
  v, key = views(z), keys(labels, N)
  l_in, log_pos = [], []
  for a in range(2 * N):
    others = [j for j in range(2 * N) if j != a]
    positives = [p for p in others if key[p] == key[a]]
    denominator = sum(np.exp(v[a] @ v[j] / TAU) for j in others)
    l_in.append(-np.log(np.mean([np.exp(v[a] @ v[p] / TAU)
                                 for p in positives]) / denominator))
    log_pos.append(np.log(len(positives)))
  np.testing.assert_allclose(got, np.mean(l_in) - np.mean(log_pos), rtol=2e-5)
  assert np.mean(log_pos) > 0.1  # Class positives: the two forms differ.
  pairs_in, _ = jax.jit(fn)(z[:, 0], z[:, 1], None)
  pairs_out, _ = losses.supcon_with_metrics(z[:, 0], z[:, 1], None,
                                            temperature=TAU)
  np.testing.assert_allclose(pairs_in, pairs_out, rtol=1e-6)


def test_infonce_queue_adds_negatives_globally_and_sharded():
  z, _ = embeddings(seed=5)
  queue = np.random.default_rng(6).normal(size=(6, D)).astype(np.float32)
  queue[-1] = 0.0  # An unfilled slot is left out.
  expected = ref_infonce(z, TAU, queue)
  assert expected > ref_infonce(z, TAU) + 1e-3
  loss_g, _ = losses.infonce_with_metrics(
      z[:, 0], z[:, 1], temperature=TAU, queue=jnp.asarray(queue))
  options = {**losses.option_defaults(), "temperature": TAU}
  loss_s, _ = jax.jit(lambda a, q: losses.sharded(
      "infonce", a, mesh=mesh(), options=options, queue=q))(
          jax.device_put(z, sharding.batch_sharded(mesh())),
          jax.device_put(queue, sharding.replicated(mesh())))
  np.testing.assert_allclose(loss_g, expected, rtol=2e-5)
  np.testing.assert_allclose(loss_s, expected, rtol=2e-5)


def test_update_queue_is_fifo_in_batch_order():
  queue = jnp.zeros((5, 1))
  for step in range(3):  # Batches of 2: keys 0, 1 | 2, 3 | 4, 5.
    queue = losses.update_queue(
        queue, jnp.array([[2.0 * step], [2.0 * step + 1]]))
  np.testing.assert_array_equal(queue[:, 0], [1, 2, 3, 4, 5])
  big = losses.update_queue(queue, jnp.arange(7.0)[:, None])
  np.testing.assert_array_equal(big[:, 0], [2, 3, 4, 5, 6])
  empty = jnp.zeros((0, 1))
  assert losses.update_queue(empty, jnp.ones((2, 1))).shape == (0, 1)
  # No gradient reaches the keys through the queue.
  grad = jax.grad(lambda k: jnp.sum(losses.update_queue(queue, k)))(
      jnp.ones((2, 1)))
  np.testing.assert_array_equal(grad, 0.0)


def test_unknown_loss_name_is_refused():
  with pytest.raises(ValueError, match="loss='simclr' is unknown; valid"):
    losses.sharded("simclr", jnp.zeros((8, 2, 4)), mesh=mesh(),
                   options=losses.option_defaults())
