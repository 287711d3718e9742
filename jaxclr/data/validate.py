"""Checks of a user's data, made when a source is opened: before anything is
compiled and before the job writes into its workdir (jobs open their sources
first). Each failure is one DataError naming the file or folder, what is
wrong and what would be valid; docs/reliability.md ("Bad data") lists every
kind and tests/bad_data_test.py tests each.

Labels are class indices 0..K-1 with every class present, or -1 throughout
for unlabelled data: a gap in 0..K-1 (labels counted from 1, a class left
out when subsetting, a stray huge value) would give the classifier classes
that no example has, and a mix of -1 and classes would train a probe on
"unlabelled" as if it were a label.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Mapping, Optional

import numpy as np

from jaxclr import errors

DataError = errors.DataError
# What np.load and zipfile raise for a damaged or foreign file.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
UNLABELLED = -1


def open_npz(path: str):
  """np.load of an .npz archive; DataError for anything else."""
  if os.path.isdir(path):
    raise DataError(f"npz:{path} is a directory; give the .npz file (or use "
                    f"folder:{path} for a folder of images)")
  if not os.path.isfile(path):
    raise DataError(f"npz file {path!r} not found (dataset 'npz:{path}')")
  try:
    f = np.load(path)
  except READ_ERRORS as e:
    raise DataError(f"cannot read npz file {path!r}: not an .npz archive, or "
                    f"a damaged one ({type(e).__name__}: {e}); write it with "
                    "np.savez(path, images=..., labels=...)") from e
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise DataError(f"{path} is a single .npy array, not an .npz archive of "
                    "named arrays; write it with np.savez(path, images=..., "
                    "labels=...)")
  return f


def npz_array(path: str, f, key: str) -> np.ndarray:
  """Array `key` of an open npz; DataError if it cannot be read."""
  try:
    return f[key]
  except ValueError as e:
    if "allow_pickle" in str(e):  # numpy's words for an object array.
      raise DataError(
          f"{path}: {key!r} is an array of Python objects (images of "
          "different sizes?); jaxclr reads one uint8 array [N, H, W, 3] of "
          "equal-sized images: resize them to one size first, or use a "
          "folder: dataset, whose images may differ in size") from e
    raise DataError(f"cannot read {key!r} of {path}: {e}") from e
  except READ_ERRORS as e:
    raise DataError(f"cannot read {key!r} of {path} (damaged or truncated "
                    f"file? {type(e).__name__}: {e})") from e


def npz_images(path: str, key: str, images: np.ndarray) -> np.ndarray:
  """`images` if it is uint8 [N > 0, H > 0, W > 0, 3]."""
  shape, got = list(images.shape), f"got {images.dtype} {list(images.shape)}"
  if images.dtype != np.uint8:
    hint = (" (floats in [0, 1]? store np.round(x * 255).astype(np.uint8))"
            if np.issubdtype(images.dtype, np.floating) else "")
    raise DataError(f"{path}: {key!r} must be uint8 [N, H, W, 3]; {got}"
                    + hint)
  if images.ndim != 4 or shape[-1] != 3:
    hint = (" (grayscale? repeat it to 3 channels: x[..., None].repeat(3, -1))"
            if images.ndim == 3 or shape[-1] == 1 else
            " (RGBA? drop the alpha channel: x[..., :3])"
            if images.ndim == 4 and shape[-1] == 4 else "")
    raise DataError(f"{path}: {key!r} must be uint8 [N, H, W, 3]; {got}"
                    + hint)
  if shape[0] == 0:
    raise DataError(f"{path}: {key!r} is empty (0 images)")
  if 0 in shape[1:3]:
    raise DataError(f"{path}: {key!r} has images of height or width 0 "
                    f"({got})")
  return images


def npz_labels(path: str, key: str, raw: Optional[np.ndarray],
               n: Optional[int]) -> np.ndarray:
  """int32 [N] class indices from `raw` (None: unlabelled, -1s); n: the
  images' count, when known. Values are checked by `num_classes`."""
  if raw is None:
    return np.full(n or 0, UNLABELLED, np.int32)
  if raw.ndim != 1:
    hint = (" (one-hot? store labels.argmax(-1))" if raw.ndim == 2 and
            raw.shape[-1] > 1 else " (store labels.reshape(-1))")
    raise DataError(f"{path}: {key!r} must be class indices [N]; got shape "
                    f"{list(raw.shape)}" + hint)
  if not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_):
    raise DataError(f"{path}: {key!r} must be integer class indices; got "
                    f"{raw.dtype} (whole numbers stored as floats? store "
                    "labels.astype(np.int64))")
  if n is not None and raw.shape[0] != n:
    raise DataError(f"{path}: {raw.shape[0]} {key} for {n} images; give one "
                    "label per image")
  if raw.size and (raw.min() < np.iinfo(np.int32).min or
                   raw.max() > np.iinfo(np.int32).max):
    raise DataError(f"{path}: {key!r} holds values beyond int32 "
                    f"([{raw.min()}, {raw.max()}])")
  return raw.astype(np.int32)


