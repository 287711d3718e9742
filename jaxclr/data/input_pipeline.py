"""Pretraining and evaluation input: the contract between host data and trainer.

`pretrain_batches` yields process-local numpy batches:

  images:      float32 [b, 2, H, W, 3] in [0, 1]: two augmented views per image
               (uint8 [b, 2, H, W, 3], value x 255 rounded, with
               augment.transfer_dtype='uint8'; the train step scales it back)
  labels:      int32   [b], -1 when the dataset has no labels
  example_ids: int32   [b], the example's index in the training split

with b = batch_size // process_count. The global batch of step t is the
concatenation of the processes' batches in process order, and it depends only
on (seed, t): not on how many processes or devices there are. Resuming at
`start_step` yields exactly what an uninterrupted run would from that step.
(Exception: TFDS tfrecord-only builds too big for memory are streamed, see
`sources.tfds_source`; that stream is exact on resume with the same
process_count but depends on the process layout.)

Each example is fetched by index and augmented in a tf.data map whose random
draws are stateless functions of (seed, step, example id, view): see augment.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional

import numpy as np

from jaxclr.data import augment
from jaxclr import errors
from jaxclr.data import sources

DataError = errors.DataError
MAX_EVAL_ARRAY_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_train_examples: int
  num_classes: int  # 0 when unlabelled.


@functools.lru_cache(maxsize=16)
def _cached_source(dataset, data_dir, split, access, seed, image_size,
                   syn_n, syn_k):
  cfg = _Cfg(dataset=dataset, data_dir=data_dir, data_access=access, seed=seed,
             image_size=image_size, synthetic=_Cfg(num_examples=syn_n,
                                                   num_classes=syn_k))
  return sources.make_source(cfg, split)


class _Cfg(dict):
  """Minimal attribute dict: the hashable subset of a config a source reads."""
  __getattr__ = dict.__getitem__


def get_source(config, split: Optional[str] = None,
               which: str = "train") -> sources.Source:
  split = sources.resolve_split(config, split, which)
  return _cached_source(config.dataset, config.get("data_dir"), split,
                        config.get("data_access", "auto"), config.seed,
                        config.image_size, config.synthetic.num_examples,
                        config.synthetic.num_classes)


def dataset_info(config) -> DatasetInfo:
  if config.dataset == "synthetic":  # No need to render the images.
    return DatasetInfo("synthetic", config.synthetic.num_examples,
                       config.synthetic.num_classes)
  src = get_source(config)
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


def check_augment_config(config):
  aug = config.augment
  s = aug.color_jitter_strength
  if s < 0 or 0.2 * s > 0.5:
    raise DataError(f"augment.color_jitter_strength={s}; valid: 0 to 2.5 "
                    "(hue delta 0.2*s must stay <= 0.5)")
  if aug.brightness_impl not in ("simclrv1", "simclrv2"):
    raise DataError(f"augment.brightness_impl={aug.brightness_impl!r}; valid:"
                    " 'simclrv2' (multiplicative), 'simclrv1' (additive)")
  lo, hi = aug.crop_area_range
  if not 0 < lo <= hi <= 1:
    raise DataError(f"augment.crop_area_range={tuple(aug.crop_area_range)};"
                    " need 0 < lo <= hi <= 1")
  for key in ("color_jitter_prob", "grayscale_prob", "blur_prob"):
    if not 0 <= aug[key] <= 1:
      raise DataError(f"augment.{key}={aug[key]} is not a probability")


def _decode_fn(kind: str):
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


def pretrain_batches(config, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Process-local pretraining batches from `start_step` on (see module doc)."""
  import tensorflow as tf

  check_layout(config.batch_size, process_index, process_count)
  check_augment_config(config)
  src = get_source(config)
  local = config.batch_size // process_count
  aug, size, seed = config.augment, config.image_size, config.seed
  host_color = not aug.on_device
  decode = _decode_fn(src.kind)

  def make_views(raw, label, example_id, step):
    image = decode(raw)
    views = tf.stack([augment.pretrain_view(
        image, augment.view_seed(seed, step, example_id, v), aug, size,
        host_color=host_color) for v in range(2)])
    if aug.transfer_dtype == "uint8":  # Views are clipped to [0, 1].
      views = tf.cast(tf.round(views * 255.0), tf.uint8)
    return {"images": views, "labels": label,
            "example_ids": example_id}

  if src.kind == "stream":
    ds = _stream_elements(src, config, start_step, process_index,
                          process_count, local)
  else:
    if config.batch_size > src.num_examples:
      raise DataError(f"batch_size={config.batch_size} exceeds the "
                      f"{src.num_examples} examples of {src.name}")
    ds = _indexed_elements(src, config, start_step, process_index, local)
  ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(2)
  yield from ds.as_numpy_iterator()


