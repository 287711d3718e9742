"""The pure parts of benchmarks/accelerator.py: the devices' bfloat16
peaks, the batch search, MFU, the time budget and the record's Markdown
(tested without a device in tests/accelerator_test.py)."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

GIB = 1024 ** 3

# Dense bfloat16 peak per device (no structured sparsity), from the vendors'
# datasheets: NVIDIA H100 (SXM 989.5 / NVL 835 / PCIe 756 TFLOP/s; the
# datasheet's 1,979 / 1,671 / 1,513 are with sparsity), H200 (989.5), A100
# (312), L4 (121; 242 with sparsity); Google Cloud TPU system architecture
# pages: v4 275, v5e 197, v5p 459 TFLOP/s per chip. First match wins:
# device_kind as jax reports it, e.g. 'NVIDIA H100 80GB HBM3', 'TPU v5 lite'.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", "NVIDIA H100 PCIe", 756e12),
    (r"H100.*NVL", "NVIDIA H100 NVL", 835e12),
    (r"H100", "NVIDIA H100 SXM", 989.5e12),
    (r"H200", "NVIDIA H200", 989.5e12),
    (r"A100", "NVIDIA A100", 312e12),
    (r"\bL4\b", "NVIDIA L4", 121e12),
    (r"TPU v4", "TPU v4", 275e12),
    (r"TPU v5 ?(lite|e)", "TPU v5e", 197e12),
    (r"TPU v5p|TPU v5$", "TPU v5p", 459e12),
)

# Fraction of the allocator's limit a step may plan for: the rest is left
# for the allocator's fragmentation and the next batch's transfer.
FIT_FRACTION = 0.95
MEM_FRACTION = "0.92"
# The tiny run's made-up per-device memory limit (its step needs ~10 MiB
# per image at 32 px; the search lands in the tens of images).
TINY_LIMIT_BYTES = 384 * 2 ** 20


def peak_bf16(device_kind: str) -> tuple[str | None, float | None]:
  """(name, dense bfloat16 FLOP/s per device) of a known device kind, else
  (None, None)."""
  for pattern, name, flops in PEAK_BF16_FLOPS:
    if re.search(pattern, device_kind):
      return name, flops
  return None, None


def round_down(x: float, multiple: int) -> int:
  return int(x // multiple) * multiple


def search_batch(peak_bytes: Callable[[int], int], limit_bytes: float, *,
                 start: int, multiple: int, max_batch: int,
                 probe_bytes: Callable[[int], int] | None = None,
                 max_tries: int = 4):
  """The largest per-device batch (a multiple of `multiple`, at most
  max_batch) whose step's bytes fit limit_bytes, in few compiles.

  probe_bytes(b) (default peak_bytes) gives the bytes at the two probes,
  `start` and 2 x start (halved first while start does not fit); a line
  through them predicts the largest batch, which peak_bytes (the full
  compile) checks; while it does not fit, the prediction shrinks by the
  overshoot. A batch is returned only once peak_bytes said it fits, and
  the probes' fits count as such only when probe_bytes is peak_bytes.

  Returns (batch or None, tries: [(batch, bytes, 'probe' | 'full')]).
  """
  tries: list[tuple[int, int, str]] = []
  probe_bytes = probe_bytes or peak_bytes
  same = probe_bytes is peak_bytes

  def measure(fn, b, kind):
    value = int(fn(b))
    tries.append((b, value, kind))
    return value

  b0 = max(multiple, round_down(min(start, max_batch), multiple))
  m0 = measure(probe_bytes, b0, "probe")
  while m0 > limit_bytes:
    if b0 // 2 < multiple:
      return None, tries
    b0 = round_down(b0 // 2, multiple)
    m0 = measure(probe_bytes, b0, "probe")
  best = b0 if same else None
  b1 = min(round_down(2 * b0, multiple), max_batch)
  if b1 <= b0:
    guess = b0
  else:
    m1 = measure(probe_bytes, b1, "probe")
    if same and m1 <= limit_bytes:
      best = b1
    per_image = (m1 - m0) / (b1 - b0)
    guess = max_batch if per_image <= 0 else b0 + (limit_bytes - m0) / (
        per_image)
    guess = max(multiple, min(max_batch, round_down(guess, multiple)))
  for _ in range(max_tries):
    if best is not None and guess <= best:
      break
    m = measure(peak_bytes, guess, "full")
    if m <= limit_bytes:
      best = guess
      break
    smaller = round_down(guess * limit_bytes / m, multiple)
    guess = min(smaller, guess - multiple)
    if guess < multiple:
      break
  return best, tries


def mfu(step_flops: float, step_s: float, num_devices: int,
        peak_flops_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: the step's FLOPs per second over the devices'
  peak (None when the peak is unknown)."""
  if not peak_flops_per_device or step_s <= 0:
    return None
  return step_flops / step_s / (num_devices * peak_flops_per_device)


class Budget:
  """Wall-clock budget of the run: parts that would overrun it are skipped."""

  def __init__(self, seconds: float, clock=time.monotonic):
    self.seconds, self.clock, self.start = seconds, clock, clock()

  def left(self) -> float:
    return self.seconds - (self.clock() - self.start)

  def allows(self, estimate_s: float) -> bool:
    return self.left() >= estimate_s


