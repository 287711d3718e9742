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
import html
import json
import os
import time

import numpy as np

from jaxclr import errors, metrics

MARKER = "report.json"
INDEX = "index.html"
FORMAT = "jaxclr.report.v1"
DPI = 100
# (metrics.jsonl key, axis title), in the order the panels are drawn.
CURVES = (("loss", "loss"), ("contrast_acc", "contrast_acc"),
          ("learning_rate", "learning rate"),
          ("eval/knn_top1", "kNN top-1 (periodic)"))
# Explicit wall-clock fields a record may carry (seconds); the first present
# wins. The trainer writes none today: see `elapsed_seconds`.
TIME_KEYS = ("wall_time", "time", "timestamp", "elapsed_s")


def _err(message: str) -> errors.WorkdirError:
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


def accuracy_vs_labels(results: dict) -> tuple[list[str], list[float | None]]:
  """(x labels, top-1) from a linear_eval results.json: each few-label probe
  (labels per class, ascending), then 'all' (the full-label probe)."""
  few = results.get("few_label_top1") or {}
  keys = sorted(few, key=int)
  return keys + ["all"], [few[k] for k in keys] + [results.get("top1")]


# ----------------------------------------------------------------- figures --


def _figure(width_px: int, height_px: int):
  # A Figure with its own Agg canvas: no pyplot, so no global figure state.
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, out: str, name: str, written: dict) -> None:
  # No bbox_inches='tight': the PNG keeps the stated pixel size.
  fig.savefig(os.path.join(out, name), dpi=DPI)
  w, h = fig.get_size_inches() * DPI
  written[name] = [int(round(w)), int(round(h))]


