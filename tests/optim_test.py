"""LARS and the learning-rate schedule against SimCLR's rules, written out."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.training import optim


def simclr_lars_reference(params, grads_per_step, lrs, *, wd, eeta, momentum,
                          excluded):
  """SimCLR's classic-momentum LARS (docs/simclr.md 2.2), in NumPy.

  excluded: names skipped for both weight decay and trust-ratio adaptation.
  """
  w = {k: np.array(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for grads, lr in zip(grads_per_step, lrs):
    for k in w:
      g = np.array(grads[k], np.float64)
      if k not in excluded:
        g = g + wd * w[k]
        w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
        trust = eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
      else:
        trust = 1.0
      v[k] = momentum * v[k] + lr * trust * g
      w[k] = w[k] - v[k]
  return w


def make_config(**overrides):
  c = config_lib.base_config()
  for k, val in overrides.items():
    c[k] = val
  return c


@pytest.mark.slow
def test_lars_matches_simclr_classic_momentum_with_changing_lr():
  rng = np.random.default_rng(0)
  params = {
      "encoder": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8))},
                  "bn": {"scale": rng.normal(size=(8,)),
                         "bias": rng.normal(size=(8,))}},
      "linear_head": {"Dense_0": {"kernel": rng.normal(size=(8, 10)),
                                  "bias": rng.normal(size=(10,))}},
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  c = make_config(batch_size=512, num_train_steps=6, learning_rate=1.0,
                  warmup_epochs=1.0, weight_decay=1e-3)
  plan = optim.training_plan(c, num_examples=1536)  # 3 steps per epoch
  assert plan.warmup_steps == 3 and plan.total_steps == 6
  tx = optim.create_optimizer(c, plan)
  schedule = optim.learning_rate_schedule(plan)
  opt_state = tx.init(params)
  grads_seq, lrs = [], []
  p = params
  for step in range(6):
    g = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    grads_seq.append(g)
    lrs.append(float(schedule(step)))
    updates, opt_state = tx.update(g, opt_state, p, step)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  assert len(set(lrs)) == 6  # The LR changes every step.

  def flat(tree):
    return {"/".join(str(q.key) for q in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  excluded = {"encoder/bn/scale", "encoder/bn/bias", "linear_head/Dense_0/kernel",
              "linear_head/Dense_0/bias"}
  expected = simclr_lars_reference(
      flat(params), [flat(g) for g in grads_seq], lrs, wd=1e-3, eeta=1e-3,
      momentum=0.9, excluded=excluded)
  got = flat(p)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=2e-5, atol=1e-6,
                               err_msg=k)


@pytest.mark.slow
def test_skipped_update_keeps_state_and_the_schedule_follows_the_step():
  """A non-finite gradient leaves params and momentum as they were, and the
  next update uses the schedule at ITS step (optax's own update count, which
  a skipped update does not advance, would lag behind)."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  c = make_config(batch_size=256, num_train_steps=5, learning_rate=1.0,
                  warmup_epochs=0.0, weight_decay=0.0)
  plan = optim.training_plan(c, num_examples=256)
  tx, schedule = optim.create_optimizer(c, plan), \
      optim.learning_rate_schedule(plan)
  grads = [{"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
           for _ in range(4)]
  grads[2] = {"w": grads[2]["w"].at[0, 0].set(jnp.nan)}
  opt_state, p, applied = tx.init(params), params, []
  for step, g in enumerate(grads):
    before = p
    updates, opt_state = tx.update(g, opt_state, p, step)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    applied.append(bool(optim.update_applied(opt_state)))
    if step == 2:
      np.testing.assert_array_equal(p["w"], before["w"])
  assert applied == [True, True, False, True]
  assert int(optim.nonfinite_count(opt_state)) == 1
  assert float(optim.applied_learning_rate(opt_state)) == pytest.approx(
      float(schedule(3)))
  # Steps 0, 1 and 3 in the reference, at their own learning rates.
  expected = simclr_lars_reference(
      {"w": params["w"]}, [grads[0], grads[1], grads[3]],
      [float(schedule(s)) for s in (0, 1, 3)], wd=0.0, eeta=1e-3,
      momentum=0.9, excluded=set())
  np.testing.assert_allclose(p["w"], expected["w"], rtol=2e-5, atol=1e-7)


@pytest.mark.slow
def test_sgd_nesterov_follows_the_step_and_decays_kernels_only():
  rng = np.random.default_rng(2)
  params = {"k": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  schedule = lambda step: 0.1 * (step + 1.0)
  tx = optim.sgd_nesterov(schedule, momentum=0.9, weight_decay=0.01)
  opt_state, p = tx.init(params), params
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  for step in range(3):
    g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
         for k, v in params.items()}
    updates, opt_state = tx.update(g, opt_state, p, step + 10)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    lr = schedule(step + 10)
    for k in w:  # optax: trace = g + mu * trace; update = -lr (g + mu trace).
      gk = np.asarray(g[k], np.float64) + (0.01 * w[k] if k == "k" else 0.0)
      m[k] = gk + 0.9 * m[k]
      w[k] = w[k] - lr * (gk + 0.9 * m[k])
  for k in w:
    np.testing.assert_allclose(p[k], w[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_pretraining_sgd_is_pytorch_momentum_with_decay_on_lars_mask():
  """optimizer='sgd' (SupCon's recipe): buf = mu buf + g + wd w on the
  kernels LARS decays; w -= lr(step) buf. Nothing else is decayed."""
  rng = np.random.default_rng(3)
  params = {
      "encoder": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4))},
                  "bn": {"scale": rng.normal(size=(4,))}},
      "linear_head": {"Dense_0": {"kernel": rng.normal(size=(4, 3))}},
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  c = make_config(batch_size=256, num_train_steps=5, learning_rate=0.4,
                  warmup_epochs=1.0, weight_decay=1e-2, optimizer="sgd")
  plan = optim.training_plan(c, num_examples=512)  # 2 steps per epoch.
  tx = optim.create_optimizer(c, plan)
  schedule = optim.learning_rate_schedule(plan)
  decayed = {("encoder", "conv", "kernel")}
  flat = lambda t: {k: np.asarray(v, np.float64) for k, v in
                    flax.traverse_util.flatten_dict(t).items()}
  w, buf = flat(params), {k: 0.0 for k in flat(params)}
  opt_state, p = tx.init(params), params
  for step in range(4):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                           jnp.float32), params)
    updates, opt_state = tx.update(g, opt_state, p, step)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    lr = float(schedule(step))
    for k, gk in flat(g).items():
      gk = gk + (1e-2 * w[k] if k in decayed else 0.0)
      buf[k] = 0.9 * buf[k] + gk
      w[k] = w[k] - lr * buf[k]
  assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(0.4)
  for k, v in flat(p).items():
    np.testing.assert_allclose(v, w[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_lars_mask_excludes_bn_biases_and_probe():
  params = {"encoder": {"stem_conv": {"Conv_0": {"kernel": jnp.ones((3, 3, 3, 4))}},
                        "stem_bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
            "projection_head": {"dense0": {"kernel": jnp.ones((4, 4))}},
            "linear_head": {"Dense_0": {"kernel": jnp.ones((4, 2)),
                                        "bias": jnp.ones(2)}}}
  mask = optim.lars_mask(params)
  assert mask["encoder"]["stem_conv"]["Conv_0"]["kernel"]
  assert mask["projection_head"]["dense0"]["kernel"]
  assert not mask["encoder"]["stem_bn"]["scale"]
  assert not mask["encoder"]["stem_bn"]["bias"]
  assert not mask["linear_head"]["Dense_0"]["kernel"]
  assert not mask["linear_head"]["Dense_0"]["bias"]


def hand_schedule(step, peak, warmup, total):
  if step < warmup:
    return step / warmup * peak
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return peak * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("scaling,base,expected_peak", [
    ("linear", 0.3, 4.8),      # 0.3 x 4096/256
    ("sqrt", 0.075, 4.8),      # 0.075 x sqrt(4096)
])
def test_imagenet_plan_and_schedule(scaling, base, expected_peak):
  c = make_config(batch_size=4096, num_epochs=100, warmup_epochs=10.0,
                  learning_rate=base, learning_rate_scaling=scaling)
  plan = optim.training_plan(c, num_examples=1281167)
  assert plan.total_steps == 31279 and plan.warmup_steps == 3127
  assert plan.peak_learning_rate == pytest.approx(expected_peak)
  schedule = optim.learning_rate_schedule(plan)
  mid = (plan.warmup_steps + plan.total_steps) // 2
  for step in (0, 1, plan.warmup_steps, mid, plan.total_steps - 1,
               plan.total_steps):
    np.testing.assert_allclose(
        float(schedule(step)),
        hand_schedule(step, expected_peak, 3127, 31279), atol=2e-6,
        err_msg=f"step {step}")
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(mid)), expected_peak / 2, rtol=1e-3)


@pytest.mark.parametrize("batch,linear,sqrt_", [
    (256, 0.3, 1.2), (1024, 1.2, 2.4), (8192, 9.6, 6.788)])
def test_scalings_at_other_batch_sizes(batch, linear, sqrt_):
  assert optim.scaled_learning_rate(0.3, batch, "linear") == pytest.approx(linear)
  assert optim.scaled_learning_rate(0.075, batch, "sqrt") == pytest.approx(
      sqrt_, rel=1e-3)


def test_cifar_recipe_step_counts():
  c = make_config(batch_size=512, num_epochs=1000, warmup_epochs=10.0,
                  learning_rate=1.0)
  plan = optim.training_plan(c, num_examples=50000)
  assert plan.total_steps == 97657 and plan.warmup_steps == 976
  assert plan.peak_learning_rate == pytest.approx(2.0)


def test_num_train_steps_overrides_epochs():
  c = make_config(batch_size=256, num_epochs=100, num_train_steps=7,
                  warmup_epochs=0.0)
  plan = optim.training_plan(c, num_examples=1000)
  assert plan.total_steps == 7 and plan.warmup_steps == 0
  schedule = optim.learning_rate_schedule(plan)
  np.testing.assert_allclose(float(schedule(0)), plan.peak_learning_rate,
                             rtol=1e-6)


def test_probe_l2_penalty_counts_kernel_only():
  params = {"linear_head": {"Dense_0": {"kernel": jnp.full((2, 3), 2.0),
                                        "bias": jnp.full((3,), 5.0)}},
            "encoder": {"k": jnp.ones((4, 4))}}
  np.testing.assert_allclose(optim.probe_l2_penalty(params, 0.1),
                             0.1 * 0.5 * 6 * 4.0)


def solo_learn_lars_reference(params, grads_per_step, lr, *, wd, eta,
                              momentum, excluded, eps=1e-8):
  """vturrisi/solo-learn solo/utils/lars.py, LARS.step with clip_lr=True and
  exclude_bias_n_norm=True, in NumPy (PyTorch's momentum: buf = mu buf +
  d_p, p -= lr buf). Returns the params and, per step, the layers whose
  rate the clip capped at lr (eta|w| / (|g| + wd|w|) >= lr)."""
  w = {k: np.array(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(x) for k, x in w.items()}
  capped = []
  for grads in grads_per_step:
    capped.append(set())
    for k in w:
      d_p = np.array(grads[k], np.float64)
      w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(d_p)
      if k not in excluded and w_norm != 0 and g_norm != 0:
        lars_lr = eta * w_norm / (g_norm + w_norm * wd + eps)
        if lars_lr / lr >= 1:
          capped[-1].add(k)
        lars_lr = min(lars_lr / lr, 1)
        d_p = lars_lr * (d_p + wd * w[k])
      buf[k] = momentum * buf[k] + d_p
      w[k] = w[k] - lr * buf[k]
  return w, capped


@pytest.mark.slow
def test_lars_clip_lr_is_solo_learns_lars():
  """lars_clip_lr: each layer moves at min(eta|w| / (|g| + wd|w|), lr); at
  a constant rate PyTorch's momentum and the classic one take the same
  steps. Layers with both small and large trust ratios are in play."""
  rng = np.random.default_rng(3)
  params = {"big": {"kernel": 30.0 * rng.normal(size=(3, 3, 4, 8))},
            "small": {"kernel": 0.01 * rng.normal(size=(8, 6))},
            "bn": {"scale": rng.normal(size=(8,))},
            "linear_head": {"Dense_0": {"kernel": rng.normal(size=(8, 10))}}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  lr, wd, eta = 0.3, 1e-4, 0.02

  def run(clip_lr):
    tx = optim.lars(lambda step: lr, weight_decay=wd, momentum=0.9,
                    trust_coefficient=eta, clip_lr=clip_lr)
    opt_state, p, grads = tx.init(params), params, []
    for step in range(4):
      g = jax.tree.map(
          lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
      grads.append(g)
      updates, opt_state = tx.update(g, opt_state, p, step)
      p = jax.tree.map(lambda a, u: a + u, p, updates)
    return p, grads

  def flat(tree):
    return {"/".join(str(q.key) for q in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  got, grads = run(clip_lr=True)
  expected, capped = solo_learn_lars_reference(
      flat(params), [flat(g) for g in grads], lr, wd=wd, eta=eta,
      momentum=0.9, excluded={"bn/scale", "linear_head/Dense_0/kernel"})
  for k, want in expected.items():
    np.testing.assert_allclose(flat(got)[k], want, rtol=2e-5, atol=1e-7,
                               err_msg=k)
  # The cap acts on one kernel (its rate is lr), not on the other.
  assert all(c == {"big/kernel"} for c in capped), capped
  # Negative control: SimCLR's LARS (no clip) moves the layers elsewhere.
  unclipped, _ = run(clip_lr=False)
  assert np.abs(flat(unclipped)["big/kernel"] -
                expected["big/kernel"]).max() > 1e-2
