"""jaxclr.report on a tiny pretraining run: the figures and index.html, the
features behind the t-SNE, the cosine neighbours, and the user errors."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxclr import config as config_lib, errors
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.jobs import pretrain
from jaxclr.parallel import sharding
from jaxclr.report import page as report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 2-step synthetic pretraining run (labelled, 4 classes, 64 examples)."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  config = config_lib.load_config_file(
      os.path.join(REPO, "configs", "synthetic_tiny.py"), "steps=2,every=1")
  pretrain.run(config, workdir)
  return workdir


def results_json(path, top1, few):
  """A linear_eval results.json's fields the report reads (job.run's keys)."""
  os.makedirs(path)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"top1": top1, "top5": 1.0, "knn_top1": top1 - 0.05,
               "few_label_top1": few, "few_label_top1_std": {}}, f)
  return path


@pytest.fixture(scope="module")
def built(pretrained, tmp_path_factory):
  """(report.json, out dir, what t-SNE was given, the Features computed)."""
  root = tmp_path_factory.mktemp("report")
  ev = results_json(str(root / "eval"), 0.6, {"1": 0.3, "5": 0.4, "10": 0.5})
  rnd = results_json(str(root / "rnd"), 0.4, {"1": 0.25, "5": 0.3, "10": 0.35})
  seen, computed = [], []
  tsne, compute = report.tsne_embedding, report.compute_features
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(report, "tsne_embedding",
               lambda x, **kw: seen.append(np.array(x)) or tsne(x, **kw))
    mp.setattr(report, "compute_features",
               lambda *a, **kw: computed.append(compute(*a, **kw))
               or computed[-1])
    out = str(root / "out")
    r = report.build_report(pretrained, out, eval_workdir=ev,
                            random_eval_workdir=rnd, max_bank=48)
  return r, out, seen, computed[0]


@pytest.mark.slow
def test_figures_are_pngs_of_the_stated_size_and_all_linked(built):
  r, out, _, _ = built
  want = {"curves_step.png", "curves_time.png", "tsne.png", "neighbours.png",
          "accuracy.png", "augmentations.png"}
  assert set(r["images"]) == want
  assert r["images"]["tsne.png"] == [640, 600]
  assert r["images"]["curves_step.png"] == [360 * 3, 320]  # No kNN logged.
  for name, (w, h) in r["images"].items():
    with Image.open(os.path.join(out, name)) as im:
      assert im.format == "PNG" and im.size == (w, h), name
  with open(os.path.join(out, report.INDEX)) as f:
    page = f.read()
  srcs = re.findall(r"<img src='([^']+)'", page)
  assert sorted(srcs) == sorted(want)
  assert all(os.path.isfile(os.path.join(out, s)) for s in srcs)
  assert "http" not in page  # Self-contained: nothing to fetch.
  assert sorted(os.listdir(out)) == sorted(r["files"] + [report.MARKER])
  assert r["checkpoint_step"] == 2 and r["num_eval_shown"] == 64
  assert 0.0 <= r["knn_top1"] <= 1.0


@pytest.mark.slow
def test_tsne_input_is_the_encoders_h(pretrained, built):
  """What t-SNE embeds is model.apply(...)['h'] of the images shown, from
  the checkpoint's variables; the bank is capped at max_bank."""
  r, _, seen, f = built
  assert len(seen) == 1 and seen[0].shape == (64, 64)
  assert f.train_h.shape == (48, 64) and r["num_bank"] == 48
  enc = encoder_lib.restore_encoder(pretrained, sharding.make_mesh("auto"))
  apply = jax.jit(lambda v, x: enc.model.apply(v, x, train=False)["h"])
  for images, h in ((f.eval_images, seen[0]), (f.train_images, f.train_h)):
    want = np.asarray(apply(jax.device_get(enc.variables), images))
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(seen[0], f.eval_h)
  # synthetic evaluates on its training split: row i is the same image.
  assert f.same_split
  np.testing.assert_array_equal(f.train_images, f.eval_images[:48])


