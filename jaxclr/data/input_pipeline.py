"""Pretraining and evaluation input: the contract between host data and trainer.

`pretrain_batches` yields process-local numpy batches:

  images:      float32 [b, 2, H, W, 3] in [0, 1]: two augmented views per image
               (uint8 [b, 2, H, W, 3], value x 255 rounded, with
               augment.transfer_dtype='uint8'; the train step scales it back)
  labels:      int32   [b], -1 when the dataset has no labels
  example_ids: int32   [b], the example's index in the training split
  color_params: float32 [b, 2, P], only with augment.on_device: each view's
               colour/blur parameters (layout in spec.py), applied on device
               by `device_augment.augment_views`
  local_images: [b, k, h, h, 3], only with augment.num_local_crops = k > 0
               (multi-crop): k local crops of h = augment.local_crop_size
               px per image, views 2 .. k + 1 of its random stream, in the
               dtype of images
  local_color_params: float32 [b, k, P], with local crops and on_device

with b = batch_size // process_count. The global batch of step t is the
concatenation of the processes' batches in process order, and it depends only
on (seed, t): not on how many processes or devices there are. Resuming at
`start_step` yields exactly what an uninterrupted run would from that step.
(Exception: TFDS tfrecord-only builds too big for memory are streamed, see
`sources.tfds_source`; that stream is exact on resume with the same
process_count but depends on the process layout.)

Each example is fetched by index and augmented in a tf.data map whose random
draws are stateless functions of (seed, step, example id, view): see augment.py.

Every function takes explicit values: a `spec.DataSpec` (from
`config_lib.data_spec(config)`) and a `sources.Source` that the caller opens
once with `open_source` and passes on; nothing here caches a source (a
folder's scan is cached by path in `sources.scan_folder`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxclr import errors
from jaxclr.data import augment, sources, spec as spec_lib

DataError = errors.DataError
MAX_EVAL_ARRAY_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_train_examples: int
  num_classes: int  # 0 when unlabelled.


def open_source(data: spec_lib.DataSpec, which: str = "train",
                split: Optional[str] = None) -> sources.Source:
  """Opens `split`, else the spec's split for `which`, else the dataset's
  default (DataError on a bad dataset or split). which: 'train' (what
  pretraining reads), 'eval', or 'labelled_train' (the training split that
  evaluation reads: `sources.labelled_train_split`)."""
  if which == "labelled_train":
    split = sources.labelled_train_split(data) if split is None else split
    which = "train"
  return sources.make_source(data, sources.resolve_split(data, split, which))


def dataset_info(src: sources.Source) -> DatasetInfo:
  return DatasetInfo(src.name, src.num_examples, src.num_classes)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, 3, epoch]).permutation(num_examples)


def global_example_ids(seed: int, step: int, batch_size: int,
                       num_examples: int) -> np.ndarray:
  """Indices of the global batch at `step`: a fresh permutation per epoch.

  Batches never straddle an epoch boundary (drop-remainder), so an epoch is
  num_examples // batch_size steps.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch < 1:
    raise DataError(f"batch_size={batch_size} exceeds the {num_examples} "
                    "training examples")
  epoch, pos = divmod(step, steps_per_epoch)
  perm = _epoch_permutation(seed, epoch, num_examples)
  return perm[pos * batch_size:(pos + 1) * batch_size]


def check_layout(batch_size: int, process_index: int, process_count: int):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in "
                    f"[0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} does not divide by "
                    f"process_count={process_count}; use a multiple of "
                    f"{process_count}")


def decode_fn(kind: str):
  """tf function: raw element -> float32 [h, w, 3] in [0, 1]."""
  import tensorflow as tf

  if kind == "array":
    return lambda x: tf.image.convert_image_dtype(x, tf.float32)
  if kind in ("encoded", "stream"):
    def dec(x):
      img = tf.io.decode_image(x, channels=3, expand_animations=False)
      return tf.image.convert_image_dtype(img, tf.float32)
    return dec

  def dec_file(path):
    img, _ = tf.numpy_function(sources.decode_file, [path],
                               [tf.uint8, tf.bool], stateful=False)
    img.set_shape([None, None, 3])
    return tf.image.convert_image_dtype(img, tf.float32)
  return dec_file


