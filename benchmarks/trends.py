"""The SimCLR paper's trends at the digits scale: temperature, batch size at
equal epochs, colour-distortion strength.

  python benchmarks/trends.py --out runs/trends [--epochs 20]

Every run is `configs/default.py` (SimCLR, NT-Xent, R-18 x 0.25 at 16 px,
LARS lr 0.5 x B/256) for --epochs epochs of the 1,347 training digits, one
field changed:
  temperature  0.1, 0.2, 0.5, 1.0      (B=256, colour 0.5)
  batch_size   64, 128, 256, 512       (tau 0.5, colour 0.5; steps scaled
                                        so every run sees the same epochs)
  colour       0, 0.5, 1.0             (B=256, tau 0.5)
(the B=256, tau 0.5, colour 0.5 run is shared by all three). Each run is
pretrained with `python -m jaxclr.main`, evaluated with
`python -m jaxclr.linear_eval` (fast protocol: linear, 1 / 5 / 10 labels per
class, kNN), and each sweep drawn with `python -m jaxclr.report --compare`
into OUT/figures/<sweep>_<metric>/compare.png. The commands are printed as
they run; a run whose results.json exists is not run again (rerunning the
script resumes the sweep). OUT/trends.json collects every run's numbers and
wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

NUM_TRAIN = 1347  # configs/default.py's digits training split.
METRICS = ("top1", "few_label_top1/1", "knn_top1")


def runs(epochs: float) -> dict[str, dict]:
  """{name: {"batch": B, "steps": S, "overrides": [...]}}, one per config."""
  def run(batch=256, temperature=0.5, colour=0.5):
    return {"batch": batch, "steps": max(1, round(epochs * NUM_TRAIN / batch)),
            "overrides": [f"--config.simclr.temperature={temperature}",
                          f"--config.augment.color_jitter_strength={colour}"]}
  out = {f"tau{t}": run(temperature=t) for t in (0.1, 0.2, 0.5, 1.0)}
  out.update({f"batch{b}": run(batch=b) for b in (64, 128, 512)})
  out.update({f"colour{s}": run(colour=s) for s in (0.0, 1.0)})
  return out


SWEEPS = {
    "temperature": ["tau0.1", "tau0.2", "tau0.5", "tau1.0"],
    "batch_size": ["batch64", "batch128", "tau0.5", "batch512"],
    "colour": ["colour0.0", "tau0.5", "colour1.0"],
}
# The x axis of each sweep's figure (the batch sweep also changes the steps).
X_FIELDS = {"temperature": "simclr.temperature", "batch_size": "batch_size",
            "colour": "augment.color_jitter_strength"}


def sh(cmd: list[str]) -> float:
  print("+", " ".join(cmd), flush=True)
  t0 = time.time()
  subprocess.run(cmd, check=True)
  return time.time() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--epochs", type=float, default=20.0)
  args = parser.parse_args()
  from jaxclr.jobs import (  # pylint: disable=g-import-not-at-top
      linear_eval as job)
  py = sys.executable
  summary_path = os.path.join(args.out, "trends.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  for name, r in runs(args.epochs).items():
    pre = os.path.join(args.out, name)
    ev = pre + "_eval"
    results_file = os.path.join(ev, job.RESULTS_FILE)
    if os.path.exists(results_file):
      continue
    entry = {"batch": r["batch"], "steps": r["steps"],
             "overrides": r["overrides"]}
    entry["pretrain_s"] = sh(
        [py, "-m", "jaxclr.main", "--config",
         f"configs/default.py:steps={r['steps']},batch={r['batch']}",
         "--workdir", pre] + r["overrides"])
    entry["eval_s"] = sh(
        [py, "-m", "jaxclr.linear_eval", "--config", "configs/linear_eval.py",
         f"--config.pretrained_workdir={pre}", "--workdir", ev])
    results = job.read_results(ev)
    entry["results"] = {
        "top1": results["top1"], "knn_top1": results["knn_top1"],
        **{f"few_label_top1/{k}": v
           for k, v in results["few_label_top1"].items()},
        **{f"few_label_top1_std/{k}": v
           for k, v in results["few_label_top1_std"].items()}}
    summary[name] = {**entry, "results_file": results_file}
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=2)
  for sweep, names in SWEEPS.items():
    dirs = ",".join(os.path.join(args.out, n + "_eval") for n in names)
    for metric in METRICS:
      figure = os.path.join(args.out, "figures",
                            f"{sweep}_{metric.replace('/', '')}")
      sh([py, "-m", "jaxclr.report", "--compare", dirs, "--metric", metric,
          "--x_field", X_FIELDS[sweep], "--out", figure])


if __name__ == "__main__":
  main()
