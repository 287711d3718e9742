"""Convert an official SimCLRv1/v2 TF2 checkpoint into a jaxclr workdir.

  python -m jaxclr.convert --tf_checkpoint PATH --out DIR [--image_size N]

Reads the `model/...` variables of a checkpoint written by google-research/
simclr `tf2/` (tf.train.Checkpoint(model=model); the released SimCLRv1 and
v2 TF2 checkpoints), infers the architecture from their names and shapes
(flags may pin it), and writes DIR/config.json (the pretraining schema) and
DIR/checkpoints/<global_step>/ (a TrainState with a fresh optimizer state),
which jaxclr.linear_eval, jaxclr.finetune and jaxclr.export read. The layout
of each variable is documented in docs/simclr.md 5.7.
"""

from __future__ import annotations

import os
import re


from jaxclr import errors

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# BatchNorm: official leaf -> (jaxclr collection, leaf).
BN_LEAVES = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
             "moving_mean": ("batch_stats", "mean"),
             "moving_variance": ("batch_stats", "var")}
# Stem layer index -> jaxclr module: ResNet-D (SK) stem, else one conv.
SK_STEM = {0: "stem_conv1", 1: "stem_bn1", 2: "stem_conv2", 3: "stem_bn2",
           4: "stem_conv3", 6: "stem_bn3"}
PLAIN_STEM = {0: "stem_conv", 2: "stem_bn"}
SK_PARTS = {"conv2d_fixed_padding/conv2d": "conv", "batch_norm_relu/bn": "bn",
            "conv2d_0": "fc1", "batch_norm_relu_1/bn": "fc1_bn",
            "conv2d_1": "fc2"}
NUM_EXAMPLES = {"imagenet2012": 1281167, "cifar10": 50000}


def _strip(name: str) -> str:
  return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


def _leaf(module_path: tuple, leaf: str):
  """(collection, path) of a conv/dense/BN/SE leaf named `leaf`."""
  if leaf in BN_LEAVES:
    collection, name = BN_LEAVES[leaf]
    return collection, module_path + (name,)
  if leaf in ("kernel", "bias"):
    return "params", module_path + (leaf,)
  raise ValueError(f"unknown variable leaf {leaf!r} under {module_path}")


def _block_layers(names: list[str], prefix: str) -> dict:
  """{official name: jaxclr path inside the block} for one residual block."""
  out = {}
  rest = {n: n[len(prefix):] for n in names}
  convs, bns = [], []  # (index, name, leaf) of the plain layers, in order.
  for n, r in rest.items():
    parts = r.split("/")
    if parts[0] in ("shortcut_layers", "projection_layers"):
      module = "proj_conv" if parts[2] == "conv2d" else "proj_bn"
      out[n] = ((module,), parts[-1])
    elif parts[0] == "se_layer" or parts[2].startswith("se_"):
      which = parts[-2].replace("se_", "")  # reduce / expand
      out[n] = (("se", which), parts[-1])
    elif len(parts) > 3 and "/".join(parts[2:-1]) in SK_PARTS:
      out[n] = (("sk_conv2", SK_PARTS["/".join(parts[2:-1])]), parts[-1])
    elif parts[2] == "conv2d":
      convs.append((int(parts[1]), n, parts[-1]))
    elif parts[2] == "bn":
      bns.append((int(parts[1]), n, parts[-1]))
    else:
      raise ValueError(f"unknown block variable {n!r}")
  conv_idx = sorted({i for i, _, _ in convs})
  bn_idx = sorted({i for i, _, _ in bns})
  has_sk = any(m[0] == "sk_conv2" for m, _ in out.values())
  # Bottleneck: conv1, conv2, conv3 (conv2 replaced by SK); basic: 1, 2.
  numbers = [1, 3] if has_sk else list(range(1, len(conv_idx) + 1))
  for i, n, leaf in convs:
    out[n] = ((f"conv{numbers[conv_idx.index(i)]}",), leaf)
  for i, n, leaf in bns:
    out[n] = ((f"bn{numbers[bn_idx.index(i)]}",), leaf)
  return out


