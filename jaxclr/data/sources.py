"""Random-access image sources: example i -> (image, label), by `spec.dataset`.

Kinds of `Source.kind`:
  'array':   `images` is a uint8 array [N, H, W, 3] in memory.
  'encoded': `get_encoded(i)` gives encoded JPEG/PNG bytes (TFDS array_record).
  'files':   `paths[i]` is an image file, decoded with PIL (errors tolerated).
  'stream':  TFDS tfrecord-only build too big for memory; no random access.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Optional, Sequence

import numpy as np

from jaxclr import errors
from jaxclr.data import (spec as spec_lib, splits as splits_lib, synthetic,
                         validate)

DataError = errors.DataError

# TFDS splits smaller than this (decoded) are loaded into memory when the
# build is tfrecord-only, which keeps them random-access and layout-invariant.
MAX_IN_MEMORY_BYTES = 3 * 2**30
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")

# TFDS names we know, with (pretraining split, eval split).
TFDS_DEFAULT_SPLITS = {
    "imagenet2012": ("train", "validation"),
    "imagenet2012_subset/1pct": ("train", "validation"),
    "imagenet2012_subset/10pct": ("train", "validation"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("unlabelled", "test"),
}
LOCAL_DEFAULT_SPLITS = {"digits": ("train", "test"),
                        "synthetic": ("train", "train")}


@dataclasses.dataclass
class Source:
  name: str
  kind: str
  num_examples: int
  num_classes: int  # 0 when unlabelled.
  labels: Optional[np.ndarray]  # int32 [N], -1 unlabelled; None: 'encoded'/'stream'.
  images: Optional[np.ndarray] = None  # 'array'
  paths: Optional[Sequence[str]] = None  # 'files'
  get_encoded: Optional[Callable[[int], tuple]] = None  # 'encoded': (bytes, label)
  # 'encoded', optional: ids -> (list of bytes, labels) in one read.
  get_encoded_batch: Optional[Callable[[np.ndarray], tuple]] = None
  make_stream: Optional[Callable] = None  # 'stream': (index, count) -> tf.data
  skipped: Sequence[str] = ()  # 'files': unreadable files left out.


def default_splits(data: spec_lib.DataSpec) -> tuple[str, str]:
  """(pretraining split, eval split) of `data` when the config sets none."""
  dataset = data.dataset
  if dataset in TFDS_DEFAULT_SPLITS:
    return TFDS_DEFAULT_SPLITS[dataset]
  if dataset in LOCAL_DEFAULT_SPLITS:
    return LOCAL_DEFAULT_SPLITS[dataset]
  if dataset.startswith("tfds:"):  # Most TFDS datasets; else set eval_split.
    return ("train", "test")
  if data.holdout_fraction > 0:  # One pile, split by holdout_fraction.
    return ("train", splits_lib.HOLDOUT_SPLIT)
  # folder:/npz: their held-out split, if they have one, else 'train'.
  return ("train", splits_lib.default_eval_split(local_splits(dataset)))


def local_splits(dataset: str) -> Optional[tuple[str, ...]]:
  """The named splits of a folder:/npz: dataset; None for one pile (or a
  path that does not exist: opening it raises)."""
  if dataset.startswith("folder:"):
    found = splits_lib.folder_split_dirs(os.path.abspath(dataset[7:]))
    return tuple(found) if found else None
  if dataset.startswith("npz:") and os.path.isfile(dataset[4:]):
    try:
      with validate.open_npz(dataset[4:]) as f:
        return splits_lib.npz_split_names(f.files) or None
    except DataError:  # Opening it for its split says why.
      return None
  return None


# Pretraining splits without labels, and where the dataset keeps its labelled
# training examples (what evaluation probes and kNN banks must read).
LABELLED_INSTEAD_OF = {("stl10", "unlabelled"): "train"}


def labelled_train_split(data: spec_lib.DataSpec) -> str:
  """The training split that evaluation reads: the pretraining split, unless
  that is a dataset's unlabelled split (STL-10 pretrains on 'unlabelled'; its
  5,000 labelled training images are 'train')."""
  split = resolve_split(data, None, "train")
  return LABELLED_INSTEAD_OF.get((data.dataset, split), split)


def resolve_split(data: spec_lib.DataSpec, split: Optional[str],
                  which: str) -> str:
  """`split`, or the spec's, or the dataset's default for `which`
  ('train' or 'eval')."""
  if split is None:
    split = data.train_split if which == "train" else data.eval_split
  if split is None:
    split = default_splits(data)[0 if which == "train" else 1]
  return split


# ---------------------------------------------------------------- digits
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 20261123  # Fixed: the split never depends on the seed.


@functools.lru_cache(maxsize=None)
def _digits_all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All 1,797 digits as uint8 [N, 32, 32, 3], labels, and the test mask."""
  from PIL import Image
  from sklearn import datasets
  d = datasets.load_digits()
  small = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
  big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32),
                                                        Image.BICUBIC))
                  for im in small])
  images = np.repeat(big[..., None], 3, axis=-1)
  labels = d.target.astype(np.int32)
  # Stratified: within each class a fixed permutation; first 25% are test.
  test = splits_lib.stratified_holdout(labels, DIGITS_TEST_FRACTION,
                                       DIGITS_SPLIT_SEED)
  return images, labels, test


