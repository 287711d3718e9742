"""The report's figures: matplotlib on its own Agg canvases (no pyplot, so
no global figure state), each saved at a stated pixel size into `written`
({file name: [width, height]}), which report.json records."""

from __future__ import annotations

import os

import numpy as np

DPI = 100
# (metrics.jsonl key, axis title), in the order the panels are drawn.
CURVES = (("loss", "loss"), ("contrast_acc", "contrast_acc"),
          ("learning_rate", "learning rate"),
          ("eval/knn_top1", "kNN top-1 (periodic)"))



def figure(width_px: int, height_px: int):
  # A Figure with its own Agg canvas: no pyplot, so no global figure state.
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def save(fig, out: str, name: str, written: dict) -> None:
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
  fig = figure(360 * len(keys), 320)
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
  save(fig, out, name, written)


def plot_tsne(points: np.ndarray, labels: np.ndarray, title: str, out: str,
              written: dict) -> None:
  fig = figure(640, 600)
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
  save(fig, out, "tsne.png", written)


def plot_neighbours(query_images, query_labels, bank_images, bank_labels,
                    idx, sims, out: str, written: dict) -> None:
  """Rows: a query, then its neighbours (green title: same label)."""
  q, k = idx.shape
  fig = figure(110 * (k + 1), 120 * q)
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
  save(fig, out, "neighbours.png", written)


def plot_accuracy(lines: dict[str, tuple[list[str], list]], out: str,
                  written: dict) -> None:
  """lines: {legend: report_html.accuracy_vs_labels(results.json)}; x = labels
  per class, then 'all'."""
  fig = figure(560, 400)
  ax = fig.add_subplot(1, 1, 1)
  ticks: list[str] = []
  for name, (xs, ys) in lines.items():
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
  save(fig, out, "accuracy.png", written)


def plot_augmentations(p, out: str, written: dict) -> None:
  """Columns: source image, view 1, view 2; one row per example of `p`
  (a report.AugmentationPreview)."""
  n = len(p.example_ids)
  fig = figure(360, 120 * n)
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
  save(fig, out, "augmentations.png", written)