def official_to_jaxclr(names_and_shapes) -> dict:
  """{official variable name: (collection, jaxclr path tuple)}.

  Args:
    names_and_shapes: (name, shape) pairs as tf.train.list_variables gives
      them. Variables outside `model/` (global_step, optimizer slots) and the
      optimizer slots inside it are skipped.

  Returns:
    collection is 'params' or 'batch_stats'; paths start with 'encoder',
    'projection_head' or 'linear_head'.
  """
  names = [_strip(n) for n, _ in names_and_shapes
           if n.startswith("model/") and "OPTIMIZER_SLOT" not in n
           and n.endswith(SUFFIX)]
  mapping = {}
  stem = [n for n in names if "/initial_conv_relu_max_pool/" in n]
  stem_map = SK_STEM if any("/initial_conv_relu_max_pool/4/" in n
                            for n in stem) else PLAIN_STEM
  for n in stem:
    i = int(n.split("/initial_conv_relu_max_pool/")[1].split("/")[0])
    mapping[n] = _leaf(("encoder", stem_map[i]), n.split("/")[-1])
  blocks: dict = {}
  for n in names:
    m = re.match(r"(model/resnet_model/block_groups/(\d+)/layers/(\d+)/)", n)
    if m:
      blocks.setdefault((int(m[2]), int(m[3]), m[1]), []).append(n)
  for (g, b, prefix), block_names in blocks.items():
    for n, (module, leaf) in _block_layers(block_names, prefix).items():
      mapping[n] = _leaf(("encoder", f"group{g + 1}_block{b + 1}") + module,
                         leaf)
  for n in names:
    m = re.match(r"model/_projection_head/linear_layers/(\d+)/(dense|bn_relu/bn)/", n)
    if m:
      module = f"dense{m[1]}" if m[2] == "dense" else f"bn{m[1]}"
      mapping[n] = _leaf(("projection_head", module), n.split("/")[-1])
    elif n.startswith("model/supervised_head/linear_layer/dense/"):
      mapping[n] = _leaf(("linear_head", "Dense_0"), n.split("/")[-1])
  unknown = sorted(set(names) - set(mapping))
  if unknown:
    raise ValueError(f"{len(unknown)} official variable(s) have no jaxclr "
                     f"counterpart (first: {unknown[0]})")
  return mapping


def infer_architecture(names_and_shapes) -> dict:
  """The jaxclr model fields (+ num_classes of the supervised head, 0 if
  none) that the official variables describe."""
  from jaxclr.models import resnet  # pylint: disable=g-import-not-at-top
  shapes = {_strip(n): tuple(s) for n, s in names_and_shapes}
  def shape(pattern):
    return next(s for n, s in shapes.items() if re.fullmatch(pattern, n))
  blocks = {}
  for n in shapes:
    m = re.match(r"model/resnet_model/block_groups/(\d+)/layers/(\d+)/", n)
    if m:
      blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
  per_group = tuple(blocks[g] for g in sorted(blocks))
  bottleneck = any("conv_relu_dropblock_layers" in n for n in shapes)
  depth = next(d for d, p in resnet.BLOCKS_PER_GROUP.items()
               if p == per_group and (d >= 50) == bottleneck)
  first = shape(r"model/resnet_model/block_groups/0/layers/0/"
                r"(conv_relu_dropblock|conv2d_bn)_layers/0/conv2d/kernel")
  width = first[-1] / 64
  stem = shape(r"model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel")
  resnet_d = any(re.search(r"(projection|shortcut)_layers/[1-9]/conv2d", n)
                 for n in shapes)
  sk_ratio = 0.0
  if resnet_d:  # The mixing width is max(F * r, 32): exact only above 32.
    mid = [s[-1] for n, s in shapes.items() if n.endswith("/3/conv2d_0/kernel")]
    filters = 512 * width
    sk_ratio = mid[-1] / filters if mid and max(mid) > 32 else 0.0625
  se = [s[-1] for n, s in shapes.items() if "se_reduce/kernel" in n]
  se_ratio = float(se[-1] / (512 * width)) if se else 0.0
  head = sorted(int(m[1]) for n in shapes if (m := re.match(
      r"model/_projection_head/linear_layers/(\d+)/dense/kernel", n)))
  sup = [s for n, s in shapes.items()
         if n == "model/supervised_head/linear_layer/dense/kernel"]
  return {
      "depth": depth, "width_multiplier": float(width),
      "cifar_stem": stem[0] == 3 and not resnet_d,
      "sk_ratio": float(sk_ratio), "se_ratio": se_ratio,
      "num_proj_layers": len(head),
      "proj_out_dim": int(shape(rf"model/_projection_head/linear_layers/"
                                rf"{head[-1]}/dense/kernel")[-1]),
      "num_classes": int(sup[0][-1]) if sup else 0,
  }


