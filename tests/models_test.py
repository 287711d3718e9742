"""ResNet and heads: structure, init and parameter counts (docs/simclr.md 5)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.config import schema as config_schema
from jaxclr.models import heads, resnet
from jaxclr.models.simclr import build_model


def param_count(depth, width, size, cifar_stem):
  model = resnet.ResNet(depth=depth, width_multiplier=width,
                        cifar_stem=cifar_stem)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("depth,width,size,stem,expected_millions", [
    (50, 1, 224, False, 23.5),   # P1 Table 6 lists 24M with the head.
    (50, 2, 224, False, 94.0),
    (18, 1, 32, True, 11.2),
])
def test_parameter_counts(depth, width, size, stem, expected_millions):
  assert param_count(depth, width, size, stem) / 1e6 == pytest.approx(
      expected_millions, abs=0.1)


def tiny_config(**model):
  c = config_lib.base_config()
  c.image_size = 16
  c.model.depth = 18
  c.model.width_multiplier = 0.25
  c.model.update(model)
  return c


def init(config, num_classes=0):
  model = build_model(config, num_classes)
  x = jnp.ones((4, config.image_size, config.image_size, 3))
  return model, model.init(jax.random.key(0), x, train=True), x


@pytest.mark.slow
def test_last_bn_of_each_block_starts_at_zero_and_convs_have_no_bias():
  _, variables, _ = init(tiny_config())
  flat = flax.traverse_util.flatten_dict(variables["params"])
  last_bn_scales = [v for k, v in flat.items() if k[-2] == "bn2" and
                    k[-1] == "scale" and k[0] == "encoder"]
  assert len(last_bn_scales) == 8  # One per basic block of R-18.
  assert all(np.all(v == 0) for v in last_bn_scales)
  other_scales = [v for k, v in flat.items()
                  if k[-1] == "scale" and k[-2] != "bn2"]
  assert all(np.all(v == 1) for v in other_scales)
  conv_params = {k[-1] for k in flat if "conv" in k[-2]}
  assert conv_params == {"kernel"}  # No conv has a bias.


def test_every_group_starts_with_a_projection_shortcut():
  _, variables, _ = init(tiny_config())
  enc = variables["params"]["encoder"]
  for g in range(1, 5):
    assert "proj_conv" in enc[f"group{g}_block1"]
    assert "proj_conv" not in enc[f"group{g}_block2"]


@pytest.mark.slow
def test_conv_init_is_fan_in_truncated_normal_scale_one():
  model = resnet.ResNet(depth=50, width_multiplier=1.0)
  v = model.init(jax.random.key(1), jnp.ones((1, 32, 32, 3)), train=False)
  k = np.asarray(v["params"]["group3_block1"]["conv2"]["kernel"])
  fan_in = np.prod(k.shape[:-1])
  np.testing.assert_allclose(k.std(), np.sqrt(1.0 / fan_in), rtol=0.05)
  assert np.abs(k).max() <= 2 * np.sqrt(1.0 / fan_in) / 0.8796 + 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("layers", [2, 3])
def test_projection_head_structure(layers):
  config = tiny_config(num_proj_layers=layers, proj_out_dim=12)
  model, variables, x = init(config, num_classes=5)
  head = variables["params"]["projection_head"]
  assert sorted(k for k in head if k.startswith("dense")) == [
      f"dense{j}" for j in range(layers)]
  assert all("bias" not in head[f"dense{j}"] for j in range(layers))
  assert set(head[f"bn{layers - 1}"]) == {"scale"}  # Last BN: no beta.
  assert all(set(head[f"bn{j}"]) == {"scale", "bias"} for j in range(layers - 1))
  out = model.apply(variables, x, train=False)
  h_dim = resnet.feature_dim(18, 0.25)
  assert out["h"].shape == (4, h_dim)
  assert [p.shape for p in out["proj"]] == [(4, h_dim)] * (layers - 1) + [(4, 12)]
  assert out["z"].shape == (4, 12) and out["logits"].shape == (4, 5)


@pytest.mark.slow
@pytest.mark.parametrize("output_norm", ["bn", "bn_no_affine", "none"])
def test_projection_head_output_norm(output_norm):
  """'bn': the last BN learns a scale (SimCLR); 'bn_no_affine': it learns
  nothing and z is standardised over the batch (SimSiam); 'none': z is the
  last Dense's output (Barlow Twins, VICReg)."""
  # The values validation accepts are the ones the head builds.
  assert heads.OUTPUT_NORMS == config_schema.PROJ_OUTPUT_NORMS
  config = tiny_config(num_proj_layers=2, proj_out_dim=12,
                       proj_output_norm=output_norm)
  model, variables, _ = init(config)
  head = variables["params"]["projection_head"]
  stats = variables["batch_stats"]["projection_head"]
  x = jax.random.uniform(jax.random.key(1), (32, 16, 16, 3))
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  dense = out["proj"][0] @ head["dense1"]["kernel"]  # The last Dense's output.
  if output_norm == "none":
    assert "bn1" not in head and "bn1" not in stats
    np.testing.assert_allclose(out["z"], dense, rtol=1e-5, atol=1e-7)
    return
  assert set(head.get("bn1", {})) == ({"scale"} if output_norm == "bn"
                                      else set())
  assert set(stats["bn1"]) == {"mean", "var"}
  want = (dense - dense.mean(0)) / np.sqrt(dense.var(0) + 1e-5)
  np.testing.assert_allclose(out["z"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_probe_does_not_backpropagate_into_the_encoder():
  model, variables, x = init(tiny_config(), num_classes=3)

  def probe_only(params):
    out, _ = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out["logits"] ** 2)

  grads = jax.grad(probe_only)(variables["params"])
  enc_norm = sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads["encoder"]))
  head_norm = sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads["linear_head"]))
  assert float(enc_norm) == 0.0 and float(head_norm) > 0.0


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  config = tiny_config(compute_dtype="bfloat16")
  model, variables, x = init(config)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = model.apply(variables, x, train=False)
  assert out["proj"][0].dtype == jnp.bfloat16
  assert out["z"].dtype == jnp.float32  # Loss inputs are upcast.
  out32 = build_model(tiny_config(), 0).apply(variables, x, train=False)
  np.testing.assert_allclose(out["h"], out32["h"], rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_imagenet_stem_and_groups_downsample_by_32():
  model = resnet.ResNet(depth=18, width_multiplier=0.125)
  x = jnp.ones((1, 64, 64, 3))
  v = model.init(jax.random.key(0), x, train=False)
  _, state = model.apply(v, x, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  last_block = state["intermediates"]["group4_block2"]["__call__"][0]
  assert last_block.shape == (1, 2, 2, 64)  # 64 px / 32, 512 x 0.125 channels


OFFICIAL_DIR = "/work/shared/official"
OFFICIAL_FILES = ("r18_cifar.json", "r50_1x_sk0.json", "r50_1x_sk1.json",
                  "r50_2x_sk1.json")


def official_config(official: dict):
  """The jaxclr pretraining config of an official JSON's `config`."""
  oc = official["config"]
  c = config_lib.base_config()
  c.image_size = oc["image_size"]
  c.model.update(depth=oc["resnet_depth"],
                 width_multiplier=float(oc["width_multiplier"]),
                 sk_ratio=float(oc["sk_ratio"]),
                 num_proj_layers=oc["num_proj_layers"])
  return c


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_parameter_counts_equal_the_official_code(name):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(OFFICIAL_DIR, name)
  if not os.path.exists(path):
    pytest.skip(f"{path} is not on this machine")
  with open(path) as f:
    official = json.load(f)
  c = official_config(official)
  model = build_model(c, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, c.image_size, c.image_size, 3)),
      train=True))
  count = {k: sum(x.size for x in jax.tree.leaves(v))
           for k, v in shapes["params"].items()}
  expected = official["trainable_params"]
  assert count == {"encoder": expected["trunk"],
                   "projection_head": expected["projection_head"],
                   "linear_head": expected["supervised_head"]}


