"""Tests for jaxclr/data: sources, sharding, determinism, TFDS mock pipelines."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline as ip, sources


def _config(dataset="digits", image_size=32, batch_size=16, **aug):
  c = config_lib.base_config()
  c.dataset, c.image_size, c.batch_size = dataset, image_size, batch_size
  c.augment.use_blur = False
  c.augment.color_jitter_strength = 0.5
  c.augment.update(aug)
  return c


def _spec(config):
  return config_lib.data_spec(config)


def _source(config, which="train", split=None):
  return ip.open_source(_spec(config), which, split)


def _info(config):
  return ip.dataset_info(_source(config))


def _take(config, start_step, n, index=0, count=1):
  it = ip.pretrain_batches(_spec(config), _source(config),
                           batch_size=config.batch_size,
                           start_step=start_step, process_index=index,
                           process_count=count)
  return [next(it) for _ in range(n)]


def _eval_arrays(config, split):
  return ip.eval_arrays(config.image_size, _source(config, "eval", split))


def _eval_batches(config, split, batch_size, index=0, count=1):
  return ip.eval_batches(config.image_size, _source(config, "eval", split),
                         batch_size, index, count)


@pytest.fixture(autouse=True)
def _fresh_sources():
  ip.clear_caches()
  yield
  ip.clear_caches()


@pytest.fixture(autouse=True)
def _tfds_mock_batched_reads(monkeypatch):
  """tfds.testing.mock_data installs its fake ArrayRecordDataSource's
  __getitems__ as an unbound partial that expects `self` first, so the
  batched read (`data_source.__getitems__(keys)`) fails inside the mock only.
  Shift the arguments so the mock behaves like the real source."""
  from tensorflow_datasets.testing import mocking
  original = mocking._getitems  # pylint: disable=protected-access

  def getitems(*args, generator, serialized=False):
    self, keys = (None, args[0]) if len(args) == 1 else args
    return original(self, keys, generator, serialized=serialized)
  monkeypatch.setattr(mocking, "_getitems", getitems)


# ------------------------------------------------------------------ digits
def test_digits_split_is_stratified_disjoint_and_complete():
  from sklearn.datasets import load_digits
  y_all = load_digits().target
  tr, te = sources.digits_source("train"), sources.digits_source("test")
  assert tr.num_examples + te.num_examples == 1797 == len(y_all)
  assert tr.images.shape == (tr.num_examples, 32, 32, 3)
  assert tr.images.dtype == np.uint8
  for c in range(10):
    n_c = int((y_all == c).sum())
    assert int((te.labels == c).sum()) == int(round(0.25 * n_c))
    assert int((tr.labels == c).sum()) == n_c - int(round(0.25 * n_c))
  # Disjoint: no test image equals a train image at the same... use hashes.
  _, _, test_mask = sources._digits_all()
  assert test_mask.sum() == te.num_examples
  # Gray digits: the three channels are equal.
  np.testing.assert_array_equal(tr.images[..., 0], tr.images[..., 2])


@pytest.mark.slow
def test_digits_pretrain_batch_format():
  c = _config()
  info = _info(c)
  assert info == ip.DatasetInfo("digits", 1347, 10)
  b = _take(c, 0, 1)[0]
  assert b["images"].shape == (16, 2, 32, 32, 3)
  assert b["images"].dtype == np.float32
  assert b["labels"].dtype == np.int32 and b["example_ids"].dtype == np.int32
  assert 0.0 <= b["images"].min() and b["images"].max() <= 1.0
  # Labels are those of the examples named by example_ids.
  np.testing.assert_array_equal(
      b["labels"], sources.digits_source("train").labels[b["example_ids"]])
  # The two views of each image differ.
  diff = np.abs(b["images"][:, 0] - b["images"][:, 1]).mean(axis=(1, 2, 3))
  assert (diff > 1e-3).all()


def test_eval_arrays_digits_deterministic_and_unaugmented():
  c = _config()
  x, y = _eval_arrays(c, "test")
  x2, y2 = _eval_arrays(c, "test")
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  te = sources.digits_source("test")
  assert x.shape == (te.num_examples, 32, 32, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x, te.images / 255.0, atol=1e-6)  # No crop <=32.
  np.testing.assert_array_equal(y, te.labels)


def test_eval_batches_padding_and_process_slices():
  c = _config()
  n = sources.digits_source("test").num_examples  # 450
  per_proc = [list(_eval_batches(c, "test", 128, p, 2)) for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) == -(-n // 128)
  ids = np.concatenate([np.concatenate([b0["example_ids"], b1["example_ids"]])
                        for b0, b1 in zip(*per_proc)])
  mask = np.concatenate([np.concatenate([b0["mask"], b1["mask"]])
                         for b0, b1 in zip(*per_proc)])
  np.testing.assert_array_equal(ids[mask], np.arange(n))
  assert (ids[~mask] == -1).all() and mask.sum() == n
  last = per_proc[1][-1]
  assert (last["images"][~last["mask"]] == 0).all()


# ------------------------------------------------------------------ layout
@pytest.mark.slow
def test_same_global_batch_on_one_or_two_processes_and_after_resume():
  c = _config()
  one = _take(c, 0, 3)
  two = [_take(c, 0, 3, index=p, count=2) for p in range(2)]
  for t in range(3):
    for key in ("images", "labels", "example_ids"):
      np.testing.assert_array_equal(
          one[t][key], np.concatenate([two[0][t][key], two[1][t][key]]))
  # Process slices are disjoint.
  assert not set(two[0][0]["example_ids"]) & set(two[1][0]["example_ids"])
  resumed = _take(c, 2, 1)[0]
  for key in ("images", "labels", "example_ids"):
    np.testing.assert_array_equal(resumed[key], one[2][key])


def test_epoch_covers_each_example_once_and_drops_remainder():
  n, b = 1347, 256
  steps = n // b
  ids = np.concatenate([ip.global_example_ids(0, t, b, n) for t in range(steps)])
  assert len(set(ids)) == steps * b and ids.min() >= 0 and ids.max() < n
  nxt = ip.global_example_ids(0, steps, b, n)  # Next epoch: a new order.
  assert not np.array_equal(nxt, ip.global_example_ids(0, 0, b, n))


@pytest.mark.slow
def test_process_slices_are_disjoint_and_cover_each_epoch():
  """2 processes over one digits epoch (B=256: 5 steps, 67 dropped): every
  example at most once, the two slices disjoint, together the whole epoch."""
  c = _config(batch_size=256, image_size=8)
  n = sources.digits_source("train").num_examples
  seen = [np.concatenate([b["example_ids"] for b in _take(c, 0, 5, p, 2)])
          for p in range(2)]
  assert len(seen[0]) == len(seen[1]) == 5 * 128
  assert not set(seen[0]) & set(seen[1])
  union = np.concatenate(seen)
  assert len(set(union)) == len(union) == 5 * 256
  epoch = np.concatenate([ip.global_example_ids(0, t, 256, n)
                          for t in range(5)])
  assert set(union) == set(epoch) and union.max() < n


def test_bad_layout_and_values_raise_data_error():
  c = _config(batch_size=15)
  with pytest.raises(ip.DataError, match="batch_size=15.*process_count=2"):
    _take(c, 0, 1, 0, 2)
  c = _config(dataset="nope:/x")
  with pytest.raises(ip.DataError, match="nope:/x"):
    _info(c)
  with pytest.raises(ip.DataError, match="'train', 'test'"):
    _eval_arrays(_config(), "validation")


# ------------------------------------------------------------------ npz
@pytest.mark.slow
def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 20, 24, 3), dtype=np.uint8)
  labels = np.arange(40) % 4
  path = str(tmp_path / "d.npz")
  np.savez(path, images=images, labels=labels)
  c = _config(dataset=f"npz:{path}", image_size=16, batch_size=8)
  assert _info(c) == ip.DatasetInfo(f"npz:{path}", 40, 4)
  b = _take(c, 0, 1)[0]
  assert b["images"].shape == (8, 2, 16, 16, 3)
  np.testing.assert_array_equal(b["labels"], labels[b["example_ids"]])
  x, y = _eval_arrays(c, "train")
  assert x.shape == (40, 16, 16, 3)
  np.testing.assert_array_equal(y, labels)
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, pixels=images)
  with pytest.raises(ip.DataError, match="no 'images' array"):
    _info(_config(dataset=f"npz:{bad}"))
  np.savez(bad, images=images.astype(np.float32))
  with pytest.raises(ip.DataError, match="uint8"):
    _info(_config(dataset=f"npz:{bad}"))


# ------------------------------------------------------------------ folder
def _write_folder(root, rng):
  paths = []
  for cls in ("cat", "dog"):
    os.makedirs(root / cls)
    for i in range(6):
      arr = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
      ext = "png" if i % 2 else "jpg"
      p = root / cls / f"{i}.{ext}"
      Image.fromarray(arr).save(p)
      paths.append(str(p))
  (root / "dog" / "garbage.jpg").write_bytes(b"not an image at all")
  (root / "dog" / "empty.png").write_bytes(b"")
  # Valid header, truncated body: passes indexing, fails at decode time.
  big = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
  Image.fromarray(big).save(root / "cat" / "big.jpg", quality=95)
  good = (root / "cat" / "big.jpg").read_bytes()
  os.remove(root / "cat" / "big.jpg")
  (root / "cat" / "truncated.jpg").write_bytes(good[:len(good) // 2])
  return paths


@pytest.mark.slow
def test_folder_source_labels_skips_and_survives_bad_files(tmp_path):
  _write_folder(tmp_path, np.random.default_rng(1))
  src = sources.folder_source(str(tmp_path))
  assert sorted(os.path.basename(p) for p in src.skipped) == [
      "empty.png", "garbage.jpg"]
  assert src.num_examples == 13 and src.num_classes == 2
  for p, label in zip(src.paths, src.labels):
    assert label == (0 if "/cat/" in p else 1)
  c = _config(dataset=f"folder:{tmp_path}", image_size=24, batch_size=13)
  b = _take(c, 0, 2)  # A full epoch and more, including the truncated file.
  assert b[0]["images"].shape == (13, 2, 24, 24, 3)
  assert sorted(b[0]["example_ids"]) == list(range(13))
  assert np.isfinite(b[1]["images"]).all()
  img, ok = sources.decode_file(str(tmp_path / "cat" / "truncated.jpg"))
  assert not ok and img.shape == (8, 8, 3)


def test_empty_and_missing_folders_raise(tmp_path):
  with pytest.raises(ip.DataError, match="holds no image files"):
    _info(_config(dataset=f"folder:{tmp_path}"))
  with pytest.raises(ip.DataError, match="does not exist"):
    _info(_config(dataset=f"folder:{tmp_path}/nothere"))


# ------------------------------------------------------------------ splits
def _write_tiny(path, value=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_folder_split_folders_share_labels_across_splits(tmp_path):
  # train: cat, dog, owl; test: cat, dog (no owl); val: dog only.
  layout = {"train": ("cat", "dog", "owl"), "test": ("cat", "dog"),
            "val": ("dog",)}
  for split, classes in layout.items():
    for c in classes:
      for i in range(2):
        _write_tiny(str(tmp_path / split / c / f"{i}.png"))
  c = _config(dataset=f"folder:{tmp_path}", image_size=8, batch_size=4)
  spec = _spec(c)
  assert sources.default_splits(spec) == ("train", "test")  # test > val.
  by_split = {s: _source(c, split=s) for s in layout}
  for split, src in by_split.items():
    assert src.num_classes == 3 and src.num_examples == 2 * len(layout[split])
    for p, label in zip(src.paths, src.labels):
      assert label == ("cat", "dog", "owl").index(p.split(os.sep)[-2])
  assert _source(c, "eval").paths == by_split["test"].paths
  with pytest.raises(ip.DataError,
                     match=r"no split 'validation'; splits found: "
                     r"\['test', 'train', 'val'\]"):
    _source(c, split="validation")
  c.holdout_fraction = 0.5
  with pytest.raises(ip.DataError, match="has its own splits"):
    _source(c)
  _write_tiny(str(tmp_path / "stray.png"))
  ip.clear_caches()
  with pytest.raises(ip.DataError, match="1 image files beside them"):
    _source(_config(dataset=f"folder:{tmp_path}"))


def test_npz_splits_by_array_name(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "s.npz")
  np.savez(path, train_images=rng.integers(0, 256, (12, 8, 8, 3), np.uint8),
           train_labels=np.arange(12) % 4,
           test_images=rng.integers(0, 256, (5, 8, 8, 3), np.uint8),
           test_labels=np.arange(5) % 2)  # Fewer classes than train: still 4.
  c = _config(dataset=f"npz:{path}", image_size=8, batch_size=4)
  assert sources.default_splits(_spec(c)) == ("train", "test")
  train, test = _source(c), _source(c, "eval")
  assert (train.num_examples, test.num_examples) == (12, 5)
  assert train.num_classes == test.num_classes == 4
  np.testing.assert_array_equal(test.labels, np.arange(5) % 2)
  with pytest.raises(ip.DataError, match=r"splits found: \['test', 'train'\]"):
    _source(c, split="all")


def _pile(tmp_path, labels):
  """An npz in one pile whose image i has pixel value i (to identify it)."""
  path = str(tmp_path / "pile.npz")
  images = np.broadcast_to(np.arange(len(labels), dtype=np.uint8)[
      :, None, None, None], (len(labels), 8, 8, 3))
  np.savez(path, images=images, labels=labels)
  return _config(dataset=f"npz:{path}", image_size=8, batch_size=4)


def _ids(src):
  return src.images[:, 0, 0, 0].astype(int)


def test_holdout_fraction_is_stratified_disjoint_and_fixed(tmp_path):
  labels = np.repeat([0, 1, 2], [30, 20, 10])
  c = _pile(tmp_path, labels)
  c.holdout_fraction = 0.2
  assert sources.default_splits(_spec(c)) == ("train", "holdout")
  train, held = _source(c), _source(c, "eval")
  np.testing.assert_array_equal(np.bincount(held.labels), [6, 4, 2])
  assert not set(_ids(train)) & set(_ids(held))
  assert sorted(_ids(train).tolist() + _ids(held).tolist()) == list(range(60))
  assert train.num_classes == held.num_classes == 3
  assert _source(c, split="all").num_examples == 60
  # Not config.seed (an eval job has its own): the same examples held out.
  c.seed = 7
  np.testing.assert_array_equal(_ids(_source(c, "eval")), _ids(held))
  # Each of 2 processes opens the same split, and their halves of the eval
  # batches together are exactly the held-out examples, as 1 process reads.
  per_process = [ip.eval_batches(8, _source(c, "eval"), 4, p, 2)
                 for p in range(2)]
  seen = [b["images"][b["mask"], 0, 0, 0] for it in per_process for b in it]
  assert sorted(np.rint(np.concatenate(seen) * 255).astype(int).tolist()) == \
      sorted(_ids(held).tolist())
  # Unlabelled data: held out uniformly.
  u = _pile(tmp_path, np.full(60, -1))
  u.holdout_fraction = 0.25
  assert _source(u, "eval").num_examples == 15
  c.holdout_fraction = 0.0
  with pytest.raises(ip.DataError, match="holdout_fraction > 0 adds"):
    _source(c, split="holdout")


def test_holdout_fraction_of_a_folder(tmp_path):
  for c in ("a", "b"):
    for i in range(10):
      _write_tiny(str(tmp_path / c / f"{i}.png"), i)
  c = _config(dataset=f"folder:{tmp_path}", image_size=8, batch_size=4)
  c.holdout_fraction = 0.3
  train, held = _source(c), _source(c, "eval")
  assert (train.num_examples, held.num_examples) == (14, 6)
  assert not set(train.paths) & set(held.paths)
  np.testing.assert_array_equal(np.bincount(held.labels), [3, 3])


# ------------------------------------------------------------------ tfds
@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("imagenet2012", 48), ("cifar10", 32)])
def test_tfds_mock_pipeline(name, size):
  n = 20
  c = _config(dataset=name, image_size=size, batch_size=8)
  c.data_dir = "/tmp/jaxclr-no-such-dir"
  with tfds.testing.mock_data(num_examples=n):
    info = _info(c)
    assert info.num_train_examples == n
    assert info.num_classes == (1000 if name == "imagenet2012" else 10)
    one = _take(c, 0, 3)  # Steps 0, 1 = epoch 0 (drop-remainder), 2 = epoch 1.
    two = [_take(c, 0, 2, index=p, count=2) for p in range(2)]
    ev = next(_eval_batches(c, None, 8))
  b = one[0]
  assert b["images"].shape == (8, 2, size, size, 3)
  assert b["images"].dtype == np.float32
  assert 0.0 <= b["images"].min() and b["images"].max() <= 1.0
  assert (np.abs(b["images"][:, 0] - b["images"][:, 1]).max(axis=(1, 2, 3))
          > 0).all()
  epoch0 = np.concatenate([one[0]["example_ids"], one[1]["example_ids"]])
  assert len(set(epoch0)) == 16  # 4 of 20 dropped by drop-remainder.
  for t in range(2):
    p0, p1 = two[0][t]["example_ids"], two[1][t]["example_ids"]
    assert not set(p0) & set(p1)
    np.testing.assert_array_equal(np.concatenate([p0, p1]),
                                  one[t]["example_ids"])
    np.testing.assert_array_equal(
        np.concatenate([two[0][t]["images"], two[1][t]["images"]]),
        one[t]["images"])
  assert ev["images"].shape == (8, size, size, 3) and ev["mask"].all()
  np.testing.assert_array_equal(ev["example_ids"], np.arange(8))


def test_tfds_not_prepared_names_dir_and_command(tmp_path):
  c = _config(dataset="cifar10")
  c.data_dir = str(tmp_path)
  with pytest.raises(ip.DataError) as e:
    _info(c)
  msg = str(e.value)
  assert str(tmp_path) in msg and "tfds build cifar10" in msg
  c.dataset = "imagenet2012"
  with pytest.raises(ip.DataError, match="ILSVRC2012_img_train.tar"):
    _info(c)
  assert not any(tmp_path.iterdir()) or all(
      p.name in ("cifar10", "imagenet2012", "downloads")
      for p in tmp_path.iterdir())


def test_stl10_pretrains_on_unlabelled_split():
  c = _config(dataset="stl10")
  assert sources.resolve_split(_spec(c), None, "train") == "unlabelled"
  assert sources.resolve_split(_spec(c), None, "eval") == "test"
  # Evaluation (probes, the kNN bank) reads the labelled training images.
  assert sources.labelled_train_split(_spec(c)) == "train"
  assert sources.labelled_train_split(
      _spec(_config(dataset="cifar10"))) == "train"
  assert sources.labelled_train_split(_spec(_config())) == "train"  # digits


@pytest.mark.slow
def test_uint8_transfer_is_the_rounded_float_views():
  exact = _take(_config(), 3, 1)[0]
  packed = _take(_config(transfer_dtype="uint8"), 3, 1)[0]
  assert packed["images"].dtype == np.uint8
  np.testing.assert_array_equal(packed["example_ids"], exact["example_ids"])
  np.testing.assert_array_equal(
      packed["images"], np.round(exact["images"] * 255).astype(np.uint8))


class JaxclrTinyImages(tfds.core.GeneratorBasedBuilder):
  """24 random 24x24 PNG images, 3 classes: a real, locally built TFDS
  dataset, so that the array_record and tfrecord readers run for real."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(24, 24, 3)),
         "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(24):
      yield i, {"image": rng.integers(0, 256, (24, 24, 3), np.uint8),
                "label": i % 3}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """data_dirs of JaxclrTinyImages built as array_record and as tfrecord."""
  dirs = {}
  for fmt in ("array_record", "tfrecord"):
    dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
    JaxclrTinyImages(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
  return dirs


@pytest.mark.slow
@pytest.mark.parametrize("fmt, access, kind", [
    ("array_record", "auto", "encoded"), ("tfrecord", "auto", "array"),
    ("tfrecord", "memory", "array"), ("tfrecord", "stream", "stream")])
def test_tfds_builds_and_access_paths(tiny_tfds, fmt, access, kind):
  """Random access (batched array_record reads), a decoded in-memory copy of a
  small tfrecord build, and the stream. The first two are layout-invariant
  and see the same images, so they give identical batches; the stream (for
  tfrecord builds too big for memory) gives disjoint per-process shards."""
  c = _config(dataset="jaxclr_tiny_images", image_size=16, batch_size=8)
  c.data_dir, c.data_access = tiny_tfds[fmt], access
  src = _source(c)
  assert (src.kind, src.num_examples, src.num_classes) == (kind, 24, 3)
  one = _take(c, 0, 4)  # Steps 0-2: epoch 0; step 3: epoch 1.
  two = [_take(c, 0, 4, index=p, count=2) for p in range(2)]
  for t in range(4):
    b = one[t]
    assert b["images"].shape == (8, 2, 16, 16, 3)
    assert 0.0 <= b["images"].min() and b["images"].max() <= 1.0
    np.testing.assert_array_equal(b["labels"] % 3, b["labels"])
    p0, p1 = two[0][t]["example_ids"], two[1][t]["example_ids"]
    assert len(p0) == len(p1) == 4 and not set(p0) & set(p1)
    if kind != "stream":
      labels = [src.get_encoded(i)[1] for i in b["example_ids"]] \
          if kind == "encoded" else src.labels[b["example_ids"]]
      np.testing.assert_array_equal(b["labels"], labels)
      np.testing.assert_array_equal(np.concatenate([p0, p1]), b["example_ids"])
      np.testing.assert_array_equal(
          np.concatenate([two[0][t]["images"], two[1][t]["images"]]),
          b["images"])
  epoch0 = np.concatenate([b["example_ids"] for b in one[:3]])
  assert sorted(epoch0) == list(range(24)) or kind == "stream"
  if kind == "stream":  # Positions in the stream: unique, never repeated.
    assert len(set(epoch0)) == 24
  if fmt == "tfrecord" and kind == "array":  # Same images as random access.
    c.data_dir, c.data_access = tiny_tfds["array_record"], "auto"
    ip.clear_caches()
    other = _take(c, 0, 4)
    for a, b in zip(one, other):
      for key in ("example_ids", "labels", "images"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_any_tfds_dataset_through_the_tfds_prefix(tiny_tfds):
  """'tfds:NAME' reads TFDS datasets beyond the known list; its default eval
  split is 'test', and a missing split or name is a DataError naming it."""
  c = _config(dataset="tfds:jaxclr_tiny_images", image_size=16, batch_size=8)
  c.data_dir = tiny_tfds["array_record"]
  config_lib.validate(c)
  src = _source(c)
  assert (src.name, src.num_examples, src.num_classes) == (
      "jaxclr_tiny_images", 24, 3)
  assert _take(c, 0, 1)[0]["images"].shape == (8, 2, 16, 16, 3)
  with pytest.raises(ip.DataError, match=r"no split 'test'; valid: \['train'\]"):
    _source(c, "eval")
  c.dataset = "tfds:jaxclr_no_such_dataset"
  config_lib.validate(c)  # The name is TFDS's to check, when it is opened.
  with pytest.raises(ip.DataError,
                     match="unknown TFDS dataset 'jaxclr_no_such_dataset'"):
    _source(c)


@pytest.mark.slow
def test_labelled_batches_are_crop_flip_views_of_the_subset():
  """Single labelled views for the paper probe and fine-tuning: view 0's
  crop + flip of the pretraining stream (colour never applied: crop_only),
  from the indices' examples only, layout-invariant."""
  c = _config(batch_size=8, color_jitter_strength=1.0)
  data, src = _spec(c), _source(c)
  take = lambda p, n, indices=None: next(ip.labelled_batches(
      data, src, batch_size=8, start_step=3, indices=indices,
      process_index=p, process_count=n))
  full = take(0, 1)
  crops = _take(_config(batch_size=8, on_device=True), 3, 1)[0]
  np.testing.assert_array_equal(full["images"], crops["images"][:, 0])
  np.testing.assert_array_equal(full["labels"], crops["labels"])
  indices = np.arange(100, 140)
  one, two = take(0, 1, indices), [take(p, 2, indices) for p in range(2)]
  assert one["images"].shape == (8, 32, 32, 3)
  for key in ("images", "labels"):
    np.testing.assert_array_equal(
        one[key], np.concatenate([two[0][key], two[1][key]]))
  assert set(one["labels"]) <= set(src.labels[indices])
  with pytest.raises(ip.DataError, match="exceeds the 40 labelled"):
    next(ip.labelled_batches(data, src, batch_size=64, start_step=0,
                             indices=indices))


@pytest.mark.slow
def test_eval_view_is_the_clean_image_of_the_same_example():
  """with_eval_view (distillation's teacher_view='clean'): each row's
  'eval_images' is its example as evaluation preprocesses it, and asking for
  it leaves the augmented views unchanged."""
  c = _config(batch_size=8)
  data, src = _spec(c), _source(c)
  take = lambda **kw: next(ip.labelled_batches(
      data, src, batch_size=8, start_step=2, **kw))
  plain, both = take(), take(with_eval_view=True)
  np.testing.assert_array_equal(plain["images"], both["images"])
  np.testing.assert_array_equal(plain["labels"], both["labels"])
  clean, labels = ip.eval_arrays(c.image_size, src)
  for image, label in zip(both["eval_images"], both["labels"]):
    match = np.flatnonzero(np.all(clean == image, axis=(1, 2, 3)))
    assert match.size >= 1 and label in labels[match]
