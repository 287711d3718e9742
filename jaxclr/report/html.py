"""The report's index.html: the run's facts, then every figure by relative
path, so that the directory can be copied anywhere and opened with no
network."""

from __future__ import annotations

import html


def accuracy_vs_labels(results: dict) -> tuple[list[str], list[float | None]]:
  """(x labels, top-1) from a linear_eval results.json: each few-label probe
  (labels per class, ascending), then 'all' (the full-label probe)."""
  few = results.get("few_label_top1") or {}
  keys = sorted(few, key=int)
  return keys + ["all"], [few[k] for k in keys] + [results.get("top1")]


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