def _indexed_elements(src, config, start_step, process_index, local):
  """(raw, label, example id, step) of this process's slice of each step."""
  import tensorflow as tf

  lo, hi = process_index * local, (process_index + 1) * local

  def fetch(step):
    ids = global_example_ids(config.seed, int(step), config.batch_size,
                             src.num_examples)[lo:hi]
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


def _stream_elements(src, config, start_step, process_index, process_count,
                     local):
  """Layout-dependent fallback for big tfrecord-only TFDS builds."""
  import tensorflow as tf
  ds = src.make_stream(process_index, process_count, config.seed)
  ds = ds.shuffle(local * config.shuffle_buffer_multiplier,
                  seed=config.seed).repeat()
  ds = ds.skip(start_step * local).enumerate(start=start_step * local)

  def fmt(pos, ex):
    raw, label = ex
    # No global index exists in a stream: the id is the stream position,
    # offset per process (unique as long as positions stay below 2**31 / n).
    eid = tf.cast(pos * process_count + process_index, tf.int32)
    return raw, label, eid, pos // local
  return ds.map(fmt)


def eval_batches(config, split: Optional[str] = None, batch_size: int = 256,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`, centre-cropped, in process-local padded batches.

  Global batch k holds examples [k*B, (k+1)*B); process p gets its slice
  [p*b, (p+1)*b) of it (b = B // process_count), padded with zero images,
  label -1, example_id -1 and mask False past the end, so every process yields
  the same number of batches. Yields dicts: images float32 [b, H, W, 3] in
  [0, 1], labels int32 [b], example_ids int32 [b], mask bool [b].
  """
  import tensorflow as tf

  check_layout(batch_size, process_index, process_count)
  src = get_source(config, split, "eval")
  if src.kind == "stream":
    raise DataError(f"{src.name} is a tfrecord-only build with no random "
                    "access; rebuild it with --file_format=array_record for "
                    "evaluation")
  local, size = batch_size // process_count, config.image_size
  n = src.num_examples
  num_batches = -(-n // batch_size)
  decode = _decode_fn(src.kind)

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


def eval_arrays(config, split: Optional[str] = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """All of `split` with eval preprocessing: (float32 [N,H,W,3] in [0,1], int32 [N]).

  For datasets that fit in memory (digits, npz, CIFAR, folders); bigger ones
  raise DataError: use `eval_batches`. `split` None: config.eval_split, or the
  dataset's default eval split ('test' for digits/CIFAR/STL-10).
  """
  src = get_source(config, split, "eval")
  need = src.num_examples * config.image_size**2 * 3 * 4
  if src.kind == "stream" or need > MAX_EVAL_ARRAY_BYTES:
    raise DataError(f"{src.name} split {split!r} is too big for eval_arrays "
                    f"({need / 2**30:.1f} GiB); use eval_batches")
  images, labels = [], []
  for b in eval_batches(config, split, batch_size=512):
    images.append(b["images"][b["mask"]])
    labels.append(b["labels"][b["mask"]])
  return np.concatenate(images), np.concatenate(labels)


def clear_caches():
  """Forgets opened sources (tests; or after a dataset changed on disk)."""
  _cached_source.cache_clear()
  sources.folder_source.cache_clear()
