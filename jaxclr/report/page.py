"""A static HTML report of a pretraining run (and, optionally, its evaluation).

  python -m jaxclr.report --workdir DIR [--eval_workdir E]
      [--random_eval_workdir R0] [--out R]

Writes PNGs and one self-contained R/index.html (default R: DIR/report) that
shows them through relative <img src>, so the directory can be copied and
opened without a network:
  curves_step.png   loss, contrast_acc, learning_rate and the periodic kNN
                    top-1 (eval/knn_top1, when logged) against the step;
  curves_time.png   the same against training time, when metrics.jsonl lets
                    it be known (see `elapsed_seconds`);
  tsne.png          t-SNE of the encoder's features h on the first
                    --max_eval examples of the eval split, coloured by label,
                    with the kNN top-1 of those queries against the bank;
  neighbours.png    a few eval queries and their top-k training-split
                    neighbours by cosine similarity of h;
  accuracy.png      with --eval_workdir: the linear probe's top-1 against the
                    labels per class (the few-label probes, then all labels),
                    a second line for --random_eval_workdir;
  augmentations.png a few examples' source images and both views, as
                    input_pipeline.pretrain_batches yields them for
                    --aug_step (not drawn when colour runs on the device).
R/report.json lists what was written; it marks R as a report, so that a
later report may replace it, while any other existing R is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from jaxclr import errors
from jaxclr.report import figures, html as report_html
from jaxclr.report.figures import CURVES
from jaxclr.report.html import accuracy_vs_labels
from jaxclr.training import metrics

MARKER = "report.json"
INDEX = "index.html"
FORMAT = "jaxclr.report.v1"
# Explicit wall-clock fields a record may carry (seconds); the first present
# wins. The trainer writes none today: see `elapsed_seconds`.
TIME_KEYS = ("wall_time", "time", "timestamp", "elapsed_s")


def report_error(message: str) -> errors.WorkdirError:
  return errors.WorkdirError(message)


# ---------------------------------------------------------------- numerics --


def curve_series(records: list[dict]) -> dict[str, tuple[np.ndarray,
                                                         np.ndarray]]:
  """{key: (steps, values)} for each CURVES key some record holds (the
  periodic kNN is logged in records of its own, so each key keeps its own
  steps)."""
  out = {}
  for key, _ in CURVES:
    pts = [(r["step"], r[key]) for r in records if key in r]
    if pts:
      s, v = zip(*pts)
      out[key] = (np.asarray(s, np.int64), np.asarray(v, np.float64))
  return out


def elapsed_seconds(records: list[dict]) -> tuple[dict[int, float], str]:
  """({step: seconds since the first record}, how they were measured).

  An explicit time field (TIME_KEYS) is used as is. Otherwise the training
  records' steps_per_sec (the logger's throughput between log lines, which
  leaves out compilation and evaluation) is integrated: the result is the
  time spent training, not the run's wall clock. ({}, "") when neither.
  """
  for key in TIME_KEYS:
    pts = [(r["step"], float(r[key])) for r in records if key in r]
    if pts:
      t0 = pts[0][1]
      return {s: t - t0 for s, t in pts}, f"wall time [s] ({key})"
  train = [r for r in records if r.get("steps_per_sec", 0) > 0]
  if not train:
    return {}, ""
  out, t, prev = {}, 0.0, None
  for r in train:
    if prev is not None:
      t += max(r["step"] - prev, 0) / r["steps_per_sec"]
    out[r["step"]], prev = t, r["step"]
  return out, "training time [s]"


def cosine_neighbours(queries: np.ndarray, bank: np.ndarray, k: int,
                      exclude: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(indices [Q, k], cosine similarities [Q, k]) of each query's k most
  similar bank rows, most similar first.

  exclude: optional int [Q], a bank row each query may not pick (-1: none);
  the report passes the query's own row when the eval split is the training
  split, where every query would otherwise find itself.
  """
  q = np.asarray(queries, np.float64)
  b = np.asarray(bank, np.float64)
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  sims = q @ b.T
  if exclude is not None:
    rows = np.nonzero(np.asarray(exclude) >= 0)[0]
    sims[rows, np.asarray(exclude)[rows]] = -np.inf
  k = min(k, b.shape[0])
  idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(sims, idx, axis=1)


