"""The periodic kNN hook logs eval/knn_top1 equal to a standalone kNN on the
same checkpoint (restored encoder, eval preprocessing, sharded bank)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib, knn
from jaxclr.jobs import pretrain
from jaxclr.parallel import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  spec = importlib.util.spec_from_file_location(
      "synthetic_tiny", os.path.join(REPO, "configs", "synthetic_tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("steps=2,every=1")


@pytest.mark.slow
def test_periodic_knn_matches_standalone(tmp_path):
  config = tiny_config()
  config.eval_every_steps = 2
  workdir = str(tmp_path)
  pretrain.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f if l.strip()]
  evals = [r for r in records if "eval/knn_top1" in r]
  assert [r["step"] for r in evals] == [2]
  logged = evals[0]["eval/knn_top1"]

  mesh = sharding.make_mesh("explicit")
  enc = encoder_lib.restore_encoder(workdir, mesh, step=2)
  fn = encoder_lib.make_feature_fn(enc.model, mesh, feature_layer=0)
  data = config_lib.data_spec(encoder_lib.pretraining_config(workdir))
  src = input_pipeline.open_source(data, "train")
  bank = encoder_lib.extract_features(
      fn, enc.variables, mesh,
      input_pipeline.eval_batches(data.image_size, src, 16))
  # synthetic's eval split is its train split: the bank is queried by itself.
  q = encoder_lib.extract_features(
      fn, enc.variables, mesh,
      input_pipeline.eval_batches(data.image_size, src, 16))
  want = knn.knn_accuracy(q[0], q[1], bank[0], bank[1], num_classes=4,
                          mesh=None)
  assert 0.0 < logged <= 1.0
  np.testing.assert_allclose(logged, want, atol=1.01 / len(q[1]))


def test_periodic_knn_on_the_training_split_is_refused(tmp_path):
  """A folder in one pile: the kNN's queries would be its bank."""
  from PIL import Image
  import pytest
  for c in ("a", "b"):
    os.makedirs(tmp_path / "data" / c)
    for i in range(8):
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(
          tmp_path / "data" / c / f"{i}.png")
  config = tiny_config()
  config.dataset, config.eval_every_steps = f"folder:{tmp_path}/data", 1
  with pytest.raises(config_lib.ConfigError,
                     match=r"^the periodic kNN would be evaluated on split "
                     r"'train'.*allow_eval_on_train=True"):
    pretrain.run(config, str(tmp_path / "w"))
  config.holdout_fraction = 0.25  # 'holdout': 4 of the 16 images.
  spec = config_lib.data_spec(config)
  assert input_pipeline.open_source(spec, "eval").num_examples == 4