def digits_source(split: str) -> Source:
  images, labels, test = _digits_all()
  if split not in ("train", "test", "all"):
    raise DataError(f"digits has no split {split!r}; valid: 'train', 'test', "
                    "'all'")
  sel = {"train": ~test, "test": test, "all": np.ones_like(test)}[split]
  return Source("digits", "array", int(sel.sum()), 10, labels[sel],
                images=images[sel])


# ---------------------------------------------------------------- npz
def npz_source(path: str, split: str, holdout_fraction: float = 0.0) -> Source:
  """Arrays `images` [N,H,W,3] uint8 (+ `labels` [N]): one pile; or, per
  split, `<split>_images` (+ `<split>_labels`), labels shared by all.
  Checked as validate.py says (DataError naming the array)."""
  name = f"npz:{path}"
  with validate.open_npz(path) as f:
    found = splits_lib.npz_split_names(f.files)
    if not found:
      if "images" not in f:
        raise DataError(
            f"{path} has no 'images' array (found {sorted(f.files)}); "
            "expected images [N,H,W,3] uint8 and optional labels [N], or "
            "per split <split>_images and <split>_labels")
      images = validate.npz_images(path, "images",
                                   validate.npz_array(path, f, "images"))
      labels = _npz_labels(path, f, "labels", len(images))
      num_classes = validate.num_classes(name, {"labels": labels})
      src = Source(name, "array", len(images), num_classes, labels,
                   images=images)
      return splits_lib.select_split(src, split, holdout_fraction)
    splits_lib.no_holdout(name, found, holdout_fraction)
    if split not in found:
      raise splits_lib.unknown_split(name, split, found)
    # Every split's labels, so that num_classes is the same in each.
    labels = {s: _npz_labels(path, f, f"{s}_labels", None) for s in found}
    num_classes = validate.num_classes(
        name, {f"{s}_labels": y for s, y in labels.items()})
    images = validate.npz_images(
        path, f"{split}_images", validate.npz_array(path, f, f"{split}_images"))
    if f"{split}_labels" in f and len(labels[split]) != len(images):
      raise DataError(f"{path}: {len(labels[split])} {split}_labels for "
                      f"{len(images)} images; give one label per image")
    split_labels = (labels[split] if f"{split}_labels" in f else
                    np.full(len(images), -1, np.int32))
  return Source(name, "array", len(images), num_classes, split_labels,
                images=images)


def _npz_labels(path: str, f, key: str, n: Optional[int]) -> np.ndarray:
  """int32 labels under `key`, -1s when absent; n: the images' count."""
  raw = validate.npz_array(path, f, key) if key in f else None
  return validate.npz_labels(path, key, raw, n)


