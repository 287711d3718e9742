"""Bad data, each kind: the pretraining job stops with one line on stderr
and exit status 2, before anything is compiled, and writes nothing at all:
the workdir is not even created.

Each case builds its dataset under tmp_path and runs `pretrain.run` inside
`cli.user_errors_exit()`, the code path of `python -m jaxclr.main` (one
case also runs that command). BAD_DATA is the list docs/reliability.md
("Bad data") shows; a test keeps the two equal.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxclr import cli, config as config_lib, errors
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain

from input_pipeline_test import JaxclrTinyImages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic_tiny.py")
N = 16  # The tiny config's batch: the smallest dataset it trains on.


def _images(n=N, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                              np.uint8)


def _npz(tmp_path, **arrays):
  path = str(tmp_path / "data.npz")
  np.savez(path, **arrays)
  return {"dataset": f"npz:{path}"}


def _png(path, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_images(1, seed=seed)[0]).save(path)


def _folder(tmp_path, layout):
  """layout: {relative path: 'png' (an image), 'bad' (not an image),
  'dir' (an empty folder), 'txt'}."""
  root = tmp_path / "images"
  for i, (rel, kind) in enumerate(layout.items()):
    path = root / rel
    if kind == "dir":
      os.makedirs(path, exist_ok=True)
      continue
    os.makedirs(path.parent, exist_ok=True)
    if kind == "png":
      _png(str(path), seed=i)
    else:
      path.write_bytes(b"not an image" if kind == "bad" else b"notes")
  return {"dataset": f"folder:{root}"}


def _class(name, n=N // 2):
  return {f"{name}/{i}.png": "png" for i in range(n)}


def _truncated_npz(tmp_path):
  path = str(tmp_path / "data.npz")
  np.savez(path, images=_images())
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return {"dataset": f"npz:{path}"}


def _npy_named_npz(tmp_path):
  path = str(tmp_path / "data.npz")
  with open(path, "wb") as f:
    np.save(f, _images())
  return {"dataset": f"npz:{path}"}


def _mixed_sizes(tmp_path):
  mixed = np.empty(N, object)
  for i in range(N):
    mixed[i] = _images(1, size=8 + i % 2)[0]
  return _npz(tmp_path, images=mixed)


def _link_loop(tmp_path):
  made = _folder(tmp_path, {**_class("cat"), **_class("dog")})
  os.symlink("..", tmp_path / "images" / "dog" / "again")
  return made


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JaxclrTinyImages(data_dir=data_dir,
                   file_format="array_record").download_and_prepare()
  return data_dir


# kind: (what the dataset is, the config it makes, text the line must hold).
BAD_DATA = {
    # folder:
    "folder_missing": (
        "folder: path that does not exist",
        lambda t: {"dataset": f"folder:{t}/nothere"}, "does not exist"),
    "folder_is_a_file": (
        "folder: path that is a file",
        lambda t: _npz(t, images=_images()) and {
            "dataset": f"folder:{t}/data.npz"}, "is a file, not a folder"),
    "folder_without_images": (
        "folder with no image file",
        lambda t: _folder(t, {"notes.txt": "txt"}), "holds no image files"),
    "folder_all_unreadable": (
        "folder whose every image is unreadable",
        lambda t: _folder(t, {"a.jpg": "bad", "b.png": "bad"}),
        "none of its 2 image files is readable"),
    "folder_empty_class": (
        "class folder without images",
        lambda t: _folder(t, {**_class("cat", N), "dog": "dir"}),
        "class folder 'dog' has no readable image (it holds no image files)"),
    "folder_class_all_unreadable": (
        "class folder whose images are all unreadable",
        lambda t: _folder(t, {**_class("cat", N), "dog/a.jpg": "bad",
                              "dog/b.jpg": "bad"}),
        "class folder 'dog' has no readable image (all 2 of its image files "
        "are unreadable)"),
    "folder_images_beside_class_folders": (
        "images both in class folders and beside them",
        lambda t: _folder(t, {**_class("cat"), **_class("dog"),
                              "stray.png": "png"}),
        "holds 1 images outside class folders (first: stray.png)"),
    "folder_link_loop": (
        "symbolic link loop in a folder",
        _link_loop, "symbolic link loop"),
    "folder_unknown_split": (
        "folder split named in the config that it lacks",
        lambda t: {**_folder(t, {**{f"train/{k}": v for k, v in
                                    _class("cat", N).items()},
                                 "test/cat/0.png": "png"}),
                   "train_split": "training"},
        "has no split 'training'; splits found: ['test', 'train']"),
    "folder_images_beside_split_folders": (
        "images beside split folders",
        lambda t: _folder(t, {**{f"train/{k}": v for k, v in
                                 _class("cat", N).items()},
                              "test/cat/0.png": "png", "x.png": "png"}),
        "1 image files beside them"),
    "folder_split_without_classes": (
        "split with loose images where the others have class folders",
        lambda t: {**_folder(t, {**{f"train/{k}": v for k, v in
                                    _class("cat", N).items()},
                                 "test/0.png": "png"}),
                   "eval_every_steps": 1},
        "outside the class folders of the dataset's other splits"),
    "folder_split_empty_class": (
        "empty class folder in one split",
        lambda t: _folder(t, {**{f"train/{k}": v for k, v in
                                 _class("cat", N).items()},
                              "train/dog": "dir", "test/cat/0.png": "png"}),
        "class folder 'dog' has no readable image"),
    # npz:
    "npz_missing": (
        "npz file that does not exist",
        lambda t: {"dataset": f"npz:{t}/nothere.npz"}, "not found"),
    "npz_is_a_directory": (
        "npz: path that is a directory",
        lambda t: {"dataset": f"npz:{t}"}, "is a directory"),
    "npz_not_an_archive": (
        "npz: file that is not an archive",
        lambda t: (t / "data.npz").write_bytes(b"hello") and {
            "dataset": f"npz:{t}/data.npz"}, "not an .npz archive"),
    "npz_truncated": (
        "truncated npz archive", _truncated_npz, "cannot read"),
    "npz_single_array": (
        "a .npy array under an .npz name", _npy_named_npz,
        "is a single .npy array, not an .npz archive"),
    "npz_without_images": (
        "npz without an images array",
        lambda t: _npz(t, pixels=_images()), "no 'images' array"),
    "npz_float_images": (
        "npz images of the wrong dtype (float)",
        lambda t: _npz(t, images=_images().astype(np.float32) / 255),
        "'images' must be uint8 [N, H, W, 3]; got float32 [16, 8, 8, 3] "
        "(floats in [0, 1]?"),
    "npz_grayscale_images": (
        "npz images of the wrong rank (grayscale [N, H, W])",
        lambda t: _npz(t, images=_images()[..., 0]),
        "got uint8 [16, 8, 8] (grayscale?"),
    "npz_rgba_images": (
        "npz images with 4 channels",
        lambda t: _npz(t, images=np.concatenate(
            [_images(), _images()[..., :1]], -1)), "(RGBA?"),
    "npz_no_images": (
        "npz with zero images",
        lambda t: _npz(t, images=_images(0)), "'images' is empty"),
    "npz_zero_width_images": (
        "npz images of width 0",
        lambda t: _npz(t, images=np.zeros((N, 8, 0, 3), np.uint8)),
        "height or width 0"),
    "npz_images_of_mixed_sizes": (
        "npz images of different sizes (an object array)", _mixed_sizes,
        "'images' is an array of Python objects (images of different "
        "sizes?)"),
    "npz_label_count": (
        "fewer labels than images",
        lambda t: _npz(t, images=_images(), labels=np.arange(N - 1) % 2),
        "15 labels for 16 images"),
    "npz_float_labels": (
        "labels of the wrong dtype (float)",
        lambda t: _npz(t, images=_images(),
                       labels=(np.arange(N) % 2).astype(np.float32)),
        "'labels' must be integer class indices; got float32"),
    "npz_one_hot_labels": (
        "labels of the wrong rank (one-hot)",
        lambda t: _npz(t, images=_images(), labels=np.eye(4)[np.arange(N) % 4]),
        "must be class indices [N]; got shape [16, 4] (one-hot?"),
    "npz_negative_labels": (
        "negative labels",
        lambda t: _npz(t, images=_images(), labels=np.arange(N) % 3 - 3),
        "'labels' has label -3"),
    "npz_partly_unlabelled": (
        "labels mixing -1 (unlabelled) and classes",
        lambda t: _npz(t, images=_images(), labels=np.arange(N) % 3 - 1),
        "mixes 6 unlabelled (-1) examples with 10 labelled ones"),
    "npz_labels_from_one": (
        "labels counted from 1 (class 0 empty)",
        lambda t: _npz(t, images=_images(), labels=np.arange(N) % 4 + 1),
        "labels run 0..4 but no example has class 0"),
    "npz_label_out_of_range": (
        "a label beyond the number of examples",
        lambda t: _npz(t, images=_images(),
                       labels=np.r_[np.arange(N - 1) % 2, 1000]),
        "label 1000 implies 1001 classes but there are only 16 examples"),
    "npz_unknown_split": (
        "npz split named in the config that it lacks",
        lambda t: {**_npz(t, train_images=_images(), test_images=_images(4)),
                   "train_split": "valid"},
        "has no split 'valid'; splits found: ['test', 'train']"),
    # tfds:
    "tfds_unknown_split": (
        "TFDS split that does not exist",
        "tfds", "has no split 'nope'; valid: ['train']"),
    "tfds_unknown_dataset": (
        "TFDS dataset name that does not exist",
        lambda t: {"dataset": "tfds:no_such_dataset_jaxclr", "data_dir": str(t)},
        "unknown TFDS dataset 'no_such_dataset_jaxclr'"),
    "tfds_not_prepared": (
        "TFDS dataset not prepared in data_dir",
        lambda t: {"dataset": "cifar10", "data_dir": str(t)},
        "is not prepared in data_dir"),
    # Any source:
    "batch_larger_than_dataset": (
        "fewer examples than the batch",
        lambda t: _npz(t, images=_images(8)),
        "batch_size=16 exceeds the 8 training examples"),
    "unlabelled_data_for_class_positives": (
        "unlabelled data for a method that reads labels",
        lambda t: {**_npz(t, images=_images()), "method": "supcon"},
        "has no labels"),
}


def tiny_config(**overrides):
  config = config_lib.load_config_file(TINY, "steps=2,every=1")
  for key, value in overrides.items():
    config[key] = value
  return config


def run_job(config, workdir, capsys) -> tuple[int, list[str]]:
  """(exit status, lines of stderr starting 'jaxclr: ') of the job."""
  input_pipeline.clear_caches()  # Folder scans are cached by path.
  with pytest.raises(SystemExit) as e:
    with cli.user_errors_exit():
      pretrain.run(config, workdir)
  err = capsys.readouterr().err
  return e.value.code, [l for l in err.splitlines() if l.startswith("jaxclr")]


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_stops_in_one_line_with_status_2_writing_nothing(
    kind, tmp_path, capsys, request):
  _, make, needle = BAD_DATA[kind]
  if make == "tfds":
    overrides = {"dataset": "tfds:jaxclr_tiny_images", "train_split": "nope",
                 "data_dir": request.getfixturevalue("tiny_tfds_dir")}
  else:
    overrides = make(tmp_path)
  workdir = tmp_path / "workdir"
  status, lines = run_job(tiny_config(**overrides), str(workdir), capsys)
  assert status == errors.EXIT_USER_ERROR, lines
  assert len(lines) == 1 and lines[0].startswith("jaxclr: error: "), lines
  assert needle in lines[0], lines[0]
  assert not workdir.exists()  # Not even created.


def test_good_data_beside_each_check_passes(tmp_path):
  """Negative control: data that differs from the bad cases only in the
  checked property opens (a labelled folder, partly unreadable; an npz
  whose test split lacks some classes; an unlabelled npz)."""
  made = _folder(tmp_path, {**_class("cat"), **_class("dog"),
                            "dog/x.jpg": "bad"})
  spec = config_lib.data_spec(tiny_config(**made))
  src = input_pipeline.open_source(spec, "train")
  assert (src.num_examples, src.num_classes, len(src.skipped)) == (N, 2, 1)
  made = _npz(tmp_path, train_images=_images(), test_images=_images(4),
              train_labels=np.arange(N) % 4, test_labels=np.zeros(4, int))
  spec = config_lib.data_spec(tiny_config(**made))
  assert input_pipeline.open_source(spec, "eval").num_classes == 4
  made = _npz(tmp_path, images=_images(), labels=np.full(N, -1))
  spec = config_lib.data_spec(tiny_config(**made))
  assert input_pipeline.open_source(spec, "train").num_classes == 0


@pytest.mark.slow
def test_the_command_exits_2_with_one_line(tmp_path):
  """`python -m jaxclr.main` itself, on one kind: no traceback, status 2."""
  made = _npz(tmp_path, images=_images().astype(np.float32))
  workdir = tmp_path / "workdir"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxclr.main", "--config", f"{TINY}:steps=2",
       f"--config.dataset={made['dataset']}", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors_ = [l for l in proc.stderr.splitlines() if l.startswith("jaxclr")]
  assert len(errors_) == 1 and "must be uint8" in errors_[0], errors_
  assert not workdir.exists()


def test_reliability_doc_lists_every_kind():
  """docs/reliability.md's "Bad data" table: one row per BAD_DATA kind, in
  order, with its description."""
  with open(os.path.join(REPO, "docs", "reliability.md")) as f:
    doc = f.read()
  section = doc.split("## Bad data")[1].split("\n## ")[0]
  rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M)
  assert [k for k, _ in rows] == list(BAD_DATA)
  for kind, what in rows:
    assert what.strip() == BAD_DATA[kind][0], kind