# ---------------------------------------------------------------- t-SNE --


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
  """2-D t-SNE of `features` (perplexity capped below the point count)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  n = features.shape[0]
  perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
  return TSNE(n_components=2, init="pca", random_state=seed,
              perplexity=perplexity).fit_transform(
                  np.asarray(features, np.float64))


# -------------------------------------------------------------------- data --


@dataclasses.dataclass(frozen=True)
class Features:
  """The encoder's h on (a prefix of) the eval split and the bank."""
  eval_images: np.ndarray  # float32 [Q, H, W, 3] in [0, 1], as embedded.
  eval_labels: np.ndarray
  eval_h: np.ndarray
  train_images: np.ndarray
  train_labels: np.ndarray
  train_h: np.ndarray
  train_split: str
  eval_split: str
  same_split: bool  # Eval split = training split: row i is the same image.
  num_classes: int
  checkpoint_step: int
  dataset: str


def _first_batches(batches, limit: int, kept: list):
  """Passes eval batches on until `limit` real examples went by, keeping
  their (images, labels) in `kept` (the images the features belong to)."""
  seen = 0
  for b in batches:
    if seen >= limit:
      return
    kept.append((b["images"][b["mask"]], b["labels"][b["mask"]]))
    seen += int(b["mask"].sum())
    yield b


def _embed(feature_fn, enc, mesh, spec, which: str, limit: int,
           batch_size: int):
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import (  # pylint: disable=g-import-not-at-top
      encoder as encoder_lib)
  src = input_pipeline.open_source(spec, which)
  kept: list = []
  batches = input_pipeline.eval_batches(spec.image_size, src, batch_size)
  h, labels = encoder_lib.extract_features(
      feature_fn, enc.variables, mesh, _first_batches(batches, limit, kept))
  images = np.concatenate([k[0] for k in kept])[:limit]
  return images, labels[:limit], h[:limit], src.num_classes


