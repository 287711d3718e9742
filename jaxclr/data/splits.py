"""Held-out splits of users' own data, and the rule that evaluation uses one.

Where held-out examples come from (docs/data.md, "Held-out splits of your
own data"):
  folder:ROOT  whose first level holds split folders: `train/` and at least
               one of `test/`, `validation/`, `val/` (each with class
               sub-folders); every first-level folder is a split.
  npz:PATH     holding `<split>_images` (and `<split>_labels`) arrays, e.g.
               train_images, train_labels, test_images, test_labels.
  holdout_fraction > 0, for data in one pile (a folder without split folders,
               an npz with `images`): a stratified, seeded 'holdout' split;
               'train' is the rest, 'all' everything.

Nothing here depends on the process or device layout: a split is a function
of the files (or arrays) and of HOLDOUT_SEED only, so every host and every
device count sees the same examples in the same split.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np

from jaxclr import errors

# Default eval split of a dataset with several: the first of these it has.
# 'test' first: jaxclr selects no hyperparameter on the eval split, so the
# number it reports is the final one, which a test split is kept for.
HELD_OUT_NAMES = ("test", "validation", "val")
HOLDOUT_SPLIT = "holdout"
# Fixed, not config.seed: an evaluation job runs with its own seed, and its
# 'holdout' must be the very examples the pretraining run left out.
HOLDOUT_SEED = 20261203
# Datasets evaluated on their training split without allow_eval_on_train:
# synthetic's labels are random draws independent of its images (generated
# for tests and benchmarks), so no split of it measures generalisation.
EVAL_ON_TRAIN_DATASETS = ("synthetic",)


def stratified_holdout(labels: np.ndarray, fraction: float,
                       seed: int) -> np.ndarray:
  """bool [N]: round(fraction x n_c) examples of each class c held out.

  Within each class (ascending; -1, unlabelled, is one class, so unlabelled
  data is held out uniformly) a permutation from `seed` picks them. A
  function of (labels, fraction, seed) only.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    held[idx[:int(round(fraction * len(idx)))]] = True
  return held


def select_split(src, split: str, holdout_fraction: float):
  """Split `split` of a `sources.Source` in one pile: 'all'; 'train', all
  but the held-out examples; 'holdout' (holdout_fraction > 0), those of
  `stratified_holdout`. num_classes stays the pile's, so labels agree."""
  valid = ("train", "all") + ((HOLDOUT_SPLIT,) if holdout_fraction > 0
                              else ())
  if split not in valid:
    raise errors.DataError(
        f"{src.name} holds no split folders or arrays, so its splits are "
        f"{valid} (got {split!r}); holdout_fraction > 0 adds 'holdout'")
  if holdout_fraction <= 0 or split == "all":
    return src
  held = stratified_holdout(src.labels, holdout_fraction, HOLDOUT_SEED)
  keep = held if split == HOLDOUT_SPLIT else ~held
  if not keep.any():
    raise errors.DataError(
        f"{src.name}: holdout_fraction={holdout_fraction} leaves split "
        f"{split!r} empty of its {src.num_examples} examples")
  return dataclasses.replace(
      src, num_examples=int(keep.sum()), labels=src.labels[keep],
      images=None if src.images is None else src.images[keep],
      paths=None if src.paths is None else tuple(
          p for p, k in zip(src.paths, keep) if k))


def no_holdout(name: str, found: Sequence[str],
               holdout_fraction: float) -> None:
  """DataError: data with its own splits takes no holdout_fraction."""
  if holdout_fraction > 0:
    raise errors.DataError(
        f"{name} has its own splits {list(found)}; holdout_fraction="
        f"{holdout_fraction} applies to data in one pile only (set it to 0)")


def unknown_split(name: str, split: str,
                  found: Sequence[str]) -> errors.DataError:
  return errors.DataError(f"{name} has no split {split!r}; splits found: "
                          f"{list(found)}")


def default_eval_split(found: Optional[Sequence[str]]) -> str:
  """The preferred held-out split among `found`; 'train' when none is."""
  for name in HELD_OUT_NAMES:
    if found and name in found:
      return name
  return "train"


def folder_split_dirs(root: str) -> Optional[dict[str, str]]:
  """{split: directory} when `root`'s first level holds split folders
  ('train' and one of HELD_OUT_NAMES); None for a folder in one pile."""
  try:
    dirs = sorted(e for e in os.listdir(root)
                  if os.path.isdir(os.path.join(root, e)))
  except OSError:
    return None
  if "train" not in dirs or not any(n in dirs for n in HELD_OUT_NAMES):
    return None
  return {d: os.path.join(root, d) for d in dirs}


def folder_classes(split_dirs: dict[str, str]) -> tuple[str, ...]:
  """Sorted union of the class folders of every split, so that a class has
  the same label in every split (a split may lack some)."""
  return tuple(sorted({c for d in split_dirs.values() for c in os.listdir(d)
                       if os.path.isdir(os.path.join(d, c))}))


def npz_split_names(keys: Sequence[str]) -> tuple[str, ...]:
  """Splits of an npz file: the <split> of each '<split>_images' array."""
  return tuple(sorted(k[:-len("_images")] for k in keys
                      if k.endswith("_images") and len(k) > len("_images")))


def overlap(train_split: str, eval_split: str) -> bool:
  """Whether the eval split holds training examples ('all' holds every)."""
  return train_split == eval_split or "all" in (train_split, eval_split)


def check_held_out(dataset: str, train_split: str, eval_split: str, *,
                   allow: bool, what: str) -> None:
  """ConfigError when `what` would be evaluated on the split it trains on,
  unless `allow` (allow_eval_on_train) or the dataset is synthetic."""
  if not overlap(train_split, eval_split):
    return
  if allow or dataset in EVAL_ON_TRAIN_DATASETS:
    logging.warning("%s evaluates on split %r, which holds its training "
                    "split %r (dataset %r): a training-set accuracy, not a "
                    "held-out one", what, eval_split, train_split, dataset)
    return
  raise errors.ConfigError(
      f"{what} would be evaluated on split {eval_split!r}, which holds its "
      f"training split {train_split!r} (dataset {dataset!r}), so its accuracy "
      "would be measured on training images; give it held-out data (a "
      "folder with train/ and test/ or val/ sub-folders, an npz with "
      "train_images and test_images arrays, --config.holdout_fraction=0.1, "
      "or --config.eval_split=NAME) or pass --config.allow_eval_on_train=True")