# ---------------------------------------------------------------- folder
def _readable_header(path: str) -> Optional[str]:
  """None if PIL can identify the image, else the reason."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.size  # pylint: disable=pointless-statement
      if im.width < 1 or im.height < 1:
        return "empty image"
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


def folder_source(root: str, split: str = "train",
                  holdout_fraction: float = 0.0) -> Source:
  """Split `split` of the images under `root`.

  A folder whose first level holds split folders (`splits.folder_split_dirs`:
  train/ and test/, validation/ or val/) has those splits, each read as
  below, with labels from the union of their class folders; any other folder
  is one pile (`splits.select_split`: 'train', 'all', and with
  holdout_fraction 'holdout').
  """
  validate.folder_root(root)
  name = f"folder:{root}"
  split_dirs = splits_lib.folder_split_dirs(root)
  if split_dirs is None:
    return splits_lib.select_split(scan_folder(root, name), split,
                                   holdout_fraction)
  splits_lib.no_holdout(name, split_dirs, holdout_fraction)
  loose = sorted(e for e in os.listdir(root) if e.endswith(IMAGE_EXTENSIONS))
  if loose:
    raise DataError(f"{name} holds split folders {list(split_dirs)} and "
                    f"{len(loose)} image files beside them (first: "
                    f"{loose[0]}); move those into a split folder")
  if split not in split_dirs:
    raise splits_lib.unknown_split(name, split, split_dirs)
  return scan_folder(split_dirs[split], name,
                     splits_lib.folder_classes(split_dirs))


@functools.lru_cache(maxsize=8)
def scan_folder(root: str, name: str,
                classes: Optional[tuple[str, ...]] = None) -> Source:
  """Images under `root` (recursive); first-level sub-folders become labels
  when every image is in one: their index in `classes`, or, when None, in
  the sorted names found.

  Cached by its arguments: the scan reads every file's header once per
  process (`clear_caches` forgets it, e.g. after the folder changed).

  Unreadable files (PIL cannot read the header) are logged with their path,
  counted, and left out of the index, so the index (and hence every batch) is
  fixed before training starts. The layout is checked (validate.py): no
  image beside class folders, no class folder without a readable image, no
  directory reached twice through links.
  """
  files = validate.walk_images(root, IMAGE_EXTENSIONS)
  if not files:
    raise DataError(f"folder {root!r} holds no image files "
                    f"({', '.join(IMAGE_EXTENSIONS[:3])} searched recursively)")
  good, skipped = [], []
  for f in files:
    reason = _readable_header(f)
    if reason is None:
      good.append(f)
    else:
      skipped.append(f)
      logging.warning("Skipping unreadable image %s (%s)", f, reason)
  if skipped:
    logging.warning("folder:%s: skipped %d unreadable of %d files", root,
                    len(skipped), len(files))
  if not good:
    raise DataError(f"folder {root!r}: none of its {len(files)} image files "
                    f"is readable (first: {skipped[0]})")
  rel_top = [os.path.relpath(f, root).split(os.sep) for f in good]
  if validate.class_layout(root, good, skipped, labelled_elsewhere=bool(
      classes)):
    classes = classes or tuple(sorted({r[0] for r in rel_top}))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r[0]] for r in rel_top], np.int32)
    num_classes = len(classes)
  else:
    labels, num_classes = np.full(len(good), -1, np.int32), 0
  return Source(name, "files", len(good), num_classes, labels,
                paths=tuple(good), skipped=tuple(skipped))


def clear_caches() -> None:
  scan_folder.cache_clear()


def decode_file(path: bytes) -> tuple[np.ndarray, bool]:
  """uint8 [h, w, 3] from an image file; a grey 8x8 image and False on error.

  Files pass a header check when indexed; a body that fails to decode later
  (e.g. truncated) is logged and replaced, so an epoch never crashes midway.
  """
  from PIL import Image
  path = path.decode() if isinstance(path, bytes) else path
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB")), True
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Failed to decode %s (%s); using a grey image", path, e)
    return np.full((8, 8, 3), 128, np.uint8), False


# ---------------------------------------------------------------- synthetic
def synthetic_source(seed: int, image_size: int, n: int, k: int) -> Source:
  """n images of synthetic.example_image, labels in [0, k) (-1 if k <= 0)."""
  images = np.stack([
      np.rint(synthetic.example_image(seed, i, image_size) * 255)
      .astype(np.uint8) for i in range(n)])
  labels = np.array([synthetic.example_label(seed, i, k)
                     for i in range(n)], np.int32)
  return Source("synthetic", "array", n, max(k, 0), labels, images=images)


# ---------------------------------------------------------------- tfds
def _prepare_hint(name: str, data_dir: str) -> str:
  base = name.split("/")[0]
  cmd = (f"tfds build {name} --data_dir={data_dir} "
         "--file_format=array_record")
  if base.startswith("imagenet2012"):
    return (f"ImageNet needs a manual download: put ILSVRC2012_img_train.tar "
            f"and ILSVRC2012_img_val.tar (from https://image-net.org) in "
            f"{data_dir}/downloads/manual/, then run: {cmd}")
  return f"prepare it once (this downloads) with: {cmd}"


def tfds_source(name: str, data_dir: Optional[str], split: str,
                access: str = "auto") -> Source:
  """A TFDS split: array_record -> random access; tfrecord -> memory/stream."""
  import tensorflow_datasets as tfds
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or \
      os.path.expanduser("~/tensorflow_datasets")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"unknown TFDS dataset {name!r} ({e}); valid names "
                    f"include {sorted(TFDS_DEFAULT_SPLITS)}, 'digits', "
                    "'synthetic', 'folder:/path', 'npz:/path.npz'") from e
  features = builder.info.features
  if "image" not in features:
    raise DataError(f"TFDS dataset {name!r} has no 'image' feature (it has "
                    f"{sorted(features)}); jaxclr reads 'image' and, when "
                    "present, 'label'")
  has_label = "label" in features
  num_classes = features["label"].num_classes if has_label else 0

  if access in ("auto", "random"):
    try:
      ds = builder.as_data_source(
          split=split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in data_dir {data_dir} "
            f"(looked for {builder.data_dir}); training never downloads. "
            + _prepare_hint(name, data_dir)) from e
      if access == "random":
        raise DataError(
            f"{name!r} in {builder.data_dir} is not an array_record build, so "
            f"it has no random access ({e}); rebuild with: "
            f"tfds build {name} --data_dir={data_dir} "
            "--file_format=array_record, or set data_access='auto'") from e
    else:
      def get(i):
        ex = ds[int(i)]
        return ex["image"], int(ex["label"]) if has_label else -1

      def get_batch(ids):
        # One batched read: array_record fetches the records in parallel.
        exs = ds.__getitems__([int(i) for i in ids])
        return ([ex["image"] for ex in exs],
                [int(ex["label"]) if has_label else -1 for ex in exs])
      return Source(name, "encoded", len(ds), num_classes, None,
                    get_encoded=get, get_encoded_batch=get_batch)

  if not builder.is_prepared():
    raise DataError(
        f"TFDS dataset {name!r} is not prepared in data_dir {data_dir} "
        f"(looked for {builder.data_dir}); training never downloads. "
        + _prepare_hint(name, data_dir))
  if split not in builder.info.splits:
    raise DataError(f"{name!r} has no split {split!r}; valid: "
                    f"{sorted(builder.info.splits)}")
  n = builder.info.splits[split].num_examples
  shape = features["image"].shape
  decoded_bytes = n * (np.prod(shape) if None not in shape else 10**9)
  if access in ("auto", "memory") and decoded_bytes <= MAX_IN_MEMORY_BYTES:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    labels = (arrays["label"].astype(np.int32) if has_label
              else np.full(n, -1, np.int32))
    return Source(name, "array", n, num_classes, labels,
                  images=arrays["image"])
  if access == "memory":
    raise DataError(f"{name}:{split} needs {decoded_bytes / 2**30:.1f} GiB "
                    "decoded; too big for data_access='memory'")

  def make_stream(index, count, seed):
    import tensorflow as tf
    sub = tfds.split_for_jax_process(split, process_index=index,
                                     process_count=count, drop_remainder=True)
    return builder.as_dataset(
        split=sub, shuffle_files=True,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=False,
                                    interleave_cycle_length=16),
    ).map(lambda ex: (ex["image"], tf.cast(ex.get("label", -1), tf.int32)))
  return Source(name, "stream", n, num_classes, None, make_stream=make_stream)


# ---------------------------------------------------------------- dispatch
def make_source(data: spec_lib.DataSpec, split: str) -> Source:
  """The source of `data.dataset` for `split` (DataError on a bad value)."""
  name = data.dataset
  if name == "digits":
    return digits_source(split)
  if name == "synthetic":
    return synthetic_source(data.seed, data.image_size,
                            data.synthetic_num_examples,
                            data.synthetic_num_classes)
  if name.startswith("npz:"):
    return npz_source(name[4:], split, data.holdout_fraction)
  if name.startswith("folder:"):
    return folder_source(os.path.abspath(name[7:]), split,
                         data.holdout_fraction)
  if name.startswith("tfds:"):  # Any TFDS name, e.g. tfds:oxford_flowers102.
    name = name[5:]
  elif ":" in name or not name:
    raise DataError(f"dataset {name!r}: unknown prefix; valid: 'folder:/path',"
                    " 'npz:/path.npz', 'tfds:NAME', a TFDS name, 'digits', "
                    "'synthetic'")
  access = data.data_access
  if access not in ("auto", "random", "memory", "stream"):
    raise DataError(f"data_access={access!r}; valid: 'auto', 'random', "
                    "'memory', 'stream'")
  return tfds_source(name, data.data_dir, split, access)