def test_sk_ratio_zero_keeps_todays_variables():
  base = jax.eval_shape(lambda: init(tiny_config())[1])
  zero = jax.eval_shape(lambda: init(tiny_config(sk_ratio=0.0,
                                                 se_ratio=0.0))[1])
  assert jax.tree.structure(base) == jax.tree.structure(zero)


@pytest.mark.slow
def test_selective_kernels_and_squeeze_excitation_structure():
  c = tiny_config(depth=50, width_multiplier=0.125, sk_ratio=0.0625,
                  se_ratio=0.25)
  c.image_size = 32
  c.model.cifar_stem = False
  model, variables, x = init(c)
  enc = variables["params"]["encoder"]
  assert {"stem_conv1", "stem_conv2", "stem_conv3"} <= set(enc)
  assert "stem_conv" not in enc
  block = enc["group2_block1"]
  assert "conv2" not in block and "sk_conv2" in block
  sk = block["sk_conv2"]
  assert sk["conv"]["kernel"].shape == (3, 3, 16, 32)  # 2 streams x 16.
  assert sk["fc1"]["kernel"].shape == (1, 1, 16, 32)  # max(16/16, 32).
  assert sk["fc2"]["kernel"].shape == (1, 1, 32, 32)
  # ResNet-D: the pool strides, the 1x1 projection does not.
  assert block["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
  assert block["se"]["reduce"]["kernel"].shape == (1, 1, 64, 4)  # 16 x 0.25.
  out = model.apply(variables, x, train=False)
  assert out["h"].shape == (4, resnet.feature_dim(50, 0.125))
  assert bool(jnp.all(jnp.isfinite(out["h"])))


def test_resnet_d_shortcut_pooling():
  x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  # Stride 2: zero pad at the end, 'VALID'; the padding counts.
  y = resnet.avg_pool_shortcut(x, 2)
  assert y.shape == (2, 3, 3, 1)
  np.testing.assert_allclose(y[0, 2, 2, 0], x[0, 4, 4, 0] / 4)
  np.testing.assert_allclose(y[0, 0, 0, 0], jnp.mean(x[0, :2, :2, 0]))
  # Stride 1: 'SAME' averages the real pixels only.
  y = resnet.avg_pool_shortcut(x, 1)
  assert y.shape == x.shape
  np.testing.assert_allclose(y[0, 4, 4, 0], x[0, 4, 4, 0])
  np.testing.assert_allclose(y[0, 4, 0, 0], jnp.mean(x[0, 4, :2, 0]))


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_remat_changes_memory_not_values(depth):
  """model.remat: the same variables, outputs, batch statistics and
  gradients; the forward saves far fewer arrays for the backward."""
  kw = dict(depth=depth, width_multiplier=0.125, cifar_stem=True)
  plain, remat = resnet.ResNet(**kw), resnet.ResNet(remat=True, **kw)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  variables = plain.init(jax.random.key(0), x, train=True)
  assert (jax.tree.structure(remat.init(jax.random.key(0), x, train=True))
          == jax.tree.structure(variables))

  def loss(model, params):
    h, new = model.apply({"params": params,
                          "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return jnp.sum(h ** 2), new

  def residual_bytes(model):
    res = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(
        lambda q: loss(model, q)[0], p)[1], variables["params"]))
    return sum(r.size * r.dtype.itemsize for r in res)

  (l0, s0), g0 = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(
      variables["params"])
  (l1, s1), g1 = jax.value_and_grad(lambda p: loss(remat, p), has_aux=True)(
      variables["params"])
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s0, g0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert residual_bytes(remat) < 0.5 * residual_bytes(plain)