def pretrain_batches(data: spec_lib.DataSpec, src: sources.Source, *,
                     batch_size: int, start_step: int, process_index: int,
                     process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Process-local pretraining batches from `start_step` on (see module doc).

  Args:
    data: what to read and how to augment it.
    src: the training source, `open_source(data, "train")`.
    batch_size: the global batch, in images (each gives two views).
    start_step: the first step to yield (a resume).
    process_index, process_count: this process's rows of each global batch.
  """
  import tensorflow as tf

  check_layout(batch_size, process_index, process_count)
  local = batch_size // process_count
  aug, size, seed = data.augment, data.image_size, data.seed
  decode = decode_fn(src.kind)

  def stacked(views, params, prefix):
    views = tf.stack(views)
    if aug.transfer_dtype == "uint8":  # Views are clipped to [0, 1].
      views = tf.cast(tf.round(views * 255.0), tf.uint8)
    out = {f"{prefix}images": views}
    if aug.on_device:
      out[f"{prefix}color_params"] = tf.stack(params)  # [views, P]
    return out

  def make_views(raw, label, example_id, step):
    image = decode(raw)
    views, params = zip(*[augment.pretrain_view(
        image, augment.view_seed(seed, step, example_id, v), aug, size)
                          for v in range(2)])
    out = {**stacked(views, params, ""), "labels": label,
           "example_ids": example_id}
    if aug.num_local_crops:  # Multi-crop: views 2 .. k + 1.
      local, local_params = zip(*[augment.pretrain_view(
          image, augment.view_seed(seed, step, example_id, v), aug,
          aug.local_crop_size, local=True)
                                  for v in range(2, 2 + aug.num_local_crops)])
      out.update(stacked(local, local_params, "local_"))
    return out

  if src.kind == "stream":
    ds = _stream_elements(src, data, start_step, process_index,
                          process_count, local)
  else:
    if batch_size > src.num_examples:
      raise DataError(f"batch_size={batch_size} exceeds the "
                      f"{src.num_examples} examples of {src.name}")
    ds = _indexed_elements(src, seed, batch_size, start_step, process_index,
                           local)
  ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(2)
  yield from ds.as_numpy_iterator()


def _indexed_elements(src, seed, batch_size, start_step, process_index, local,
                      pool: Optional[np.ndarray] = None):
  """(raw, label, example id, step) of this process's slice of each step;
  the examples are `pool` (all of src when None) in a per-epoch order."""
  import tensorflow as tf

  lo, hi = process_index * local, (process_index + 1) * local
  n = src.num_examples if pool is None else len(pool)

  def fetch(step):
    ids = global_example_ids(seed, int(step), batch_size, n)[lo:hi]
    if pool is not None:
      ids = pool[ids]
    raw, labels = raw_batch(src, ids)
    return raw, labels, ids.astype(np.int32), np.full(len(ids), step, np.int64)

  return fetched_elements(src, tf.data.Dataset.range(start_step, 2**62),
                          fetch, tf.int64)


def fetched_elements(src, keys, fetch, last_dtype):
  """Unbatched elements of `fetch(key)` for each key of the dataset `keys`.

  fetch(key) -> numpy (raw [m, ...], labels int32 [m], example ids int32 [m],
  a fourth column [m] of `last_dtype`) runs once per batch, not per example:
  one numpy gather, one batched array_record read, so Python (and its GIL)
  stays off the per-example path. Not `tf.data.Dataset.from_generator`:
  creating one sets glibc's M_TRIM_THRESHOLD to 128 kB for the whole process
  (TF's generator_dataset_op), after which every large buffer (a decoded
  photo, a 224 px view) is mapped and unmapped again: measured 3.3x slower
  224 px augmentation on one core, for the rest of the process's life.
  """
  import tensorflow as tf

  if src.kind == "array":
    raw_dtype, raw_shape = tf.uint8, [None, *src.images.shape[1:]]
  else:
    raw_dtype, raw_shape = tf.string, [None]

  def load(key):
    raw, labels, ids, last = tf.numpy_function(
        fetch, [key], [raw_dtype, tf.int32, tf.int32, last_dtype],
        stateful=False)
    raw.set_shape(raw_shape)
    for t in (labels, ids, last):
      t.set_shape([None])
    return raw, labels, ids, last

  # Two batches fetched at once: the next one's reads overlap this one's.
  return keys.map(load, num_parallel_calls=2, deterministic=True).unbatch()


def raw_batch(src, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Raw elements and int32 labels of examples `ids`: uint8 images ('array'),
  file paths ('files', decoded later) or encoded bytes ('encoded')."""
  if src.kind == "array":
    return src.images[ids], src.labels[ids].astype(np.int32)
  if src.kind == "files":
    return (np.array([src.paths[i].encode() for i in ids], object),
            src.labels[ids].astype(np.int32))
  if len(ids) == 0:
    return np.array([], object), np.zeros(0, np.int32)
  if src.get_encoded_batch is not None:
    raw, labels = src.get_encoded_batch(ids)
  else:
    raw, labels = zip(*(src.get_encoded(int(i)) for i in ids))
  return np.array(raw, object), np.asarray(labels, np.int32)


def _stream_elements(src, data, start_step, process_index, process_count,
                     local):
  """Layout-dependent fallback for big tfrecord-only TFDS builds."""
  import tensorflow as tf
  ds = src.make_stream(process_index, process_count, data.seed)
  ds = ds.shuffle(local * data.shuffle_buffer_multiplier,
                  seed=data.seed).repeat()
  ds = ds.skip(start_step * local).enumerate(start=start_step * local)

  def fmt(pos, ex):
    raw, label = ex
    # No global index exists in a stream: the id is the stream position,
    # offset per process (unique as long as positions stay below 2**31 / n).
    eid = tf.cast(pos * process_count + process_index, tf.int32)
    return raw, label, eid, pos // local
  return ds.map(fmt)


def eval_batches(image_size: int, src: sources.Source, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `src`, centre-cropped to `image_size`, in process-local
  padded batches (`batch_size` is global).

  Global batch k holds examples [k*B, (k+1)*B); process p gets its slice
  [p*b, (p+1)*b) of it (b = B // process_count), padded with zero images,
  label -1, example_id -1 and mask False past the end, so every process yields
  the same number of batches. Yields dicts: images float32 [b, H, W, 3] in
  [0, 1], labels int32 [b], example_ids int32 [b], mask bool [b].
  """
  import tensorflow as tf

  check_layout(batch_size, process_index, process_count)
  if src.kind == "stream":
    raise DataError(f"{src.name} is a tfrecord-only build with no random "
                    "access; rebuild it with --file_format=array_record for "
                    "evaluation")
  local, size = batch_size // process_count, image_size
  n = src.num_examples
  num_batches = -(-n // batch_size)
  decode = decode_fn(src.kind)

  def fetch(k):
    ids = k * batch_size + process_index * local + np.arange(local)
    mask = ids < n
    raw, labels = raw_batch(src, ids[mask])
    if not mask.all():  # Past the end: padding, masked out below.
      pad = local - len(raw)
      if src.kind == "array":
        raw = np.concatenate([raw, np.zeros((pad,) + raw.shape[1:], raw.dtype)])
      else:
        raw = np.concatenate([raw, np.array([b""] * pad, object)])
      labels = np.concatenate([labels, np.full(pad, -1, np.int32)])
    return raw, labels, np.where(mask, ids, -1).astype(np.int32), mask

  def prep(raw, label, eid, mask):
    img = tf.cond(mask, lambda: augment.eval_image(decode(raw), size),
                  lambda: tf.zeros([size, size, 3]))
    return {"images": img, "labels": label, "example_ids": eid, "mask": mask}

  ds = fetched_elements(src, tf.data.Dataset.range(num_batches), fetch,
                         tf.bool)
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from ds.batch(local).prefetch(2).as_numpy_iterator()


def eval_arrays(image_size: int, src: sources.Source
                ) -> tuple[np.ndarray, np.ndarray]:
  """All of `src` with eval preprocessing: (float32 [N,H,W,3] in [0,1], int32 [N]).

  For datasets that fit in memory (digits, npz, CIFAR, folders); bigger ones
  raise DataError: use `eval_batches`.
  """
  need = src.num_examples * image_size**2 * 3 * 4
  if src.kind == "stream" or need > MAX_EVAL_ARRAY_BYTES:
    raise DataError(f"{src.name} is too big for eval_arrays "
                    f"({need / 2**30:.1f} GiB); use eval_batches")
  images, labels = [], []
  for b in eval_batches(image_size, src, batch_size=512):
    images.append(b["images"][b["mask"]])
    labels.append(b["labels"][b["mask"]])
  return np.concatenate(images), np.concatenate(labels)


def labelled_batches(data: spec_lib.DataSpec, src: sources.Source, *,
                     batch_size: int, start_step: int,
                     indices: Optional[Sequence[int]] = None,
                     process_index: int = 0, process_count: int = 1,
                     require_labels: bool = True, with_eval_view: bool = False
                     ) -> Iterator[dict[str, np.ndarray]]:
  """Crop + flip (`data.augment.crop_only()`) single views, labelled: what
  the paper probe and fine-tuning train on (require_labels=False: any
  source, labels -1 where unknown; distillation's unlabelled images;
  with_eval_view: also 'eval_images', each example's centre crop as
  evaluation preprocesses it, for a teacher that labels clean images).

  src: the labelled training source. indices: restrict to these examples
  (label subsets). Yields this process's rows [p*b, (p+1)*b) of each global
  batch (b = batch_size // process_count), as pretraining does: images
  float32 [b, H, W, 3], labels int32 [b]. The global batch depends only on
  (data.seed, step); view 0's crop of pretraining's seed stream.
  """
  import tensorflow as tf

  if require_labels and (src.labels is None and src.kind != "encoded" or
                         src.num_classes == 0):
    raise DataError(f"{src.name} has no labels: linear evaluation needs a "
                    "labelled training split")
  pool = np.arange(src.num_examples) if indices is None else np.asarray(indices)
  if batch_size > len(pool):
    raise DataError(f"batch_size={batch_size} exceeds the {len(pool)} "
                    "labelled training examples")
  check_layout(batch_size, process_index, process_count)
  local = batch_size // process_count
  aug, size, seed = data.augment.crop_only(), data.image_size, data.seed
  decode = decode_fn(src.kind)

  def view(raw, label, eid, step):
    s = augment.view_seed(seed, step, eid, 0)
    image = decode(raw)
    x = augment.crop_and_flip(image, s, aug, size)
    out = {"images": tf.ensure_shape(x, [size, size, 3]), "labels": label}
    if with_eval_view:
      out["eval_images"] = tf.ensure_shape(augment.eval_image(image, size),
                                           [size, size, 3])
    return out

  ds = _indexed_elements(src, seed, batch_size, start_step, process_index,
                         local, pool)
  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from ds.batch(local, drop_remainder=True).prefetch(2).as_numpy_iterator()


def clear_caches():
  """Forgets the folder scans of `sources.scan_folder` (tests; or after a
  folder changed on disk)."""
  sources.clear_caches()
