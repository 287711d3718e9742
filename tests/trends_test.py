"""benchmarks/trends.py's sweep plan: each sweep changes one field, the
batch sweep holds the epochs fixed, and its digits count is the source's."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import trends  # noqa: E402
from jaxclr import config as config_lib  # noqa: E402
from jaxclr.data import input_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_num_train_is_the_default_configs_training_split():
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "default.py"))
  src = input_pipeline.open_source(config_lib.data_spec(c), "train")
  assert input_pipeline.dataset_info(src).num_train_examples == trends.NUM_TRAIN


def _fields(run):
  out = {"batch": run["batch"]}
  for o in run["overrides"]:
    key, value = re.fullmatch(r"--config\.(.+)=(.+)", o).groups()
    out[key] = value
  return out


def test_each_sweep_varies_one_field_at_equal_epochs():
  runs = trends.runs(epochs=20)
  for sweep, names in trends.SWEEPS.items():
    fields = [_fields(runs[n]) for n in names]
    varying = {k for k in fields[0] if len({f[k] for f in fields}) > 1}
    assert len(varying) == 1, (sweep, varying)
    (field,) = varying
    assert trends.X_FIELDS[sweep] == ("batch_size" if field == "batch"
                                      else field)
    assert len({f[next(iter(varying))] for f in fields}) == len(names)
  for run in runs.values():  # Same images seen, to within one batch.
    assert abs(run["steps"] * run["batch"] - 20 * trends.NUM_TRAIN) <= (
        run["batch"] / 2)
  assert [runs[n]["steps"] for n in trends.SWEEPS["batch_size"]] == [
      421, 210, 105, 53]