def num_classes(name: str, labels: Mapping[str, np.ndarray]) -> int:
  """K for labels 0..K-1 over every label array of `name` ({array name:
  labels}, one per split); 0 when unlabelled. DataError for negative labels
  other than -1, an array mixing -1 with classes, or classes of 0..K-1 that
  no example has."""
  present = set()
  total = 0
  for key, y in labels.items():
    if not y.size:
      continue
    total += y.size
    low = int(y.min())
    if low < UNLABELLED:
      raise DataError(f"{name}: {key!r} has label {low}; labels are "
                      "class indices 0..K-1, or -1 throughout for unlabelled "
                      "data")
    unlabelled = int(np.sum(y == UNLABELLED))
    if 0 < unlabelled < y.size:
      raise DataError(f"{name}: {key!r} mixes {unlabelled} unlabelled (-1) "
                      f"examples with {y.size - unlabelled} labelled ones; "
                      "label every example of a split, or none")
    if not unlabelled:
      present.update(np.unique(y).tolist())
  if not present:
    return 0
  k = max(present) + 1
  if k > total:  # More classes than examples: some class has none.
    raise DataError(f"{name}: label {k - 1} implies {k} classes but there are "
                    f"only {total} examples; labels must be 0..K-1 (remap "
                    "them, e.g. np.unique(labels, return_inverse=True)[1])")
  missing = sorted(set(range(k)) - present)
  if missing:
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5
                                                else "")
    raise DataError(f"{name}: labels run 0..{k - 1} but no example has "
                    f"class {shown} ({len(missing)} of {k}); labels must be "
                    "0..K-1 with every class present (counted from 1? remap "
                    "them, e.g. np.unique(labels, return_inverse=True)[1])")
  return k


def check_batch_fits(name: str, num_examples: int, batch_size: int,
                     what: str = "training examples") -> None:
  if batch_size > num_examples:
    raise DataError(f"batch_size={batch_size} exceeds the {num_examples} "
                    f"{what} of {name}; use batch_size <= {num_examples}")


def folder_root(root: str) -> None:
  """DataError unless `root` is a directory."""
  if os.path.isdir(root):
    return
  if os.path.exists(root):
    raise DataError(f"folder:{root} is a file, not a folder (for an .npz "
                    f"archive use npz:{root})")
  raise DataError(f"folder {root!r} does not exist (dataset 'folder:{root}')")


def walk_images(root: str, extensions) -> list[str]:
  """Image files under `root`, sorted, following symbolic links; DataError
  for a directory reached twice (a link loop would never end, and a second
  link to a directory would read its images twice)."""
  files, seen = [], {}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      raise DataError(f"folder {root!r}: {dirpath} is the directory "
                      f"{seen[real]} again (a symbolic link loop or a second "
                      "link to it); remove the link")
    seen[real] = dirpath
    dirnames.sort()
    files += [os.path.join(dirpath, f) for f in sorted(filenames)
              if f.endswith(extensions)]
  return files


def class_layout(root: str, good: list[str], skipped: list[str],
                 labelled_elsewhere: bool) -> bool:
  """Whether the readable images `good` under `root` are labelled by their
  first-level folder. DataError for images both in class folders and loose
  beside them, for a class folder without a readable image, and (with
  labelled_elsewhere: another split has classes) for loose images."""
  loose = [f for f in good if os.path.dirname(f) == root]
  in_folders = len(good) - len(loose)
  if loose and (in_folders or labelled_elsewhere):
    where = ("class folders" if in_folders else
             "the class folders of the dataset's other splits")
    raise DataError(
        f"folder {root!r} holds {len(loose)} images outside {where} (first: "
        f"{os.path.basename(loose[0])}); move them into a class folder, or "
        "(unlabelled data) keep every image out of class folders")
  if loose:
    return False
  classes = sorted(e for e in os.listdir(root) if not e.startswith(".") and
                   os.path.isdir(os.path.join(root, e)))
  used = {os.path.relpath(f, root).split(os.sep)[0] for f in good}
  for c in classes:
    if c not in used:
      bad = sum(os.path.relpath(f, root).split(os.sep)[0] == c
                for f in skipped)
      why = f"all {bad} of its image files are unreadable" if bad else (
          "it holds no image files")
      raise DataError(f"folder {root!r}: class folder {c!r} has no readable "
                      f"image ({why}); add images or remove the folder")
  return True
