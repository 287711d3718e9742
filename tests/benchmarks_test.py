"""benchmarks/step.py: FLOPs against an independent count, the JSON contract,
no host sync in the steady-state loop, and state donation.

One harness run on a tiny config (8 simulated devices) is shared
by every test in this module.
"""

import datetime
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import step as step_bench  # noqa: E402
from jaxclr import config as config_lib  # noqa: E402

RESNET18_BLOCKS, GROUP_STRIDES = (2, 2, 2, 2), (1, 2, 2, 2)


@pytest.fixture(scope="module")
def config():
  """A tiny CIFAR-stem ResNet-18 (width 1/8) at 16 px, B=16, with the probe."""
  c = config_lib.base_config()
  c.dataset = "synthetic"
  c.synthetic.num_examples, c.synthetic.num_classes = 64, 4
  c.image_size, c.batch_size, c.num_train_steps = 16, 16, 10
  c.model.update(depth=18, width_multiplier=0.125, num_proj_layers=2,
                 proj_out_dim=16)
  c.warmup_epochs = 0.0
  return c


@pytest.fixture(scope="module")
def result(config):
  return step_bench.measure_step(config, steps=3, warmup=1, peak_size=256,
                                 peak_repeats=2, loss_steps=3)


def valid_taps(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(output size, kernel taps landing inside the image summed over outputs)
  for jaxclr's fixed padding ((k-1)//2 low, the rest high)."""
  low = (kernel - 1) // 2
  out = (size + kernel - 1 - kernel) // stride + 1
  taps = sum(1 for o in range(out) for t in range(kernel)
             if 0 <= o * stride - low + t < size)
  return out, taps


def conv_layers_resnet18(image_size: int, width: float):
  """(kernel, stride, c_in, c_out, in_size) of every conv of a CIFAR-stem
  ResNet-18 v1.5, written from the architecture, not from the model code."""
  w = lambda c: max(1, int(round(c * width)))
  layers = [(3, 1, 3, w(64), image_size)]
  size, c_in = image_size, w(64)
  for g, (blocks, stride) in enumerate(zip(RESNET18_BLOCKS, GROUP_STRIDES)):
    c_out = w(64 * 2**g)
    for b in range(blocks):
      s = stride if b == 0 else 1
      layers.append((3, s, c_in, c_out, size))
      out = valid_taps(size, 3, s)[0]
      layers.append((3, 1, c_out, c_out, out))
      if b == 0:
        layers.append((1, s, c_in, c_out, size))  # projection shortcut
      size, c_in = out, c_out
  return layers


def analytic_forward_flops(config, params) -> float:
  """2 x multiply-adds per image (both views) of every conv (taps that fall
  in the zero padding excluded, as XLA counts) and every dense layer."""
  convs = conv_layers_resnet18(config.image_size,
                               config.model.width_multiplier)
  macs = 0
  for k, s, c_in, c_out, size in convs:
    _, taps = valid_taps(size, k, s)
    macs += taps * taps * c_in * c_out
  kernels = [x.shape for x in jax.tree.leaves(params)]
  assert sorted(sh for sh in kernels if len(sh) == 4) == sorted(
      (k, k, ci, co) for k, _, ci, co, _ in convs)  # The same network.
  macs += sum(sh[0] * sh[1] for sh in kernels if len(sh) == 2)
  return 2.0 * 2 * macs  # 2 FLOPs per MAC, 2 views per image.


@pytest.mark.slow
def test_forward_flops_match_an_independent_count(config, result):
  from jaxclr.models.simclr import build_model
  model = build_model(step_bench.benchmark_config(config),
                      config.synthetic.num_classes)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((2, config.image_size, config.image_size,
                                    3)), train=True))["params"]
  expected = analytic_forward_flops(config, params)
  measured = result["forward_flops_per_image"]
  # The HLO also counts BatchNorm, ReLU and residual adds: a few % on top.
  assert expected <= measured <= 1.08 * expected, (measured, expected)
  # A train step costs about 3 forward passes (forward + two backward).
  assert 2.5 <= result["flops_per_image"] / measured <= 4.0