def plot_curves(series: dict, x_of_step, xlabel: str, out: str, name: str,
                written: dict, loss_name: str = "") -> None:
  """One panel per CURVES key in `series`; x_of_step maps steps to x (None
  drops the point); loss_name titles the loss panel (the run's objective)."""
  keys = [k for k, _ in CURVES if k in series]
  titles = dict(CURVES)
  if loss_name:
    titles["loss"] = f"loss ({loss_name})"
  fig = _figure(360 * len(keys), 320)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(1, len(keys), i + 1)
    steps, values = series[key]
    xs = [x_of_step(int(s)) for s in steps]
    pts = [(x, v) for x, v in zip(xs, values) if x is not None]
    if pts:
      ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
    ax.set_title(titles[key])
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, out, name, written)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
  """2-D t-SNE of `features` (perplexity capped below the point count)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  n = features.shape[0]
  perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
  return TSNE(n_components=2, init="pca", random_state=seed,
              perplexity=perplexity).fit_transform(
                  np.asarray(features, np.float64))


def plot_tsne(points: np.ndarray, labels: np.ndarray, title: str, out: str,
              written: dict) -> None:
  fig = _figure(640, 600)
  ax = fig.add_subplot(1, 1, 1)
  classes = np.unique(labels)
  cmap = "tab10" if len(classes) <= 10 else "tab20"
  sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=8)
  if 1 < len(classes) <= 20:
    ax.legend(*sc.legend_elements(), title="label", fontsize=7, loc="best")
  ax.set_title(title, fontsize=10)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  _save(fig, out, "tsne.png", written)


def plot_neighbours(query_images, query_labels, bank_images, bank_labels,
                    idx, sims, out: str, written: dict) -> None:
  """Rows: a query, then its neighbours (green title: same label)."""
  q, k = idx.shape
  fig = _figure(110 * (k + 1), 120 * q)
  for r in range(q):
    ax = fig.add_subplot(q, k + 1, r * (k + 1) + 1)
    ax.imshow(np.clip(query_images[r], 0, 1), interpolation="nearest")
    ax.set_title(f"query y={int(query_labels[r])}", fontsize=8)
    ax.axis("off")
    for c in range(k):
      j = idx[r, c]
      ax = fig.add_subplot(q, k + 1, r * (k + 1) + c + 2)
      ax.imshow(np.clip(bank_images[j], 0, 1), interpolation="nearest")
      same = bank_labels[j] == query_labels[r]
      ax.set_title(f"y={int(bank_labels[j])} cos {sims[r, c]:.2f}",
                   fontsize=8, color="green" if same else "red")
      ax.axis("off")
  fig.tight_layout()
  _save(fig, out, "neighbours.png", written)


def plot_accuracy(lines: dict[str, dict], out: str, written: dict) -> None:
  """lines: {legend: results.json}; x = labels per class, then 'all'."""
  fig = _figure(560, 400)
  ax = fig.add_subplot(1, 1, 1)
  ticks: list[str] = []
  for name, results in lines.items():
    xs, ys = accuracy_vs_labels(results)
    ticks = xs if len(xs) > len(ticks) else ticks
    pts = [(xs.index(x), y) for x, y in zip(xs, ys) if y is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=name)
  ax.set_xticks(range(len(ticks)), ticks)
  ax.set_xlabel("labels per class")
  ax.set_ylabel("linear probe top-1 (eval split)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _save(fig, out, "accuracy.png", written)


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
  from jaxclr.evaluation import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
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
  from jaxclr import config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import job  # pylint: disable=g-import-not-at-top
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
  from jaxclr import config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxclr.evaluation import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
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


def plot_augmentations(p: AugmentationPreview, out: str,
                       written: dict) -> None:
  """Columns: source image, view 1, view 2; one row per example."""
  n = len(p.example_ids)
  fig = _figure(360, 120 * n)
  for r in range(n):
    for c, (img, what) in enumerate(((p.sources[r], "source"),
                                     (p.views[r, 0], "view 1"),
                                     (p.views[r, 1], "view 2"))):
      ax = fig.add_subplot(n, 3, r * 3 + c + 1)
      ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
      ax.set_title(f"id {int(p.example_ids[r])} {what}" if c == 0 else what,
                   fontsize=8)
      ax.axis("off")
  fig.tight_layout()
  _save(fig, out, "augmentations.png", written)


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
      raise _err(f"--out {out!r} exists and is not a directory")
    marker = os.path.join(out, MARKER)
    entries = os.listdir(out)
    if entries and not os.path.isfile(marker):
      raise _err(f"--out {out!r} exists and is not a jaxclr report (no "
                 f"{MARKER}); pass a new path, or remove it")
    if entries:
      with open(marker) as f:
        try:
          old = json.load(f)
        except ValueError:
          old = {}
      if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise _err(f"--out {out!r}: {marker} is not a jaxclr report's")
      for name in list(old.get("files", [])) + [MARKER]:
        path = os.path.join(out, os.path.basename(str(name)))
        if os.path.isfile(path):
          os.remove(path)
  os.makedirs(out, exist_ok=True)


def check_workdir(workdir: str) -> None:
  """WorkdirError naming what a report needs and DIR lacks."""
  from jaxclr import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise _err(f"--workdir {workdir!r} does not exist")
  path = os.path.join(workdir, metrics.METRICS_FILE)
  if not os.path.isfile(path):
    raise _err(f"{path} does not exist: --workdir {workdir!r} is not a "
               "jaxclr pretraining workdir, or it has not logged yet")
  if not workdir_lib.checkpoint_steps(workdir):
    raise _err(f"--workdir {workdir!r} has no checkpoint under "
               f"{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}")


def _read_results(path: str) -> dict:
  from jaxclr.evaluation import job  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(path, job.RESULTS_FILE)):
    raise _err(f"{os.path.join(path, job.RESULTS_FILE)} does not exist: "
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
    from jaxclr import config_validate  # pylint: disable=g-import-not-at-top
    from jaxclr.evaluation import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
    loss_name = config_validate.loss_setup(
        encoder_lib.pretraining_config(workdir))[0]
    plot_curves(series, lambda s: s, "step", out, "curves_step.png", written,
                loss_name)
    times, how = elapsed_seconds(records)
    if times:
      ordered = sorted(times)

      def at(step):  # Eval records fall between train ones: nearest before.
        i = np.searchsorted(ordered, step, side="right") - 1
        return times[ordered[i]] if i >= 0 else None
      plot_curves(series, at, how, out, "curves_time.png", written,
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
  plot_tsne(points, f.eval_labels, title, out, written)

  nq = min(num_queries, len(f.eval_labels))
  queries = np.linspace(0, len(f.eval_labels) - 1, nq).astype(int)
  exclude = (np.where(queries < len(f.train_labels), queries, -1)
             if f.same_split else None)
  idx, sims = cosine_neighbours(f.eval_h[queries], f.train_h, k, exclude)
  plot_neighbours(f.eval_images[queries], f.eval_labels[queries],
                  f.train_images, f.train_labels, idx, sims, out, written)

  if evals:
    plot_accuracy(evals, out, written)

  preview = augmentation_preview(workdir, aug_step, num_aug)
  if isinstance(preview, str):
    skipped = {"augmentations.png": preview}
  else:
    plot_augmentations(preview, out, written)
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
    fh.write(render_html(report, records, evals))
  report["wall_s"] = time.time() - t_start
  with open(os.path.join(out, MARKER), "w") as fh:
    json.dump(report, fh, indent=2)
  return report


def _fmt(v) -> str:
  if v is None:
    return "-"
  return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def render_html(report: dict, records: list[dict], evals: dict) -> str:
  """index.html: a summary table and each PNG by relative path."""
  e = html.escape
  last = next((r for r in reversed(records) if "loss" in r), {})
  rows = [("workdir", report["workdir"]),
          ("checkpoint step", report["checkpoint_step"]),
          ("dataset", report["dataset"]),
          ("train / eval split", f"{report['train_split']} / "
           f"{report['eval_split']}"),
          ("last logged step", last.get("step")),
          ("last loss", last.get("loss")),
          ("last contrast_acc", last.get("contrast_acc")),
          ("kNN top-1 (shown examples)", report["knn_top1"])]
  for name, r in evals.items():
    xs, ys = accuracy_vs_labels(r)
    rows += [(f"{name}: top-1, " + ("all labels" if x == "all" else
                                    f"{x} labels/class"), y)
             for x, y in zip(xs, ys)]
    rows.append((f"{name}: kNN top-1", r.get("knn_top1")))
  captions = {
      "curves_step.png": "Training curves by step.",
      "curves_time.png": (
          "Training curves by time" + (
              "" if report["time_axis"].startswith("wall") else
              " (metrics.jsonl has no clock: the time spent training, "
              "integrated from steps_per_sec; compilation and evaluation "
              "are left out)")
          + "."),
      "tsne.png": "t-SNE of the encoder's features h, coloured by label.",
      "neighbours.png": (
          "Eval queries (left) and their top-"
          f"{len(report['neighbours']['indices'][0])} "
          "training-split neighbours by cosine of h"
          + (" (eval split = training split: a query's own image is "
             "excluded)" if report["train_split"] == report["eval_split"]
             else "") + "."),
      "accuracy.png": "Linear probe top-1 against labels per class.",
      "augmentations.png": (
          "Source images and both views of the first examples of the "
          "batch input_pipeline.pretrain_batches yields for step "
          f"{(report['augmentations'] or {}).get('step')}."),
  }
  parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           f"<title>jaxclr report: {e(report['workdir'])}</title>",
           "<style>body{font-family:sans-serif;margin:2em}"
           "td{padding:2px 10px}</style></head><body>",
           "<h1>jaxclr report</h1><table>"]
  parts += [f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows]
  parts.append("</table>")
  for name, (w, h) in report["images"].items():
    parts.append(f"<h2>{e(captions.get(name, name))}</h2>"
                 f"<img src='{e(name)}' width='{w}' height='{h}' "
                 f"alt='{e(name)}'>")
  for name, why in report["skipped"].items():
    parts.append(f"<p>{e(name)} not drawn: {e(why)}.</p>")
  parts.append("</body></html>\n")
  return "\n".join(parts)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxclr import cli, report_compare  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  with cli.user_errors_exit():
    if f.compare:
      out = f.out or "compare_report"
      c = report_compare.write_comparison(f.compare, f.metric, out)
      print(f"Wrote {os.path.join(out, report_compare.FIGURE)} ({f.metric} "
            f"against {', '.join(c['fields'])})")
      return
    if not f.workdir:
      raise _err("pass --workdir DIR (a report of one run) or --compare "
                 "DIR1,DIR2,... (a metric across runs)")
    report = build_report(f.workdir, f.out, eval_workdir=f.eval_workdir,
                          random_eval_workdir=f.random_eval_workdir,
                          max_eval=f.max_eval, max_bank=f.max_bank,
                          aug_step=f.aug_step)
  out = f.out or os.path.join(f.workdir, "report")
  print(f"Wrote {os.path.join(out, INDEX)} ({len(report['images'])} figures, "
        f"{report['wall_s']:.1f} s)")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Pretraining workdir.")
  flags.DEFINE_string("eval_workdir", None,
                      "A finished jaxclr.linear_eval workdir of it.")
  flags.DEFINE_string("random_eval_workdir", None,
                      "A finished random-init jaxclr.linear_eval workdir.")
  flags.DEFINE_string("out", None, "Report directory (default DIR/report; "
                      "compare_report with --compare).")
  flags.DEFINE_integer("max_eval", 2000, "Eval examples embedded and shown.")
  flags.DEFINE_integer("max_bank", 10000, "Training examples in the bank.")
  flags.DEFINE_integer("aug_step", 0, "Pretraining step whose batch the "
                       "augmentation preview shows.")
  flags.DEFINE_list("compare", None, "Runs to compare (pretraining or "
                    "linear_eval workdirs): one figure of --metric against "
                    "the config fields in which they differ.")
  flags.DEFINE_string("metric", "knn_top1", "With --compare: top1, top5, "
                      "knn_top1, few_label_top1/K, final_loss, "
                      "final_contrast_acc, final_probe_acc.")
  app.run(main)
