"""`python -m jaxclr.report --compare RUN1,RUN2,... --metric M`: one figure of
a metric against the config field(s) in which the runs differ.

A run is a pretraining workdir (config.json + metrics.jsonl: the `final_*`
metrics, from the last training record) or a finished jaxclr.linear_eval
workdir (its results.json: `top1`, `knn_top1`, `few_label_top1/K`; the
config compared is that of the pretraining workdir it evaluated). The x axis
is the one field that differs (numeric values in order), or the field named
by --x_field when several differ together (e.g. batch_size, with the steps
that keep the epochs equal), or else one category per run labelled with all
of them. Few-label metrics are drawn with their std over the label draws.
"""

from __future__ import annotations

import json
import os

from jaxclr import config as config_lib, errors
from jaxclr.report import figures, page
from jaxclr.training import metrics, workdir as workdir_lib

FIGURE = "compare.png"
SUMMARY = "compare.json"
EVAL_METRICS = ("top1", "top5", "knn_top1")  # Plus few_label_top1/K.
TRAIN_METRICS = ("final_loss", "final_contrast_acc", "final_probe_acc")


def _err(message: str) -> errors.WorkdirError:
  return errors.WorkdirError(message)


def read_run(path: str) -> tuple[dict, dict]:
  """(the pretraining config, flattened; {metric: value}) of one run."""
  from jaxclr.jobs import (  # pylint: disable=g-import-not-at-top
      linear_eval as job)
  values = {}
  pretrain_dir = path
  if os.path.isfile(os.path.join(path, job.RESULTS_FILE)):
    results = job.read_results(path)
    pretrain_dir = results.get("pretrained_workdir")
    if not pretrain_dir or pretrain_dir == "none":
      raise _err(f"{path}: evaluates no pretraining workdir "
                 f"(pretrained_workdir={pretrain_dir!r}): nothing to compare")
    values.update({k: results[k] for k in EVAL_METRICS
                   if results.get(k) is not None})
    for k, v in (results.get("few_label_top1") or {}).items():
      values[f"few_label_top1/{k}"] = v
    for k, v in (results.get("few_label_top1_std") or {}).items():
      values[f"few_label_top1_std/{k}"] = v
  # The schema's defaults fill fields a run's config.json predates, so that
  # an older run does not differ in every field added since.
  from jaxclr.evaluation import (  # pylint: disable=g-import-not-at-top
      encoder as encoder_lib)
  raw = workdir_lib.config_to_dict(
      encoder_lib.pretraining_config(pretrain_dir))
  # Only the run's own method section says how it trained.
  for name in config_lib.method_section_names():
    if name != raw.get("method"):
      raw.pop(name, None)
  config = workdir_lib.flatten(raw)
  train = [r for r in metrics.read_records(pretrain_dir) if "loss" in r]
  if train:
    for k in TRAIN_METRICS:
      if k[len("final_"):] in train[-1]:
        values[k] = train[-1][k[len("final_"):]]
  return config, values


def differing_fields(configs: list[dict]) -> list[str]:
  """The flattened config keys whose values are not the same in every run
  (a key some run lacks counts as differing)."""
  keys = sorted(set().union(*configs))
  missing = object()
  return [k for k in keys
          if len({json.dumps(c.get(k, missing), sort_keys=True, default=str)
                  for c in configs}) > 1]


def comparison(paths: list[str], metric: str,
               x_field: str | None = None) -> dict:
  """{'fields', 'x' (per run), 'y', 'paths', 'metric'}, sorted by x when
  one numeric field differs (or x_field, one of those that differ, is
  numeric); WorkdirError naming a bad run, metric or x_field."""
  if len(paths) < 2:
    raise _err(f"--compare needs 2 or more runs, got {len(paths)}")
  runs = [read_run(p) for p in paths]
  fields = differing_fields([c for c, _ in runs])
  if not fields:
    raise _err(f"the runs {paths} have identical configs: nothing to "
               "compare against")
  for p, (_, values) in zip(paths, runs):
    if metric not in values:
      raise _err(f"--metric {metric!r} is not available for {p}; it has: "
                 f"{sorted(values)}")
  if x_field is not None and x_field not in fields:
    raise _err(f"--x_field {x_field!r} does not differ between the runs; "
               f"the fields that do: {fields}")
  ys = [values[metric] for _, values in runs]
  std_key = metric.replace("few_label_top1/", "few_label_top1_std/", 1)
  stds = ([values.get(std_key) for _, values in runs]
          if std_key != metric else [None] * len(runs))
  axis = x_field or (fields[0] if len(fields) == 1 else None)
  if axis:
    xs = [c.get(axis) for c, _ in runs]
  else:
    xs = [", ".join(f"{k}={c.get(k)}" for k in fields) for c, _ in runs]
  order = list(range(len(paths)))
  numeric = axis is not None and all(
      isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
  if numeric:
    order.sort(key=lambda i: xs[i])
  return {"metric": metric, "fields": fields, "x_field": axis,
          "numeric": numeric,
          "x": [xs[i] for i in order], "y": [ys[i] for i in order],
          "std": ([stds[i] for i in order]
                  if all(s is not None for s in stds) else None),
          "paths": [paths[i] for i in order]}


def write_comparison(paths: list[str], metric: str, out: str,
                     x_field: str | None = None) -> dict:
  """Writes out/compare.png and out/compare.json; returns the latter."""
  c = comparison(paths, metric, x_field)
  page.prepare_out(out)
  fig = figures.figure(640, 420)
  ax = fig.add_subplot(1, 1, 1)
  if c["numeric"]:
    ax.errorbar(c["x"], c["y"], yerr=c["std"], marker="o", capsize=3)
    ax.set_xlabel(c["x_field"])
    if c["x_field"] == "batch_size":
      ax.set_xscale("log", base=2)
      ax.set_xticks(c["x"], [str(x) for x in c["x"]])
  else:
    ax.errorbar(range(len(c["x"])), c["y"], yerr=c["std"], marker="o",
                linestyle="", capsize=3)
    ax.set_xticks(range(len(c["x"])))
    ax.set_xticklabels([str(x) for x in c["x"]], rotation=20, ha="right",
                       fontsize=7)
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} across {len(paths)} runs")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  written: dict = {}
  figures.save(fig, out, FIGURE, written)
  summary = {**c, "images": written}
  with open(os.path.join(out, SUMMARY), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  # Marks `out` as a report, so that a later report may replace it.
  with open(os.path.join(out, page.MARKER), "w") as f:
    json.dump({"format": page.FORMAT, "images": written,
               "files": [FIGURE, SUMMARY]}, f, indent=2)
  return summary
