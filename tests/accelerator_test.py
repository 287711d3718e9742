"""benchmarks/accelerator.py: its pure parts without a device (peaks, the
batch search against made-up memory curves, MFU, the record's files), and
the whole command at its tiny size on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import accelerator_record as rec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kind,name,tflops", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.5),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835),
    ("NVIDIA H200", "NVIDIA H200", 989.5),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100", 312),
    ("NVIDIA L4", "NVIDIA L4", 121),
    ("TPU v4", "TPU v4", 275),
    ("TPU v5 lite", "TPU v5e", 197),
    ("TPU v5e", "TPU v5e", 197),
    ("TPU v5", "TPU v5p", 459),
    ("TPU v5p", "TPU v5p", 459)])
def test_known_peaks(kind, name, tflops):
  assert rec.peak_bf16(kind) == (name, tflops * 1e12)


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "TPU v6 lite",
                                  "NVIDIA GeForce RTX 4090"])
def test_unknown_devices_have_no_peak(kind):
  assert rec.peak_bf16(kind) == (None, None)


def linear(fixed, per_image):
  calls = []

  def bytes_at(b):
    calls.append(b)
    return fixed + per_image * b
  return bytes_at, calls


def test_search_finds_the_largest_fitting_multiple_of_a_linear_curve():
  full, calls = linear(1000, 10)
  probe, probe_calls = linear(1000, 10)
  best, tries = rec.search_batch(full, 1000 + 10 * 203, start=16,
                                 multiple=8, max_batch=4096,
                                 probe_bytes=probe)
  assert best == 200  # 203 fits, the largest multiple of 8 below it.
  assert probe_calls == [16, 32] and calls == [200]
  assert [t[2] for t in tries] == ["probe", "probe", "full"]


def test_search_shrinks_until_the_full_compile_fits():
  """The probes underestimate (the full compile needs more per image): the
  guess shrinks by the overshoot until it fits, and only a full compile's
  fit is returned."""
  full, calls = linear(1000, 14)
  probe, _ = linear(1000, 10)
  limit = 1000 + 10 * 400
  best, _ = rec.search_batch(full, limit, start=16, multiple=16,
                             max_batch=4096, probe_bytes=probe)
  assert best is not None and full(best) <= limit
  assert full(best + 16) > limit  # Not far below: the next one fails.
  assert all(c % 16 == 0 for c in calls)


def test_search_halves_a_start_that_does_not_fit_and_respects_the_cap():
  full, calls = linear(0, 100)
  best, _ = rec.search_batch(full, 100 * 20, start=64, multiple=4,
                             max_batch=1000)
  assert best == 20 and calls[:3] == [64, 32, 16]
  capped, _ = rec.search_batch(linear(0, 1)[0], 1e9, start=8, multiple=8,
                               max_batch=48)
  assert capped == 48


def test_search_returns_none_when_nothing_fits():
  full, _ = linear(10 ** 6, 1)
  assert rec.search_batch(full, 100, start=16, multiple=8,
                          max_batch=64)[0] is None


def test_mfu():
  assert rec.mfu(2e12, 0.5, 2, 4e12) == pytest.approx(0.5)
  assert rec.mfu(2e12, 0.5, 2, None) is None


def test_budget_skips_what_would_overrun():
  now = [0.0]
  budget = rec.Budget(100, clock=lambda: now[0])
  assert budget.allows(100)
  now[0] = 70
  assert budget.left() == 30 and budget.allows(30) and not budget.allows(31)


def record(kind="NVIDIA H100 80GB HBM3", skipped_remat=False):
  name, peak = rec.peak_bf16(kind)
  step = {"remat": False, "per_device_batch": 256,
          "images_per_s": 3000.0, "step_time": {"median_s": 0.0853},
          "mfu": 0.41 if peak else None, "mfu_vs_matmul": 0.55,
          "memory_per_device": {"peak_bytes": 61 * rec.GIB},
          "allocator_peak_bytes": 66 * rec.GIB, "compile_s": 41.0}
  steps = [step, {"remat": True, "skipped": "time budget"} if skipped_remat
           else {**step, "remat": True, "per_device_batch": 512}]
  return {"date": "2026-12-07", "command": "python -m benchmarks.accelerator",
          "size": "full", "model": "R-50 224 px", "dtype": "bfloat16",
          "budget_s": 420.0, "elapsed_s": 300.0,
          "device": {"platform": "gpu", "device_kind": kind,
                     "num_devices": 1, "peak_name": name,
                     "peak_bf16_flops": peak, "limit_bytes": 75 * rec.GIB},
          "steps": steps,
          "loss": {"loss_fraction": 0.004, "all_gather_fraction": 0.0,
                   "gather_f32_s": None, "gather_bf16_s": None},
          "colour_blur": {"images_per_s": 9000.0, "image_size": 224},
          "skipped": {"layout": "one device"}}


def test_markdown_names_device_batch_dtype_speed_mfu_and_memory(tmp_path):
  json_path, md_path = rec.write(record(), str(tmp_path))
  text = open(md_path).read()
  row = next(line for line in text.splitlines()
             if line.startswith("| NVIDIA H100 80GB HBM3"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:6] == ["NVIDIA H100 80GB HBM3", "1", "R-50 224 px",
                       "bfloat16", "off", "256"]
  assert cells[6:10] == ["3000.0", "3000.0", "85.3", "41.0 %"]
  assert cells[11:13] == ["61.00", "66.00"]
  assert "989.5 TFLOP/s bf16 per device" in text
  assert "Skipped layout: one device" in text
  assert json.load(open(json_path))["steps"][1]["per_device_batch"] == 512


def test_markdown_of_an_unknown_device_and_a_skipped_step():
  text = rec.markdown(record(kind="NVIDIA L40S", skipped_remat=True))
  assert "unknown device kind 'NVIDIA L40S'" in text
  assert "| on | skipped: time budget |" in text
  row = next(line for line in text.splitlines()
             if line.startswith("| NVIDIA L40S") and "| off |" in line)
  # No peak, no MFU (not a guess); the measured matmul's stands beside it.
  assert [c.strip() for c in row.strip("|").split("|")][9:11] == [
      "n/a", "55.0 %"]


@pytest.mark.slow
def test_command_runs_on_the_cpu_and_writes_its_record(tmp_path):
  """The whole command at its tiny size on 2 simulated CPU devices (the
  1-vs-N layout check included): a record with a searched batch that fits
  the limit, measured speed and memory, and the Markdown table."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, "-m", "benchmarks.accelerator",
                  f"--out_dir={tmp_path}", "--budget_s=900", "--steps=2"],
                 check=True, cwd=ROOT, env=env, timeout=1500)
  r = json.load(open(tmp_path / "accelerator.json"))
  assert r["size"] == "tiny" and r["dtype"] == "bfloat16"
  assert r["device"]["num_devices"] == 2 and r["device"]["peak_name"] is None
  limit = r["device"]["search_limit_bytes"]
  for step in r["steps"]:
    assert "skipped" not in step, step
    assert step["memory_per_device"]["peak_bytes"] <= limit
    assert step["images_per_s"] > 0 and step["mfu"] is None
    assert 0 < step["mfu_vs_matmul"]
    fits = [t for t in step["search"] if t["compile"] == "full"
            and t["bytes"] <= limit]
    assert fits[-1]["per_device_batch"] == step["per_device_batch"]
  assert r["steps"][1]["remat"] and r["loss"]["loss_fraction"] > 0
  assert r["loss"]["gather_f32_s"] > 0 and r["colour_blur"]["images_per_s"] > 0
  assert r["layout"]["bfloat16"]["max_loss_spread"] < 5e-3
  text = open(tmp_path / "accelerator.md").read()
  assert "unknown device kind 'cpu'" in text and "| cpu | 2 |" in text