def test_neighbours_are_the_cosine_top_k():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(7, 5)) * rng.uniform(0.1, 10, size=(7, 1))
  bank = rng.normal(size=(40, 5)) * rng.uniform(0.1, 10, size=(40, 1))
  idx, sims = report.cosine_neighbours(q, bank, k=5)
  cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                   for b in bank] for a in q])
  np.testing.assert_array_equal(idx[:, 0], cos.argmax(1))
  np.testing.assert_array_equal(idx, np.argsort(-cos, 1)[:, :5])
  np.testing.assert_allclose(sims, np.sort(cos, 1)[:, ::-1][:, :5])
  # Excluding each query's top-1 leaves its second best first.
  idx2, _ = report.cosine_neighbours(q, bank, k=1, exclude=cos.argmax(1))
  np.testing.assert_array_equal(idx2[:, 0], np.argsort(-cos, 1)[:, 1])


def test_curves_and_time_axis_from_records():
  records = [{"step": 1, "loss": 3.0, "steps_per_sec": 2.0},
             {"step": 3, "loss": 2.0, "steps_per_sec": 1.0},
             {"step": 3, "eval/knn_top1": 0.5},
             {"step": 7, "loss": 1.0, "steps_per_sec": 4.0}]
  s = report.curve_series(records)
  assert set(s) == {"loss", "eval/knn_top1"}
  np.testing.assert_array_equal(s["loss"][0], [1, 3, 7])
  times, how = report.elapsed_seconds(records)
  assert times == {1: 0.0, 3: 2.0, 7: 3.0} and how == "training time [s]"
  times, how = report.elapsed_seconds(
      [{"step": 1, "time": 10.0}, {"step": 2, "time": 12.5}])
  assert times == {1: 0.0, 2: 2.5} and how.startswith("wall time")
  xs, ys = report.accuracy_vs_labels(
      {"top1": 0.9, "few_label_top1": {"10": 0.7, "1": 0.2, "5": 0.5}})
  assert (xs, ys) == (["1", "5", "10", "all"], [0.2, 0.5, 0.7, 0.9])


def test_bad_workdir_and_out_are_refused(pretrained, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.WorkdirError,
                     match=re.escape(str(empty / "metrics.jsonl"))):
    report.build_report(str(empty))
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  for name in ("metrics.jsonl", "config.json"):
    shutil.copy(os.path.join(pretrained, name), no_ckpt / name)
  with pytest.raises(errors.WorkdirError, match="no checkpoint under"):
    report.build_report(str(no_ckpt))
  assert not (no_ckpt / "report").exists()
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "notes.txt").write_text("mine")
  with pytest.raises(errors.WorkdirError, match="not a jaxclr report"):
    report.build_report(pretrained, str(taken))
  assert os.listdir(taken) == ["notes.txt"]
  with pytest.raises(errors.WorkdirError, match="results.json"):
    report.build_report(pretrained, str(tmp_path / "o"),
                        eval_workdir=str(empty))


@pytest.mark.slow
def test_a_previous_report_is_replaced(built):
  """prepare_out empties a report directory (its listed files only)."""
  _, out, _, _ = built
  copy = out + "_copy"
  shutil.copytree(out, copy)
  extra = os.path.join(copy, "kept.txt")
  with open(extra, "w") as f:
    f.write("x")
  report.prepare_out(copy)
  assert os.listdir(copy) == ["kept.txt"]


@pytest.mark.slow
def test_augmentation_preview_is_what_pretraining_read(pretrained, built):
  """Both views are the pipeline's own for that step and example, and the
  source image is the dataset's."""
  from jaxclr.data import input_pipeline
  r, _, _, _ = built
  assert r["skipped"] == {} and r["augmentations"]["step"] == 0
  p = report.augmentation_preview(pretrained, step=1, num=3)
  config = encoder_lib.pretraining_config(pretrained)
  spec = config_lib.data_spec(config)
  src = input_pipeline.open_source(spec, "train")
  batches = input_pipeline.pretrain_batches(
      spec, src, batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  next(batches)
  want = next(batches)  # Step 1's batch, reached from step 0.
  np.testing.assert_array_equal(p.example_ids, want["example_ids"][:3])
  np.testing.assert_array_equal(p.views, want["images"][:3])
  assert p.views.shape == (3, 2, 8, 8, 3)
  for i, eid in enumerate(p.example_ids):
    np.testing.assert_allclose(p.sources[i], src.images[eid] / 255.0,
                               atol=1e-6)
