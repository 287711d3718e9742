"""Export a pretrained encoder to one .npz, and load it back as a function.

  python -m jaxclr.export --workdir DIR --out encoder.npz [--step N]

The file holds the encoder's params and BatchNorm statistics as arrays named
'params/<path>' and 'batch_stats/<path>', and '__manifest__': a JSON document
(as uint8 bytes) with the architecture (depth, width_multiplier, cifar_stem,
sk_ratio, se_ratio, image_size, compute_dtype, BN settings, feature_dim),
the checkpoint step and the source workdir. `jaxclr.load_encoder(path)`
rebuilds the ResNet from the manifest, on XLA's convolutions unless asked
otherwise, and returns images [N, H, W, 3] float in [0, 1] -> embeddings h
[N, feature_dim] (inference mode: BatchNorm moving statistics).
"""

from __future__ import annotations

import json
import os

import numpy as np

MANIFEST_KEY = "__manifest__"
FORMAT = "jaxclr.encoder.v1"


def _flatten(tree, prefix):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def export_encoder(workdir: str, out: str, step: int | None = None) -> dict:
  """Writes `out` from `workdir`'s newest (or `step`) checkpoint; returns
  the manifest."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import (  # pylint: disable=g-import-not-at-top
      encoder as encoder_lib)
  from jaxclr.models import (  # pylint: disable=g-import-not-at-top
      resnet, simclr)
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh("auto", jax.devices()[:1])
  enc = encoder_lib.restore_encoder(workdir, mesh, step=step)
  m = dict(enc.model_config)
  config = encoder_lib.pretraining_config(workdir)
  m["cifar_stem"] = simclr.uses_cifar_stem(config.model, enc.image_size)
  manifest = {
      "format": FORMAT,
      "model": {k: m[k] for k in ("depth", "width_multiplier", "cifar_stem",
                                  "sk_ratio", "se_ratio", "bn_momentum",
                                  "bn_epsilon", "compute_dtype")},
      "image_size": enc.image_size,
      "feature_dim": resnet.feature_dim(m["depth"], m["width_multiplier"]),
      "projection_head": {"num_proj_layers": m["num_proj_layers"],
                          "proj_out_dim": m["proj_out_dim"],
                          "exported": False},
      "checkpoint_step": enc.checkpoint_step,
      "source_workdir": enc.source,
  }
  variables = jax.device_get(enc.variables)
  arrays = {**_flatten(variables["params"]["encoder"], "params"),
            **_flatten(variables["batch_stats"]["encoder"], "batch_stats")}
  arrays[MANIFEST_KEY] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, out)
  return manifest


def read_manifest(path: str) -> dict:
  with np.load(path) as f:
    return json.loads(f[MANIFEST_KEY].tobytes().decode())


def _convolution(conv_library: str, manifest: dict):
  """None (XLA's) unless the caller asked for a CPU path; the function
  load_encoder returns computes on one device."""
  if conv_library == "xla":
    return None
  from jaxclr import cpu  # pylint: disable=g-import-not-at-top
  return cpu.job_convolution(
      {"conv_library": conv_library, "conv_kernel_grad": "xla",
       "compute_dtype": manifest["model"].get("compute_dtype")},
      num_devices=1, log=False)


def load_encoder(path: str, *, conv_library: str = "xla"):
  """images [N, H, W, 3] float in [0, 1] -> h [N, feature_dim] (jitted; it
  computes on one device, jax's default).

  Its convolutions are XLA's, whatever the platform, so it runs inside a
  caller's own jit with no custom call. To ask for jaxclr's CPU path
  (TensorFlow's oneDNN kernels as XLA custom calls, float32 exports only;
  jaxclr/cpu, docs/performance.md): conv_library='auto' takes it where a
  one-device CPU job would, 'onednn' insists (a ConfigError where it
  cannot run)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxclr.models import simclr  # pylint: disable=g-import-not-at-top

  with np.load(path) as f:
    manifest = json.loads(f[MANIFEST_KEY].tobytes().decode())
    flat = {k: f[k] for k in f.files if k != MANIFEST_KEY}
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not a jaxclr encoder export "
                     f"(format {manifest.get('format')!r}, want {FORMAT!r})")
  tree = _unflatten(flat)
  variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
  net = simclr.build_encoder(ml_collections.ConfigDict(manifest["model"]),
                             manifest["image_size"],
                             conv=_convolution(conv_library, manifest))
  apply = jax.jit(lambda v, x: net.apply(v, x.astype(jnp.float32),
                                         train=False).astype(jnp.float32))

  def embed(images):
    return apply(variables, jnp.asarray(images))

  embed.manifest = manifest
  return embed
