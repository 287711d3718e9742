"""jaxclr.convert: official TF2 SimCLR checkpoints -> jaxclr workdirs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.jobs import convert, distill
from jaxclr.models.simclr import build_model
from jaxclr.parallel import sharding

OFFICIAL_DIR = "/work/shared/official"
OFFICIAL_FILES = ("r18_cifar.json", "r50_1x_sk0.json", "r50_1x_sk1.json",
                  "r50_2x_sk1.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_official(name):
  path = os.path.join(OFFICIAL_DIR, name)
  if not os.path.exists(path):
    pytest.skip(f"{path} is not on this machine")
  with open(path) as f:
    return json.load(f)


def jaxclr_config(arch: dict, image_size: int):
  c = config_lib.base_config()
  c.model.update({k: v for k, v in arch.items() if k != "num_classes"})
  c.image_size = image_size
  return c


def jaxclr_leaves(arch: dict, image_size: int) -> dict:
  """{(collection, *path): shape} of the jaxclr model for `arch`."""
  model = build_model(jaxclr_config(arch, image_size), arch["num_classes"])
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, image_size, image_size, 3)),
      train=True))
  return {(c,) + tuple(k.key for k in path): tuple(leaf.shape)
          for c in ("params", "batch_stats") for path, leaf in
          jax.tree_util.tree_flatten_with_path(dict(abstract[c]))[0]}


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_every_official_variable_maps_to_one_jaxclr_leaf(name):
  official = load_official(name)
  variables = official["checkpoint_variables"]
  mapping = convert.official_to_jaxclr(variables)
  arch = convert.infer_architecture(variables)
  oc = official["config"]
  assert (arch["depth"], arch["width_multiplier"], arch["sk_ratio"],
          arch["num_proj_layers"]) == (oc["resnet_depth"],
                                       oc["width_multiplier"], oc["sk_ratio"],
                                       oc["num_proj_layers"])
  leaves = jaxclr_leaves(arch, oc["image_size"])
  targets = [(c,) + p for c, p in mapping.values()]
  assert len(targets) == len(set(targets))  # One official name per leaf.
  assert set(targets) == set(leaves)  # Nothing left over on either side.
  assert len(mapping) == len(variables)
  for n, s in variables:
    c, p = mapping[convert._strip(n)]  # pylint: disable=protected-access
    assert leaves[(c,) + p] == tuple(s), n


def small_variables(name, width, image_size, seed):
  """Official names of `name` with the shapes of a jaxclr model at `width`,
  and random values: a small checkpoint in the official layout."""
  official = load_official(name)
  names = [n for n, _ in official["checkpoint_variables"]]
  arch = convert.infer_architecture(official["checkpoint_variables"])
  arch["width_multiplier"] = width
  arch["num_classes"] = 10
  leaves = jaxclr_leaves(arch, image_size)
  mapping = convert.official_to_jaxclr(official["checkpoint_variables"])
  rng = np.random.default_rng(seed)
  out = {}
  for n in names:
    c, p = mapping[convert._strip(n)]  # pylint: disable=protected-access
    shape = leaves[(c,) + p]
    if p[-1] == "var":
      out[n] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[n] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
  return out, arch


def write_tf_checkpoint(values: dict, directory: str, step: int) -> str:
  """tf.train.Checkpoint(model=<a tf.Module tree named like `values`>)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = tf.Module()
  for name, value in values.items():
    parts = convert._strip(name).split("/")[1:]  # pylint: disable=protected-access
    node = root
    for p in parts[:-1]:
      if not hasattr(node, p):
        setattr(node, p, tf.Module())
      node = getattr(node, p)
    setattr(node, parts[-1], tf.Variable(value))
  ckpt = tf.train.Checkpoint(model=root,
                             global_step=tf.Variable(step, dtype=tf.int64))
  return ckpt.write(os.path.join(directory, "ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("name,width,image_size", [
    ("r18_cifar.json", 0.125, 16),
    ("r50_1x_sk1.json", 0.0625, 32),
])
def test_converted_workdir_restores_the_same_encoder(name, width, image_size,
                                                     tmp_path):
  values, arch = small_variables(name, width, image_size, seed=1)
  written = {n: v.shape for n, v in values.items()}
  path = write_tf_checkpoint(values, str(tmp_path / "tf"), step=7)
  out = str(tmp_path / "workdir")
  config = convert.convert(path, out, image_size=image_size)
  assert config["model"]["sk_ratio"] == arch["sk_ratio"]
  assert config["model"]["width_multiplier"] == width
  mesh = sharding.make_mesh("auto", jax.devices()[:1])
  enc = encoder_lib.restore_encoder(out, mesh)
  assert enc.checkpoint_step == 7
  # The reference: a model built from the TF variables directly.
  mapping = convert.official_to_jaxclr(list(written.items()))
  ref = {"params": {}, "batch_stats": {}}
  for n, v in values.items():
    c, p = mapping[convert._strip(n)]  # pylint: disable=protected-access
    node = ref[c]
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = jnp.asarray(v)
  x = jax.random.uniform(jax.random.key(0), (3, image_size, image_size, 3))
  # The converted workdir teaches jaxclr.distill with the supervised head.
  teacher = distill.load_teacher(out, mesh)
  assert (teacher.kind, teacher.num_classes) == ("pretraining",
                                                 arch["num_classes"])
  with_head = build_model(jaxclr_config(arch, image_size), arch["num_classes"])
  np.testing.assert_allclose(
      teacher.apply(teacher.variables, x),
      with_head.apply(ref, x, train=False)["logits"], rtol=1e-5, atol=1e-5)
  model = build_model(jaxclr_config(arch, image_size), 0)
  ref = {c: {k: v for k, v in ref[c].items() if k != "linear_head"}
         for c in ref}
  want = model.apply(ref, x, train=False)
  got = enc.model.apply(enc.variables, x, train=False)
  np.testing.assert_allclose(got["h"], want["h"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["z"], want["z"], rtol=1e-5, atol=1e-5)
  assert float(jnp.std(got["h"])) > 0
  # jaxclr.export reads the converted workdir too.
  from jaxclr.jobs import export  # pylint: disable=g-import-not-at-top
  manifest = export.export_encoder(out, str(tmp_path / "enc.npz"))
  assert manifest["model"]["sk_ratio"] == arch["sk_ratio"]
  np.testing.assert_allclose(export.load_encoder(str(tmp_path / "enc.npz"))(x),
                             want["h"], rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_workdir_with_checkpoints(tmp_path):
  os.makedirs(tmp_path / "out" / "checkpoints" / "5")
  proc = subprocess.run(
      [sys.executable, "-m", "jaxclr.convert", "--tf_checkpoint",
       str(tmp_path / "none"), "--out", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "refusing to overwrite" in lines[0], proc.stderr


@pytest.mark.parametrize("strides,size", [(1, 5), (2, 5), (2, 6)])
def test_resnet_d_pooling_matches_tensorflow(strides, size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jaxclr.models import resnet  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(
      np.float32)
  t = tf.constant(x)
  if strides > 1:  # The official FixedPadding(2) + AveragePooling2D(VALID).
    t = tf.pad(t, [[0, 0], [0, 1], [0, 1], [0, 0]])
  want = tf.keras.layers.AveragePooling2D(
      2, strides, padding="same" if strides == 1 else "valid")(t).numpy()
  np.testing.assert_allclose(resnet.avg_pool_shortcut(jnp.asarray(x), strides),
                             want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strides", [1, 2])
def test_selective_kernel_conv_matches_a_tensorflow_reference(strides):
  """The official SK_Conv2D's computation, in TF ops, on the same weights
  (inference-mode BN)."""
  import functools  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jaxclr.models import resnet  # pylint: disable=g-import-not-at-top
  norm = resnet.make_batch_norm(False, 0.9, 1e-5, jnp.float32)
  conv = functools.partial(resnet.FixedPaddingConv, dtype=jnp.float32)
  sk = resnet.SelectiveKernelConv(8, strides, 0.0625, norm, conv)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  v = sk.init(jax.random.key(1), x)
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda a: jnp.asarray(
      rng.uniform(0.5, 1.5, a.shape), jnp.float32), v)
  p, s = v["params"], v["batch_stats"]

  def bn_relu(t, name):
    return tf.nn.relu(tf.nn.batch_normalization(
        t, s[name]["mean"], s[name]["var"], p[name]["bias"], p[name]["scale"],
        1e-5))

  t = tf.constant(np.asarray(x))
  if strides > 1:
    t = tf.pad(t, [[0, 0], [1, 1], [1, 1], [0, 0]])
  t = tf.nn.conv2d(t, np.asarray(p["conv"]["kernel"]), strides,
                   "SAME" if strides == 1 else "VALID")
  t = tf.stack(tf.split(bn_relu(t, "bn"), 2, axis=3))
  g = tf.reduce_mean(tf.reduce_sum(t, 0), [1, 2], keepdims=True)
  g = bn_relu(tf.nn.conv2d(g, np.asarray(p["fc1"]["kernel"]), 1, "SAME"),
              "fc1_bn")
  m = tf.nn.conv2d(g, np.asarray(p["fc2"]["kernel"]), 1, "SAME")
  m = tf.nn.softmax(tf.stack(tf.split(m, 2, axis=3)), axis=0)
  want = tf.reduce_sum(t * m, 0).numpy()
  np.testing.assert_allclose(sk.apply(v, x), want, rtol=1e-4, atol=1e-4)