@pytest.mark.slow
def test_json_has_every_field_and_they_agree(config, result):
  r = json.loads(json.dumps(result))  # Serialisable.
  for key in ("date", "machine", "config", "devices", "per_device_batch",
              "compile_s", "step_time", "pipelined_step_s", "images_per_s",
              "images_per_s_per_device", "flops_per_step", "flops_per_image",
              "forward_flops_per_image", "forward_time",
              "forward_fraction_time", "peak", "peak_flops_per_s_total",
              "achieved_flops_per_s", "mfu", "memory_per_device",
              "device_peak_bytes", "loss", "loss_fraction_time",
              "loss_fraction_flops", "all_gather_fraction_time", "donation",
              "host_sync_free"):
    assert key in r, key
  n, b = r["devices"], config.batch_size
  assert n == jax.device_count() == 8 and r["per_device_batch"] == b // n
  s = r["step_time"]
  assert s["n"] == 3 and s["min_s"] <= s["median_s"] <= s["max_s"]
  assert math.isclose(r["images_per_s"], b / s["median_s"])
  assert math.isclose(r["images_per_s_per_device"], r["images_per_s"] / n)
  assert math.isclose(r["flops_per_image"] * b, r["flops_per_step"])
  assert math.isclose(r["mfu"], r["flops_per_step"] / s["median_s"] /
                      r["peak_flops_per_s_total"])
  m = r["memory_per_device"]
  assert m["peak_bytes"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
  assert r["loss"]["all_gather"] is not None and 0 < r["loss_fraction_flops"] < 1
  row = step_bench.markdown_row(r, "python -m benchmarks.step ...")
  assert row.count("|") == step_bench.TABLE_HEADER.splitlines()[0].count("|")


def _utc_dates_now() -> set[str]:
  """Today's UTC date (and yesterday's in the first minutes after midnight,
  so a run that straddles it still passes)."""
  now = datetime.datetime.now(datetime.timezone.utc)
  dates = {now.date().isoformat()}
  if now.hour == 0 and now.minute < 30:
    dates.add((now - datetime.timedelta(days=1)).date().isoformat())
  return dates


@pytest.mark.slow
def test_json_and_markdown_record_the_actual_date_and_machine(result):
  """The date is taken when the benchmark runs (not a literal), and the
  machine is described: CPU model, cores, jax/jaxlib, device kind and count."""
  r = json.loads(json.dumps(result))
  assert r["date"] in _utc_dates_now(), r["date"]
  m = r["machine"]
  for key in ("cpu", "nproc", "platform", "device_kind", "num_devices", "jax",
              "jaxlib", "loadavg"):
    assert key in m, key
  assert m["cpu"] and m["nproc"] >= 1 and m["device_kind"]
  assert m["num_devices"] == jax.device_count() == r["devices"]
  assert m["jax"] == jax.__version__
  import jaxlib
  assert m["jaxlib"] == jaxlib.__version__
  row = step_bench.markdown_row(r, "python -m benchmarks.step ...")
  assert row.startswith(f"| {r['date']} | ")
  for text in (m["cpu"], f"{m['nproc']} cores", f"jax {m['jax']}",
               f"jaxlib {m['jaxlib']}", str(m["num_devices"])):
    assert text in row, (text, row)


def test_benchmarks_hold_no_literal_date():
  """step.py and scaling.py take their date from measure.run_record()."""
  from benchmarks import measure
  assert measure.run_record()["date"] in _utc_dates_now()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in ("step.py", "scaling.py"):
    with open(os.path.join(root, "benchmarks", name)) as f:
      source = f.read()
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", source), name
    assert "run_record()" in source, name


@pytest.mark.slow
def test_state_is_donated(result):
  # Every state buffer the step reads; the two scalars it only overwrites
  # are not step inputs.
  assert result["donation"]["not_donated"] == sorted(
      step_bench.UNREAD_STATE_LEAVES)
  assert result["donation"]["state_donated"]
  assert result["donation"]["unusable_donation_warnings"] == []


@pytest.mark.slow
def test_steady_state_loop_has_no_host_sync(result):
  # The harness times its loop under transfer_guard("disallow")...
  assert result["host_sync_free"]
  # ...and that guard does catch a hidden sync on this backend.
  x = jax.device_put(jnp.ones(()))
  with jax.transfer_guard("disallow"):
    with pytest.raises(Exception, match="[Dd]isallowed"):
      float(x + 1)


def test_markdown_appends_to_its_own_table_only(tmp_path):
  path = tmp_path / "RESULTS.md"
  path.write_text("# r\n\n## Input pipeline\n\n| a |\n|---|\n| 1 |\n")
  step_bench.append_markdown(str(path), "| row1 |\n")
  step_bench.append_markdown(str(path), "| row2 |\n")
  text = path.read_text()
  assert text.startswith("# r\n\n## Input pipeline\n\n| a |\n|---|\n| 1 |\n")
  assert text.count(step_bench.TABLE_TITLE) == 1
  assert text.endswith("| row1 |\n| row2 |\n")


@pytest.mark.slow
def test_prefetch_overlaps_input_with_compute():
  """loop.prefetch produces the next batches while the step runs: with a
  producer and a consumer that each take d per item (sleeps release the GIL,
  like XLA execution does), n items take ~(n+1)*d instead of the 2*n*d of
  the same loop without prefetch (measured alongside, as the machine is
  shared and sleeps overshoot under load)."""
  import time
  from jaxclr.training import loop
  n, d = 10, 0.1

  def produce():
    for i in range(n):
      time.sleep(d)  # Reading + augmenting a batch.
      yield i

  def consume(items):
    t0, got = time.perf_counter(), []
    for item in items:
      time.sleep(d)  # The train step.
      got.append(item)
    return time.perf_counter() - t0, got

  serial, got_serial = consume(produce())
  overlapped, got = consume(loop.prefetch(produce(), size=2))
  assert got == got_serial == list(range(n))
  assert serial >= 2 * n * d
  assert overlapped < 0.75 * serial, (overlapped, serial)


@pytest.mark.slow
def test_pretrain_loop_reads_the_device_only_at_log_steps(config, result,
                                                          tmp_path,
                                                          monkeypatch):
  """The real job loop (pretrain.run) between log/checkpoint steps: no
  implicit device-to-host transfer (transfer guard) and no explicit one
  (every jax.device_get is recorded with the step it follows). The step is
  the one `result` compiled (same config: the compilation cache serves it)."""
  import dataclasses
  from jaxclr.jobs import pretrain
  del result  # Only ordering: compile once, via the harness fixture.
  c = config.copy_and_resolve_references()
  c.log_every_steps, c.checkpoint_every_steps, c.num_train_steps = 4, 8, 8
  guard = "jax_transfer_guard_device_to_host"
  real_create, real_get = pretrain.create_trainer, jax.device_get
  done_steps, reads_after = [], []

  def create_trainer(*args, **kwargs):
    trainer = real_create(*args, **kwargs)

    def step_fn(state, batch):
      jax.config.update(guard, "allow")
      out = trainer.step_fn(state, batch)
      done_steps.append(len(done_steps) + 1)
      if done_steps[-1] % c.log_every_steps:  # Not a log step: no reads.
        jax.config.update(guard, "disallow")
      return out
    return dataclasses.replace(trainer, step_fn=step_fn)

  def device_get(x):
    reads_after.append(done_steps[-1] if done_steps else 0)
    return real_get(x)

  monkeypatch.setattr(pretrain, "create_trainer", create_trainer)
  monkeypatch.setattr(jax, "device_get", device_get)
  try:
    pretrain.run(c, str(tmp_path / "run"))
  finally:
    jax.config.update(guard, "allow")
  assert done_steps == list(range(1, 9))
  assert reads_after and set(reads_after) <= {0, 4, 8}, reads_after


@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_layers_counts_the_flops_of_the_layer_it_times(stride):
  """benchmarks/conv_layers.py: GFLOP/s divide the convolution's own
  multiply-adds (output pixels x Cin x 9 x Cout x 2, counted here from the
  shapes; twice that for both oneDNN gradients, timed together), and each
  timing is reported."""
  from benchmarks import conv_layers
  r = conv_layers.measure_layer(n=2, size=6, cin=4, cout=8, stride=stride,
                                calls=1)
  out_size = -(-6 // stride)
  assert r["gflop"] == pytest.approx(2 * 2 * out_size**2 * 8 * 4 * 9 / 1e9)
  assert r["layer"] == f"2x6x6x4->8/s{stride}"
  assert set(conv_layers.KINDS) <= set(r)
  for kind in conv_layers.KINDS:
    flop = r["gflop"] * (2 if kind == "grads_onednn" else 1)
    assert r[kind]["ms"] > 0
    assert r[kind]["gflop_per_s"] == pytest.approx(flop / r[kind]["ms"] * 1e3)
