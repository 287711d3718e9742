"""Metric output: clu writers (TensorBoard + console) and metrics.jsonl.

Only process 0 writes. Values arrive here already on the host: the trainer
fetches device metrics once per log interval, never per step.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import numpy as np
from absl import logging
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_records(workdir: str) -> list[dict]:
  """The records of DIR/metrics.jsonl; a partly written last line is skipped,
  so a run can be read while it is still writing."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip().endswith("}")]


def _step_of(line: str) -> int | None:
  """A record's step; None for a line cut short (a kill or a full disk
  while it was written)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return None


def truncate_jsonl(path: str, last_step: int):
  """Drops records past `last_step` (written by a run that was then resumed
  from an earlier checkpoint, so they describe updates that were redone),
  and any line that is not a whole record."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  steps = [(l, _step_of(l)) for l in lines]
  kept = [l for l, step in steps
          if l.endswith("\n") and step is not None and step <= last_step]
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)


# The console line's metrics, those a job logs: (key, label, format).
_CONSOLE = (("loss", "loss", ".4f"), ("contrast_acc", "contrast_acc", ".3f"),
            ("train_acc", "train_acc", ".3f"), ("learning_rate", "lr", ".4g"))


class MetricsLogger:
  """Writes scalars to TensorBoard, metrics.jsonl and a console progress line."""

  def __init__(self, workdir: str, *, is_primary: bool, total_steps: int,
               batch_size: int, start_step: int = 0):
    self.is_primary = is_primary
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_primary, asynchronous=True)
    self.jsonl_path = os.path.join(workdir, METRICS_FILE)
    if is_primary:
      truncate_jsonl(self.jsonl_path, start_step)
    self._last_time = time.time()
    self._last_step = start_step

  def log_train(self, step: int, scalars: Mapping[str, float]) -> dict:
    """Logs one record; adds steps/s, images/s and the ETA from wall time."""
    now = time.time()
    elapsed = max(now - self._last_time, 1e-9)
    steps_done = max(step - self._last_step, 1)
    steps_per_sec = steps_done / elapsed
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()},
              "steps_per_sec": steps_per_sec,
              "images_per_sec": steps_per_sec * self.batch_size}
    self._last_time, self._last_step = now, step
    if self.is_primary:
      self.writer.write_scalars(step, {f"train/{k}": v for k, v in record.items()
                                       if k != "step"})
      with open(self.jsonl_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      eta = (self.total_steps - step) / steps_per_sec
      shown = [f"{name} {record[key]:{fmt}}" for key, name, fmt in _CONSOLE
               if key in record]
      logging.info("step %d/%d | %s | %.2f steps/s | %.0f img/s | ETA %s",
                   step, self.total_steps, " | ".join(shown), steps_per_sec,
                   record["images_per_sec"], _format_eta(eta))
    return record

  def log_scalars(self, step: int, scalars: Mapping[str, float]):
    if self.is_primary:
      self.writer.write_scalars(step, dict(scalars))
      with open(self.jsonl_path, "a") as f:
        f.write(json.dumps({"step": int(step),
                            **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """TensorBoard image summaries (not in metrics.jsonl: not scalars)."""
    if self.is_primary:
      self.writer.write_images(step, dict(images))

  def reset_timer(self, step: int):
    """Excludes compilation or evaluation time from the next throughput."""
    self._last_time, self._last_step = time.time(), step

  def close(self):
    self.writer.flush()
    self.writer.close()
