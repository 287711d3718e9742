"""The evaluation job behind `python -m jaxclr.linear_eval`.

restore (or randomly initialise) the encoder -> extract frozen features of the
labelled train and eval splits (centre crop, inference-mode BatchNorm) ->
full-label linear probe (fast or paper protocol) -> few-label probes -> kNN
-> OUT/results.json. protocol='knn' runs the kNN alone (top1/top5 null).

Runs on one process or many (jax.distributed, like pretraining): each
process reads and embeds its slice of every global batch, the features are
all-gathered to every host, and the probes run the same program everywhere;
only process 0 writes results.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from jaxclr import config as config_lib, cpu, errors
from jaxclr.data import input_pipeline, sources, spec as spec_lib, splits
from jaxclr.evaluation import encoder as encoder_lib, knn, linear
from jaxclr.parallel import sharding
from jaxclr.training import workdir as workdir_lib

RESULTS_FILE = "results.json"


def labelled_data_spec(config) -> spec_lib.DataSpec:
  """What an evaluation job reads: the pretraining run's data (or, for a
  random-init encoder, pretrained_workdir='none', the eval config's; read
  before the encoder, so that data errors come first), with the eval config's
  dataset/split/size overrides, its seed, the labelled training split as
  train_split, and crop + flip augmentation (the paper probe's and
  fine-tuning's views)."""
  if config.pretrained_workdir.lower() != "none":  # As load_encoder reads.
    d = encoder_lib.pretraining_config(config.pretrained_workdir)
  else:
    d = config_lib.base_config()
    if config.dataset is None or config.image_size is None:
      raise errors.ConfigError(
          "pretrained_workdir='none' needs dataset and image_size in the eval "
          "config")
  d.seed = config.seed
  for key in ("dataset", "data_dir", "train_split", "eval_split",
              "holdout_fraction", "image_size"):
    if config[key] is not None:
      d[key] = config[key]
  spec = config_lib.data_spec(d)
  if config.train_split is None:  # Not the pretraining run's unlabelled one.
    spec = spec.replace(train_split=sources.labelled_train_split(spec))
  # The paper's crop (not the pretraining run's); labelled_batches drops
  # every colour op.
  default_crop = config_lib.data_spec(config_lib.base_config()).augment
  return spec.replace(augment=default_crop.crop_only())


def checked_splits(config, spec: spec_lib.DataSpec, what: str
                   ) -> tuple[str, str]:
  """(train split, eval split) of an evaluation job's `spec`; ConfigError
  (`splits.check_held_out`) when the eval split holds the training split and
  config.allow_eval_on_train is not set; DataError when either cannot be
  opened (data/validate.py). Called before the job writes its workdir."""
  train_split = sources.resolve_split(spec, None, "train")
  eval_split = sources.resolve_split(spec, None, "eval")
  splits.check_held_out(spec.dataset, train_split, eval_split,
                        allow=config.allow_eval_on_train, what=what)
  for which in ("train", "eval"):  # Bad data stops the job here.
    input_pipeline.open_source(spec, which)
  return train_split, eval_split


def split_fields(train_split: str, eval_split: str) -> dict:
  """results.json's record of the splits (counts: num_*_examples)."""
  return {"train_split": train_split, "eval_split": eval_split,
          "eval_on_train": splits.overlap(train_split, eval_split)}


def eval_model_fields(config) -> dict:
  """The architecture fields an eval config sets (to check or to build)."""
  return {k: v for k, v in config.model.items() if v is not None}


def _features(feature_fn, encoder, mesh, spec, which, batch_size):
  src = input_pipeline.open_source(spec, which)
  batches = input_pipeline.eval_batches(spec.image_size, src, batch_size,
                                        jax.process_index(),
                                        jax.process_count())
  return encoder_lib.extract_features(feature_fn, encoder.variables, mesh,
                                      batches)


def load_encoder(config, mesh) -> encoder_lib.FrozenEncoder:
  """The eval config's encoder: restored, or random-init ('none'), built
  with the convolution this job's layout takes (jaxclr/cpu)."""
  conv = cpu.job_convolution(config.model)
  if config.pretrained_workdir.lower() == "none":
    return encoder_lib.random_encoder(config, mesh, conv=conv)
  step = config.checkpoint_step if config.checkpoint_step >= 0 else None
  return encoder_lib.restore_encoder(config.pretrained_workdir, mesh,
                                     step=step, conv=conv,
                                     eval_model=eval_model_fields(config))


def few_label_probes(config, train, test, num_classes) -> tuple[dict, dict]:
  """Mean and std over draws of the fast probe's top-1 per labels_per_class.

  Each subset (at most max(k) x classes rows) is fitted on one device, the
  same program whatever the mesh: a flat optimum on a few points is reached
  only to round-off, and a sharded solver's round-off would depend on the
  device count (the features themselves do not), flipping borderline test
  predictions between layouts.
  """
  (xtr, ytr), (xte, yte) = train, test
  mean, std = {}, {}
  pad_to = max([int(k) for k in config.labels_per_class], default=0) * \
      num_classes  # One compiled solver for every subset.
  for k in config.labels_per_class:
    accs = []
    for draw in range(config.num_label_draws):
      idx = linear.class_balanced_subset(ytr, int(k), config.seed, draw)
      params, _ = linear.fit_logistic_regression(
          xtr[idx], ytr[idx], num_classes=num_classes, l2=config.fast_l2,
          mesh=None, max_iters=config.fast_max_iters, pad_to=pad_to)
      accs.append(linear.evaluate_linear(params, xte, yte)["top1"])
    mean[str(int(k))] = float(np.mean(accs))
    std[str(int(k))] = float(np.std(accs))
  return mean, std


def run(config, workdir: str, mesh=None) -> dict:
  """Evaluates; writes and returns the results dict."""
  config_lib.validate(config, job="linear_eval")
  workdir_lib.check_path(workdir)
  t_start = time.time()
  mesh = sharding.make_mesh(config.mesh_axis_type) if mesh is None else mesh
  config_lib.check_batch_sizes(
      config, ("eval_batch_size",) + (
          ("batch_size",) if config.protocol == "paper" else ()),
      num_devices=mesh.devices.size, num_processes=jax.process_count())
  spec = labelled_data_spec(config)
  split_names = checked_splits(
      config, spec, "the linear probe" if config.protocol != "knn"
      else "the kNN")
  workdir_lib.prepare(workdir, config, is_primary=jax.process_index() == 0)
  logging.info("jaxclr linear_eval: %s; protocol %s, eval batch %d (%d per "
               "process); train split %r, eval split %r",
               sharding.describe_layout(mesh), config.protocol,
               config.eval_batch_size,
               config.eval_batch_size // jax.process_count(), *split_names)
  encoder = load_encoder(config, mesh)
  train_source = input_pipeline.open_source(spec, "train")
  num_classes = train_source.num_classes
  if num_classes <= 0:
    raise input_pipeline.DataError(
        f"dataset={spec.dataset!r} has no labels; evaluation needs a "
        "labelled dataset")
  feature_fn = encoder_lib.make_feature_fn(encoder.model, mesh,
                                           config.feature_layer)
  run_probes = config.protocol != "knn"
  run_few_label = run_probes and len(config.labels_per_class) > 0
  run_knn = config.knn or config.protocol == "knn"
  # The paper protocol trains on augmented views: with no few-label probe
  # and no kNN, the training split's frozen features are never used (on
  # ImageNet they would cost an inference epoch and 10 GB per host).
  need_train = config.protocol == "fast" or run_few_label or run_knn
  times = {}
  t = time.time()
  train = (_features(feature_fn, encoder, mesh, spec, "train",
                     config.eval_batch_size) if need_train else None)
  test = _features(feature_fn, encoder, mesh, spec, "eval",
                   config.eval_batch_size)
  times["features_s"] = time.time() - t
  train_std = test_std = None
  if config.protocol == "fast" or run_few_label:  # The L-BFGS probes' input.
    mean, std = linear.standardizer(train[0])
    train_std = ((train[0] - mean) / std, train[1])
    test_std = ((test[0] - mean) / std, test[1])

  results = {
      "protocol": config.protocol,
      "checkpoint_step": encoder.checkpoint_step,
      "pretrained_workdir": encoder.source,
      "random_init": encoder.source == "random_init",
      "feature_layer": config.feature_layer,
      "feature_dim": int(test[0].shape[1]),
      "dataset": spec.dataset,
      "num_train_examples": int(train_source.num_examples),
      "num_eval_examples": int(len(test[1])),
      **split_fields(*split_names),
      "model": encoder.model_config,
      "image_size": encoder.image_size,
      "num_devices": int(mesh.devices.size),
  }
  t = time.time()
  results.update(top1=None, top5=None, few_label_top1={},
                 few_label_top1_std={})
  if run_probes:
    results.update(_linear_probe(config, encoder, spec, mesh, workdir,
                                 num_classes, train_std, test_std, test))
    times["linear_s"] = time.time() - t
  if run_few_label:
    t = time.time()
    results["few_label_top1"], results["few_label_top1_std"] = (
        few_label_probes(config, train_std, test_std, num_classes))
    results["few_label_draws"] = config.num_label_draws
    times["few_label_s"] = time.time() - t

  if run_knn:
    t = time.time()
    results["knn_top1"] = knn.knn_accuracy(
        test[0], test[1], train[0], train[1], num_classes=num_classes,
        k=config.knn_k, temperature=config.knn_temperature, mesh=mesh)
    results["knn"] = {"k": config.knn_k, "temperature": config.knn_temperature}
    times["knn_s"] = time.time() - t
  else:
    results["knn_top1"] = None
  times["total_s"] = time.time() - t_start
  results["wall_times"] = times
  write_results(workdir, results)
  return results


def _linear_probe(config, encoder, spec, mesh, workdir, num_classes,
                  train_std, test_std, test) -> dict:
  """top1/top5 of the full-label probe (fast or paper protocol) + details."""
  if config.protocol == "fast":
    params, info = linear.fit_logistic_regression(
        *train_std, num_classes=num_classes, l2=config.fast_l2, mesh=mesh,
        max_iters=config.fast_max_iters)
    return {**linear.evaluate_linear(params, *test_std),
            "fast": {"l2": config.fast_l2, **info}}
  from jaxclr.jobs import paper_probe  # pylint: disable=g-import-not-at-top
  paper = paper_probe.run_paper_probe(
      config, encoder, spec, mesh, workdir, num_classes, eval_features=test)
  return {"top1": paper.pop("top1"), "top5": paper.pop("top5"),
          "paper": paper}


def read_results(workdir: str) -> dict:
  """OUT/results.json of a finished evaluation, fine-tuning or distillation."""
  with open(os.path.join(workdir, RESULTS_FILE)) as f:
    return json.load(f)


def write_results(workdir: str, results: dict) -> None:
  """OUT/results.json, written by process 0 only, atomically (a reader never
  sees half a file; an old results.json is replaced only by a complete one)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, RESULTS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
