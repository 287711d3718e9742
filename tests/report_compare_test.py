"""jaxclr.report --compare: the differing config field, the metric of each
run read from its own files, the order, the figure and the errors. The runs
are workdirs laid out as jaxclr writes them (config.json through
workdir.prepare, checkpoints/<step>/, metrics.jsonl, results.json), with no
training: what is under test is the reading and comparing."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxclr import config as config_lib, errors
from jaxclr.report import compare as report_compare
from jaxclr.training import workdir as workdir_lib


def fake_run(root, name, *, loss, few1, few1_std=None, **fields):
  pre = os.path.join(root, name)
  c = config_lib.pretrain_config()
  c.dataset = "digits"
  for k, v in fields.items():  # simclr__temperature: c.simclr.temperature.
    *parents, leaf = k.split("__")
    node = c
    for parent in parents:
      node = node[parent]
    node[leaf] = v
  workdir_lib.prepare(pre, c, is_primary=True)
  os.makedirs(os.path.join(pre, workdir_lib.CHECKPOINT_DIR, "10"))
  with open(os.path.join(pre, "metrics.jsonl"), "w") as f:
    for step, l in ((5, loss + 1.0), (10, loss)):
      f.write(json.dumps({"step": step, "loss": l, "contrast_acc": 0.1}) + "\n")
    f.write(json.dumps({"step": 10, "eval/knn_top1": 0.3}) + "\n")
  ev = os.path.join(root, name + "_eval")
  os.makedirs(ev)
  with open(os.path.join(ev, "results.json"), "w") as f:
    json.dump({"pretrained_workdir": pre, "top1": 0.9, "knn_top1": few1 + 0.1,
               "few_label_top1": {"1": few1, "5": few1 + 0.05},
               **({"few_label_top1_std": {"1": few1_std, "5": few1_std}}
                  if few1_std is not None else {})}, f)
  return pre, ev


def test_one_differing_field_sorted_numerically(tmp_path):
  runs = {t: fake_run(str(tmp_path), f"t{t}", loss=10 - t, few1=0.5 + t / 10,
                      simclr__temperature=t) for t in (1.0, 0.1, 0.5)}
  evals = [runs[t][1] for t in (1.0, 0.1, 0.5)]
  c = report_compare.comparison(evals, "few_label_top1/1")
  assert c["fields"] == ["simclr.temperature"] and c["numeric"]
  assert c["x"] == [0.1, 0.5, 1.0]
  np.testing.assert_allclose(c["y"], [0.51, 0.55, 0.6])
  assert c["paths"] == [runs[t][1] for t in (0.1, 0.5, 1.0)]
  # A pretraining workdir gives the last training record's values.
  c = report_compare.comparison([runs[t][0] for t in (1.0, 0.1)],
                                "final_loss")
  assert c["x"] == [0.1, 1.0] and c["y"] == [9.9, 9.0]

  out = str(tmp_path / "cmp")
  summary = report_compare.write_comparison(evals, "knn_top1", out)
  w, h = summary["images"][report_compare.FIGURE]
  with Image.open(os.path.join(out, report_compare.FIGURE)) as im:
    assert im.format == "PNG" and im.size == (w, h)
  report_compare.write_comparison(evals, "top1", out)  # Replaces its own.


def test_several_fields_are_one_category_each(tmp_path):
  a = fake_run(str(tmp_path), "a", loss=5, few1=0.6, supcon__temperature=0.5,
               method="supcon")[1]
  b = fake_run(str(tmp_path), "b", loss=6, few1=0.5, batch_size=512)[1]
  c = report_compare.comparison([a, b], "few_label_top1/5")
  # Each run's own method section only: supcon.* against simclr.*.
  assert c["fields"][:2] == ["batch_size", "method"]
  assert "supcon.temperature" in c["fields"]
  assert "simclr.temperature" in c["fields"]
  assert not c["numeric"]
  assert c["x"][0].startswith("batch_size=4096, method=supcon")
  np.testing.assert_allclose(c["y"], [0.65, 0.55])


def test_x_field_picks_the_axis_when_fields_differ_together(tmp_path):
  """The batch sweep at equal epochs changes batch_size and the steps: with
  x_field='batch_size' it is one numeric axis, with the draws' std."""
  runs = [fake_run(str(tmp_path), f"b{b}", loss=5, few1=0.4 + b / 1000,
                   few1_std=b / 10000, batch_size=b, num_train_steps=S)[1]
          for b, S in ((512, 53), (64, 421), (256, 105))]
  c = report_compare.comparison(runs, "few_label_top1/1", "batch_size")
  assert c["fields"] == ["batch_size", "num_train_steps"]
  assert c["numeric"] and c["x"] == [64, 256, 512]
  np.testing.assert_allclose(c["y"], [0.464, 0.656, 0.912])
  np.testing.assert_allclose(c["std"], [0.0064, 0.0256, 0.0512])
  assert report_compare.comparison(runs, "top1", "batch_size")["std"] is None
  with pytest.raises(errors.WorkdirError,
                     match=r"--x_field 'simclr.temperature' does not differ.*"
                     r"\['batch_size', 'num_train_steps'\]"):
    report_compare.comparison(runs, "top1", "simclr.temperature")
  out = str(tmp_path / "cmp")
  report_compare.write_comparison(runs, "few_label_top1/1", out, "batch_size")
  with Image.open(os.path.join(out, report_compare.FIGURE)) as im:
    assert im.format == "PNG"


def test_user_errors(tmp_path):
  a = fake_run(str(tmp_path), "a", loss=5, few1=0.6)[1]
  b = fake_run(str(tmp_path), "b", loss=5, few1=0.6)[1]
  c = fake_run(str(tmp_path), "c", loss=5, few1=0.6,
               simclr__temperature=0.2)[1]
  with pytest.raises(errors.WorkdirError, match="needs 2 or more runs"):
    report_compare.comparison([a], "top1")
  with pytest.raises(errors.WorkdirError, match="identical configs"):
    report_compare.comparison([a, b], "top1")
  with pytest.raises(errors.WorkdirError,
                     match=r"--metric 'few_label_top1/10' is not available"):
    report_compare.comparison([a, c], "few_label_top1/10")
  with pytest.raises(errors.WorkdirError, match="does not exist"):
    report_compare.comparison([a, str(tmp_path / "nope")], "top1")
  other = tmp_path / "not_a_report"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(errors.WorkdirError, match="is not a jaxclr report"):
    report_compare.write_comparison([a, c], "top1", str(other))
  assert (other / "keep.txt").read_text() == "mine"