def read_checkpoint(path: str):
  """({stripped name: np.ndarray}, global_step or 0, names_and_shapes)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(path)
  names_and_shapes = sorted(reader.get_variable_to_shape_map().items())
  values = {_strip(n): reader.get_tensor(n) for n, _ in names_and_shapes
            if n.startswith("model/") and n.endswith(SUFFIX)}
  step_name = "global_step" + SUFFIX
  step = int(reader.get_tensor(step_name)) if reader.has_tensor(
      step_name) else 0
  return values, step, names_and_shapes


def _nest(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def convert(tf_checkpoint: str, out: str, *, image_size: int | None = None,
            dataset: str | None = None, **model_overrides) -> dict:
  """Writes the workdir `out`; returns its config as a dict.

  Raises:
    WorkdirError: `out` already holds checkpoints.
  """
  from jaxclr.training import (  # pylint: disable=g-import-not-at-top
      workdir as workdir_lib)
  if workdir_lib.checkpoint_steps(out):
    raise errors.WorkdirError(
        f"--out {out!r} already holds checkpoints; refusing to overwrite "
        "it (choose a new directory)")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib
  from jaxclr.models.simclr import (  # pylint: disable=g-import-not-at-top
      build_model)
  from jaxclr.training import (  # pylint: disable=g-import-not-at-top
      checkpoint, optim, state as state_lib)

  values, step, names_and_shapes = read_checkpoint(tf_checkpoint)
  arch = infer_architecture(names_and_shapes)
  arch.update({k: v for k, v in model_overrides.items() if v is not None})
  num_classes = arch.pop("num_classes")
  config = config_lib.base_config()
  config.model.update(arch)
  config.image_size = image_size or (32 if arch["cifar_stem"] else 224)
  config.dataset = dataset or ("cifar10" if arch["cifar_stem"]
                               else "imagenet2012")
  config.linear_probe = num_classes > 0
  check = config.copy_and_resolve_references()
  check.dataset = "synthetic"  # Validate the architecture, not the data.
  config_lib.validate(check)

  model = build_model(config, num_classes)
  size = config.image_size
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, size, size, 3)), train=True))
  expected = {(c,) + tuple(getattr(k, "key", k) for k in path): leaf
              for c in ("params", "batch_stats") for path, leaf in
              jax.tree_util.tree_flatten_with_path(dict(abstract[c]))[0]}
  flat = {}
  for name, (collection, path) in official_to_jaxclr(names_and_shapes).items():
    key = (collection,) + path
    if key not in expected or expected[key].shape != values[name].shape:
      raise errors.CheckpointError(
          f"{name} {values[name].shape} does not fit jaxclr's {'/'.join(key)} "
          f"{getattr(expected.get(key), 'shape', 'absent')}")
    flat[key] = jnp.asarray(values[name], jnp.float32)
  missing = sorted("/".join(k) for k in set(expected) - set(flat))
  if missing:
    raise errors.CheckpointError(
        f"the checkpoint lacks {len(missing)} variable(s) of the model it "
        f"describes (first: {missing[0]})")
  tree = _nest(flat)
  plan = optim.training_plan(config, NUM_EXAMPLES.get(config.dataset, 50000))
  optimizer = optim.create_optimizer(config, plan)
  train_state = state_lib.create(tree["params"], tree["batch_stats"],
                                 optimizer).replace(
                                     step=jnp.asarray(step, jnp.int32))
  workdir_lib.prepare(out, config, is_primary=True)
  with checkpoint.CheckpointStore(
      os.path.join(out, workdir_lib.CHECKPOINT_DIR), async_save=False) as store:
    store.save(step, train_state, {"dataset": config.dataset,
                                   "num_classes": num_classes, "step": step,
                                   "converted_from": os.path.abspath(
                                       tf_checkpoint)}, force=True)
    store.wait_until_finished()
  return workdir_lib.config_to_dict(config)