def _gib(x):
  return "n/a" if x is None else f"{x / GIB:.2f}"


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f} %"


def markdown(record: dict) -> str:
  """The record as a Markdown section: the step table, then one line per
  other measurement and the skipped parts."""
  d = record["device"]
  peak = (f"{d['peak_name']}, {d['peak_bf16_flops'] / 1e12:.1f} TFLOP/s "
          "bf16 per device" if d["peak_bf16_flops"] else
          f"unknown device kind {d['device_kind']!r}: no bfloat16 peak "
          "known, MFU against the measured matmul only")
  lines = [
      f"## Accelerator check ({record['date']}, {record['size']} size)\n\n",
      f"Device: {d['device_kind']} x{d['num_devices']} ({d['platform']}); "
      f"peak: {peak}; allocator limit {_gib(d['limit_bytes'])} GiB per "
      f"device. Command: `{record['command']}`.\n\n",
      "| device | devices | model | dtype | remat | batch/device (searched) "
      "| img/s | img/s/device | step ms | MFU | MFU vs matmul | compiled "
      "peak GiB/device | allocator peak GiB | compile s |\n",
      "|---" * 14 + "|\n"]
  for s in record["steps"]:
    if s.get("skipped"):
      lines.append(f"| {d['device_kind']} | {d['num_devices']} | "
                   f"{record['model']} | {record['dtype']} | "
                   f"{'on' if s['remat'] else 'off'} | skipped: "
                   f"{s['skipped']} |" + " |" * 8 + "\n")
      continue
    lines.append(
        f"| {d['device_kind']} | {d['num_devices']} | {record['model']} | "
        f"{record['dtype']} | {'on' if s['remat'] else 'off'} | "
        f"{s['per_device_batch']} | {s['images_per_s']:.1f} | "
        f"{s['images_per_s'] / d['num_devices']:.1f} | "
        f"{1e3 * s['step_time']['median_s']:.1f} | {_pct(s['mfu'])} | "
        f"{_pct(s['mfu_vs_matmul'])} | "
        f"{_gib(s['memory_per_device']['peak_bytes'])} | "
        f"{_gib(s['allocator_peak_bytes'])} | {s['compile_s']:.0f} |\n")
  lines.append("\n")
  loss = record.get("loss")
  if loss:
    lines.append(
        f"NT-Xent (value + gradient) {_pct(loss['loss_fraction'])} of the "
        f"step, its all-gather {_pct(loss['all_gather_fraction'])}; "
        f"all-gather of the embeddings float32 "
        f"{_ms(loss['gather_f32_s'])} vs bfloat16 "
        f"{_ms(loss['gather_bf16_s'])}.\n\n")
  kgrad = record.get("kernel_grad")
  if kgrad:
    lines.append(f"Kernel gradient of one {kgrad['layer']} convolution "
                 f"({kgrad['views']} views): float32 out (the policy) "
                 f"{_ms(kgrad['float32_s'])} vs bfloat16 out "
                 f"{_ms(kgrad['bfloat16_s'])}.\n\n")
  excess = record.get("excess_precision")
  if excess:
    lines.append(f"Step with XLA's default excess precision (bfloat16 "
                 f"roundings may be skipped): "
                 f"{_ms(excess['excess_precision_step_s'])} vs the policy's "
                 f"{_ms(excess['policy_step_s'])} (remat "
                 f"{'on' if excess['remat'] else 'off'}, "
                 f"{excess['per_device_batch']} per device).\n\n")
  colour = record.get("colour_blur")
  if colour:
    lines.append(f"On-device colour + blur: {colour['images_per_s']:.0f} "
                 f"images/s (two views each, {colour['image_size']} px, "
                 "one device).\n\n")
  layout = record.get("layout")
  if layout:
    spread = layout["bfloat16"]["max_loss_spread"]
    lines.append(f"bfloat16 1 vs {d['num_devices']} devices "
                 f"(configs/imagenet.py:tiny, 3 steps): largest loss spread "
                 f"{100 * spread:.3g} %, parameters after one step "
                 + ", ".join(f"{n}: {r['params_rel_after_first']:.2g}"
                             for n, r in layout["bfloat16"]["rows"].items())
                 + " (relative to 1 device).\n\n")
  for part, why in record.get("skipped", {}).items():
    lines.append(f"Skipped {part}: {why}.\n\n")
  lines.append(f"Wall time of the measured parts: {record['elapsed_s']:.0f} s "
               f"of a {record['budget_s']:.0f} s budget.\n")
  return "".join(lines)


def _ms(seconds):
  return "n/a" if seconds is None else f"{1e3 * seconds:.3f} ms"


def write(record: dict, out_dir: str) -> tuple[str, str]:
  """DIR/accelerator.json and DIR/accelerator.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "accelerator.json")
  md_path = os.path.join(out_dir, "accelerator.md")
  with open(json_path, "w") as f:
    json.dump(record, f, indent=1, default=str)
  with open(md_path, "w") as f:
    f.write(markdown(record))
  return json_path, md_path