def compute_features(workdir: str, *, max_eval: int, max_bank: int,
                     mesh=None, step: int | None = None) -> Features:
  """Restores DIR's encoder and embeds the first `max_eval` eval-split and
  `max_bank` labelled-training-split examples, with the data spec, splits,
  preprocessing (centre crop) and feature extractor of jaxclr.linear_eval."""
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import (  # pylint: disable=g-import-not-at-top
      encoder as encoder_lib)
  from jaxclr.jobs import (  # pylint: disable=g-import-not-at-top
      linear_eval as job)
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh("auto") if mesh is None else mesh
  config = config_lib.linear_eval_config()
  config.pretrained_workdir = workdir
  config.allow_eval_on_train = True  # Shown, and said, not refused.
  spec = job.labelled_data_spec(config)
  train_split, eval_split = job.checked_splits(config, spec, "the report")
  enc = encoder_lib.restore_encoder(workdir, mesh, step=step)
  feature_fn = encoder_lib.make_feature_fn(enc.model, mesh, feature_layer=0)
  n = mesh.devices.size
  batch_size = max(n, 256 // n * n)
  ev = _embed(feature_fn, enc, mesh, spec, "eval", max_eval, batch_size)
  tr = _embed(feature_fn, enc, mesh, spec, "train", max_bank, batch_size)
  return Features(
      eval_images=ev[0], eval_labels=ev[1], eval_h=ev[2],
      train_images=tr[0], train_labels=tr[1], train_h=tr[2],
      train_split=train_split, eval_split=eval_split,
      same_split=train_split == eval_split,
      num_classes=int(ev[3]), checkpoint_step=enc.checkpoint_step,
      dataset=spec.dataset)


@dataclasses.dataclass(frozen=True)
class AugmentationPreview:
  """Examples of one pretraining batch: their source images and both views."""
  step: int  # pretrain_batches(start_step=step)'s first batch.
  example_ids: np.ndarray
  labels: np.ndarray
  sources: list  # float32 [h, w, 3] in [0, 1], decoded, before augmentation.
  views: np.ndarray  # float32 [N, 2, H, W, 3] in [0, 1].


def augmentation_preview(workdir: str, step: int, num: int
                         ) -> AugmentationPreview | str:
  """The first `num` examples of the batch jaxclr.data.input_pipeline.
  pretrain_batches yields for `step` under DIR's config (one process), or a
  sentence saying why it cannot be shown as training saw it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import (  # pylint: disable=g-import-not-at-top
      encoder as encoder_lib)
  config = encoder_lib.pretraining_config(workdir)
  spec = config_lib.data_spec(config)
  if spec.augment.on_device:
    return ("augment.on_device: the colour ops run in the training step, "
            "not in the input pipeline")
  src = input_pipeline.open_source(spec, "train")
  if src.kind == "stream":
    return f"{src.name} has no random access to its source images"
  batch = next(input_pipeline.pretrain_batches(
      spec, src, batch_size=config.batch_size, start_step=step,
      process_index=0, process_count=1))
  views = batch["images"][:num]
  if views.dtype == np.uint8:  # transfer_dtype='uint8'.
    views = views.astype(np.float32) / 255.0
  ids = batch["example_ids"][:num]
  raw, labels = input_pipeline.raw_batch(src, ids)
  decode = input_pipeline.decode_fn(src.kind)
  sources = [np.asarray(decode(tf.constant(r))) for r in raw]
  return AugmentationPreview(step=step, example_ids=ids, labels=labels,
                             sources=sources, views=np.asarray(views))


def knn_top1(f: Features) -> float | None:
  """The weighted kNN's top-1 (k=200, tau=0.1: the periodic evaluator's) of
  the shown eval examples against the bank; None without labels."""
  from jaxclr.evaluation import knn  # pylint: disable=g-import-not-at-top
  if f.num_classes <= 0:
    return None
  return knn.knn_accuracy(f.eval_h, f.eval_labels, f.train_h, f.train_labels,
                          num_classes=f.num_classes,
                          k=min(knn.DEFAULT_K, len(f.train_labels)),
                          temperature=knn.DEFAULT_TEMPERATURE)


# ----------------------------------------------------------------- the job --


def prepare_out(out: str) -> None:
  """Creates `out`, or empties a previous report there (only the files its
  report.json lists); WorkdirError for anything else that exists."""
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise report_error(f"--out {out!r} exists and is not a directory")
    marker = os.path.join(out, MARKER)
    entries = os.listdir(out)
    if entries and not os.path.isfile(marker):
      raise report_error(f"--out {out!r} exists and is not a jaxclr report (no "
                 f"{MARKER}); pass a new path, or remove it")
    if entries:
      with open(marker) as f:
        try:
          old = json.load(f)
        except ValueError:
          old = {}
      if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise report_error(f"--out {out!r}: {marker} is not a jaxclr report's")
      for name in list(old.get("files", [])) + [MARKER]:
        path = os.path.join(out, os.path.basename(str(name)))
        if os.path.isfile(path):
          os.remove(path)
  os.makedirs(out, exist_ok=True)


def check_workdir(workdir: str) -> None:
  """WorkdirError naming what a report needs and DIR lacks."""
  from jaxclr.training import (  # pylint: disable=g-import-not-at-top
      workdir as workdir_lib)
  if not os.path.isdir(workdir):
    raise report_error(f"--workdir {workdir!r} does not exist")
  path = os.path.join(workdir, metrics.METRICS_FILE)
  if not os.path.isfile(path):
    raise report_error(f"{path} does not exist: --workdir {workdir!r} is not a "
               "jaxclr pretraining workdir, or it has not logged yet")
  if not workdir_lib.checkpoint_steps(workdir):
    raise report_error(f"--workdir {workdir!r} has no checkpoint under "
               f"{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}")


def _read_results(path: str) -> dict:
  from jaxclr.jobs import (  # pylint: disable=g-import-not-at-top
      linear_eval as job)
  if not os.path.isfile(os.path.join(path, job.RESULTS_FILE)):
    raise report_error(f"{os.path.join(path, job.RESULTS_FILE)} does not exist: "
               "pass a finished jaxclr.linear_eval workdir")
  return job.read_results(path)


def build_report(workdir: str, out: str | None = None, *,
                 eval_workdir: str | None = None,
                 random_eval_workdir: str | None = None,
                 max_eval: int = 2000, max_bank: int = 10000,
                 num_queries: int = 6, k: int = 5, aug_step: int = 0,
                 num_aug: int = 4, mesh=None) -> dict:
  """Writes the report; returns report.json's contents."""
  t_start = time.time()
  out = os.path.join(workdir, "report") if out is None else out
  check_workdir(workdir)
  evals = {}
  if eval_workdir:
    evals["pretrained"] = _read_results(eval_workdir)
  if random_eval_workdir:
    evals["random init"] = _read_results(random_eval_workdir)
  prepare_out(out)
  written: dict[str, list[int]] = {}
  records = metrics.read_records(workdir)
  series = curve_series(records)
  how = ""
  if series:
    from jaxclr import (  # pylint: disable=g-import-not-at-top
        config as config_lib)
    from jaxclr.evaluation import (  # pylint: disable=g-import-not-at-top
        encoder as encoder_lib)
    method, opts = config_lib.method_options(
        encoder_lib.pretraining_config(workdir))
    loss_name = method.loss_name(opts)
    figures.plot_curves(series, lambda s: s, "step", out, "curves_step.png",
                        written, loss_name)
    times, how = elapsed_seconds(records)
    if times:
      ordered = sorted(times)

      def at(step):  # Eval records fall between train ones: nearest before.
        i = np.searchsorted(ordered, step, side="right") - 1
        return times[ordered[i]] if i >= 0 else None
      figures.plot_curves(series, at, how, out, "curves_time.png", written,
                          loss_name)

  f = compute_features(workdir, max_eval=max_eval, max_bank=max_bank,
                       mesh=mesh)
  acc = knn_top1(f)
  points = tsne_embedding(f.eval_h)
  title = (f"t-SNE of h, {len(f.eval_labels)} examples of {f.dataset} "
           f"'{f.eval_split}', step {f.checkpoint_step}")
  if acc is not None:
    title += (f"\nkNN top-1 {acc:.3f} (bank: {len(f.train_labels)} of "
              f"'{f.train_split}'"
              + (", which holds the queries)" if f.same_split else ")"))
  figures.plot_tsne(points, f.eval_labels, title, out, written)

  nq = min(num_queries, len(f.eval_labels))
  queries = np.linspace(0, len(f.eval_labels) - 1, nq).astype(int)
  exclude = (np.where(queries < len(f.train_labels), queries, -1)
             if f.same_split else None)
  idx, sims = cosine_neighbours(f.eval_h[queries], f.train_h, k, exclude)
  figures.plot_neighbours(f.eval_images[queries], f.eval_labels[queries],
                  f.train_images, f.train_labels, idx, sims, out, written)

  if evals:
    figures.plot_accuracy({k: accuracy_vs_labels(r) for k, r in evals.items()},
                          out, written)

  preview = augmentation_preview(workdir, aug_step, num_aug)
  if isinstance(preview, str):
    skipped = {"augmentations.png": preview}
  else:
    figures.plot_augmentations(preview, out, written)
    skipped = {}

  report = {
      "format": FORMAT, "workdir": os.path.abspath(workdir),
      "checkpoint_step": f.checkpoint_step, "dataset": f.dataset,
      "train_split": f.train_split, "eval_split": f.eval_split,
      "num_eval_shown": int(len(f.eval_labels)),
      "num_bank": int(len(f.train_labels)), "knn_top1": acc,
      "neighbours": {"queries": queries.tolist(), "indices": idx.tolist(),
                     "cosine": sims.tolist()},
      "eval_workdirs": {"pretrained": eval_workdir,
                        "random init": random_eval_workdir},
      "augmentations": None if skipped else {
          "step": aug_step, "example_ids": preview.example_ids.tolist()},
      "skipped": skipped, "time_axis": how, "images": written,
      "files": sorted(written) + [INDEX],
  }
  with open(os.path.join(out, INDEX), "w") as fh:
    fh.write(report_html.render_html(report, records, evals))
  report["wall_s"] = time.time() - t_start
  with open(os.path.join(out, MARKER), "w") as fh:
    json.dump(report, fh, indent=2)
  return report
