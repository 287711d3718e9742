"""Bad configurations fail in one line naming the value, before any data is
read or anything is compiled; through the CLI with exit status 2."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxclr import cli, config as config_lib
from jaxclr.config import legacy
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  c = config_lib.base_config()
  c.dataset = "synthetic"
  c.synthetic.num_examples = 64
  c.image_size = 8
  c.batch_size = 16
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.num_train_steps = 4
  c.warmup_epochs = 0.0
  return c


def _set(path, value):
  def apply(c):
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return apply


def _many(**fields):
  def apply(c):
    for k, v in fields.items():
      _set(k.replace("__", "."), v)(c)
  return apply


def _unknown_field(c):
  c.unlock()
  c.eval_evry_steps = 10


# (id, mutation, substrings the one-line message must contain)
BAD_CONFIGS = [
    ("dataset", _set("dataset", "imagenet"),
     ["dataset='imagenet' is unknown", "imagenet2012", "folder:",
      "'tfds:NAME' for any other TFDS dataset"]),
    ("dataset_prefix", _set("dataset", "folder:"),
     ["dataset='folder:' needs a path"]),
    ("tfds_prefix", _set("dataset", "tfds:"),
     ["dataset='tfds:' needs a name"]),
    ("tfds_no_data_dir", _set("dataset", "cifar10"),
     ["dataset='cifar10'", "data_dir is not set", "--config.data_dir"]),
    ("tfds_missing_data_dir", _many(dataset="cifar10", data_dir="/no/such/dir"),
     ["data_dir='/no/such/dir'", "does not exist"]),
    ("holdout_range", _many(dataset="npz:/d.npz", holdout_fraction=1.0),
     ["holdout_fraction=1.0 must be in [0, 1)"]),
    ("holdout_dataset", _set("holdout_fraction", 0.1),
     ["holdout_fraction=0.1 applies to folder:/npz: data only",
      "dataset='synthetic'"]),
    ("depth", _set("model.depth", 19),
     ["model.depth=19 is unknown", "(18, 34, 50, 101, 152, 200)"]),
    ("width", _set("model.width_multiplier", 0.0),
     ["model.width_multiplier=0.0 must be > 0"]),
    ("sk_ratio", _set("model.sk_ratio", -0.1),
     ["model.sk_ratio=-0.1 must be >= 0"]),
    ("se_ratio", _set("model.se_ratio", 1.0),
     ["model.se_ratio=1.0 must be in [0, 1)"]),
    ("dtype", _set("model.compute_dtype", "float16"),
     ["model.compute_dtype='float16'", "bfloat16"]),
    ("proj_layers", _set("model.num_proj_layers", 0),
     ["model.num_proj_layers=0 must be >= 1"]),
    ("temperature_zero", _set("simclr.temperature", 0.0),
     ["simclr.temperature=0.0 must be > 0"]),
    ("temperature_negative", _set("simclr.temperature", -0.5),
     ["simclr.temperature=-0.5 must be > 0"]),
    ("learning_rate", _set("learning_rate", 0.0),
     ["learning_rate=0.0 must be > 0"]),
    ("lr_scaling", _set("learning_rate_scaling", "cubic"),
     ["learning_rate_scaling='cubic'", "'linear', 'sqrt'"]),
    ("epochs", _many(num_train_steps=-1, num_epochs=0),
     ["num_epochs=0 must be > 0"]),
    ("image_size_zero", _set("image_size", 0),
     ["image_size=0 must be >= 8"]),
    ("image_size_small", _set("image_size", 4),
     ["image_size=4 must be >= 8"]),
    ("warmup_negative", _set("warmup_epochs", -1.0),
     ["warmup_epochs=-1.0 must be >= 0"]),
    ("warmup_too_long", _many(num_train_steps=-1, num_epochs=10,
                              warmup_epochs=10.0),
     ["warmup_epochs=10.0 must be shorter than num_epochs=10"]),
    ("batch_zero", _set("batch_size", 0), ["batch_size=0 must be > 0"]),
    ("batch_not_divisible", _set("batch_size", 12),
     ["batch_size=12 must be divisible by the number of devices (8)",
      "nearest valid: 8"]),
    ("momentum", _set("momentum", 1.0), ["momentum=1.0 must be in [0, 1)"]),
    ("weight_decay", _set("weight_decay", -1e-4),
     ["weight_decay=-0.0001 must be >= 0"]),
    ("policy", _set("nonfinite_policy", "ignore"),
     ["nonfinite_policy='ignore'", "'stop', 'skip'"]),
    ("mesh", _set("mesh_axis_type", "manual"),
     ["mesh_axis_type='manual'", "'explicit', 'auto'"]),
    ("jitter_prob", _set("augment.color_jitter_prob", 1.5),
     ["augment.color_jitter_prob=1.5 must be a probability"]),
    ("crop_range", _set("augment.crop_area_range", (0.5, 0.2)),
     ["augment.crop_area_range=(0.5, 0.2)", "min <= max"]),
    ("log_every", _set("log_every_steps", 0), ["log_every_steps=0 must be > 0"]),
    ("checkpoint_every", _set("checkpoint_every_steps", -5),
     ["checkpoint_every_steps=-5 must be > 0"]),
    ("jitter_strength", _set("augment.color_jitter_strength", 3.0),
     ["augment.color_jitter_strength=3.0", "0 to 2.5", "hue delta"]),
    ("brightness_impl", _set("augment.brightness_impl", "simclrv3"),
     ["augment.brightness_impl='simclrv3'", "'simclrv1'", "'simclrv2'"]),
    ("crop_area_zero", _set("augment.crop_area_range", (0.0, 1.0)),
     ["augment.crop_area_range=(0.0, 1.0)", "0.001 <= min"]),
    ("grayscale_prob", _set("augment.grayscale_prob", -0.1),
     ["augment.grayscale_prob=-0.1 must be a probability"]),
    ("blur_prob", _set("augment.blur_prob", 2.0),
     ["augment.blur_prob=2.0 must be a probability"]),
    ("max_checkpoints", _set("max_checkpoints_to_keep", 0),
     ["max_checkpoints_to_keep=0 must be > 0"]),
    ("wrong_job", _set("job", "finetune"),
     ["this is a 'finetune' config (job='finetune')",
      "jaxclr.main needs a pretrain config"]),
    ("unknown_job", _set("job", "distil"),
     ["job='distil' is unknown",
      "'pretrain', 'linear_eval', 'finetune', 'distill'"]),
    ("unknown_field", _unknown_field,
     ["unknown config field(s) eval_evry_steps"]),
    ("loss", _set("simclr.loss", "simclr"),
     ["simclr.loss='simclr' is unknown",
      "nt_xent, supcon, supcon_in, triplet_batch_hard"]),
    ("supcon_form", _many(method="supcon", supcon__form="inside"),
     ["supcon.form='inside'; valid: 'out', 'in'"]),
    ("npair_embedding_l2", _many(simclr__loss="npair",
                                 simclr__embedding_l2=-0.1),
     ["simclr.embedding_l2=-0.1 must be >= 0 (0 = no L2 term)"]),
    ("mocov2_queue_not_multiple", _many(method="mocov2",
                                        mocov2__queue_size=1000),
     ["mocov2.queue_size=1000 must be a positive multiple of "
      "batch_size=16"]),
    ("nnclr_queue_not_multiple", _many(method="nnclr", nnclr__queue_size=1000),
     ["nnclr.queue_size=1000 must be a positive multiple of batch_size=16",
      "e.g. 65536"]),
    ("pretrain_optimizer", _set("optimizer", "momentum"),
     ["optimizer='momentum'", "valid for pretraining: ('lars', 'sgd')"]),
    ("method_byol_tau", _many(method="byol", byol__tau_base=1.5),
     ["byol.tau_base=1.5 must be in [0, 1]"]),
    ("method_byol_predictor", _many(method="byol",
                                    byol__predictor_hidden_dim=0),
     ["byol.predictor_hidden_dim=0"]),
    ("proj_hidden_dim_negative", _set("model.proj_hidden_dim", -1),
     ["model.proj_hidden_dim=-1 must be >= 0"]),
    ("proj_output_norm", _set("model.proj_output_norm", "layer_norm"),
     ["model.proj_output_norm='layer_norm'", "valid: bn, bn_no_affine, none"]),
    ("method_barlow_lambda", _many(method="barlow_twins",
                                   barlow_twins__barlow_lambda=-1.0),
     ["barlow_twins.barlow_lambda=-1.0 must be >= 0"]),
    ("simclr_vicreg_weight", _many(simclr__loss="vicreg",
                                   simclr__covariance_weight=-1.0),
     ["simclr.covariance_weight=-1.0 must be >= 0"]),
    ("method_unknown", _set("method", "moco"),
     ["method='moco' is unknown", "valid: simclr, supcon, byol, nnclr"]),
    ("nnclr_temperature", _many(method="nnclr", nnclr__temperature=0.0),
     ["nnclr.temperature=0.0 must be > 0"]),
    ("supcon_unlabelled_synthetic", _many(method="supcon",
                                          synthetic__num_classes=0),
     ["method='supcon' with class positives needs a labelled dataset",
      "dataset='synthetic' has no labels", "supcon.positives=instance"]),
    ("triplet_class_unlabelled_synthetic",
     _many(simclr__loss="triplet_semi_hard", simclr__positives="class",
           synthetic__num_classes=0),
     ["method='simclr' with class positives needs a labelled dataset"]),
    ("supcon_stl10_unlabelled",
     _many(method="supcon", dataset="stl10", data_dir=REPO),
     ["dataset='stl10' split 'unlabelled' is unlabelled"]),
    ("class_labels_instance_loss", _many(simclr__loss="npair",
                                         simclr__positives="class"),
     ["simclr.positives='class' needs a loss that reads labels",
      "loss='npair' pairs the two views of an image only"]),
    ("positives", _set("simclr.positives", "image"),
     ["simclr.positives='image'", "'instance', 'class'"]),
    ("queue_without_infonce", _set("simclr.queue_size", 64),
     ["simclr.queue_size=64 is a queue of past keys",
      "loss='nt_xent' does not read"]),
    ("queue_negative", _many(simclr__loss="infonce", simclr__queue_size=-1),
     ["simclr.queue_size=-1 must be an int >= 0"]),
    ("margin", _many(simclr__loss="triplet_batch_hard", simclr__margin=0.0),
     ["simclr.margin=0.0 must be > 0"]),
]


@pytest.fixture
def no_data_or_compilation(monkeypatch, tmp_path):
  """Fails the test if run() reaches data loading or model compilation."""
  def forbidden(*args, **kwargs):
    raise AssertionError("reached data loading or compilation")
  monkeypatch.setattr(input_pipeline, "dataset_info", forbidden)
  monkeypatch.setattr(pretrain, "create_trainer", forbidden)
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # No ~/tensorflow_datasets.


def test_table_has_at_least_20_cases():
  assert len(BAD_CONFIGS) >= 20


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_before_data_and_compilation(
    mutate, expected, no_data_or_compilation, tmp_path):
  config = tiny_config()
  mutate(config)
  workdir = tmp_path / "work"
  with pytest.raises(config_lib.ConfigError) as e:
    pretrain.run(config, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  for part in expected:
    assert part in message, message
  assert not workdir.exists()  # Refused before the workdir was touched.


def test_valid_config_passes_validation():
  config_lib.validate(tiny_config())


@pytest.mark.parametrize("fields,expected", [
    ({}, ("nt_xent", False)),
    ({"method": "supcon"}, ("supcon", True)),
    ({"method": "supcon", "supcon.positives": "instance"}, ("supcon", False)),
    ({"simclr.loss": "triplet_batch_hard"}, ("triplet_batch_hard", False)),
    ({"simclr.loss": "triplet_semi_hard", "simclr.positives": "class"},
     ("triplet_semi_hard", True)),
    ({"simclr.loss": "infonce"}, ("infonce", False)),
    ({"method": "byol"}, ("byol", False)),
])
def test_method_options_of_valid_objectives(fields, expected):
  config = tiny_config()
  for path, value in fields.items():
    _set(path, value)(config)
  config_lib.validate(config)
  method, opts = config_lib.method_options(config)
  assert (method.loss_name(opts), method.reads_class_labels(opts)) == expected


def test_class_labels_on_an_unlabelled_npz_fail_before_compilation(
    monkeypatch, tmp_path):
  """Whether a folder/npz/TFDS source has labels is known once it is open:
  refused there, before the model or the step is built."""
  def forbidden(*args, **kwargs):
    raise AssertionError("reached compilation")
  monkeypatch.setattr(pretrain, "create_trainer", forbidden)
  path = tmp_path / "unlabelled.npz"
  np.savez(path, images=np.zeros((16, 8, 8, 3), np.uint8))
  config = tiny_config()
  config.update({"dataset": f"npz:{path}", "method": "supcon"})
  with pytest.raises(config_lib.ConfigError,
                     match="method='supcon' with class positives needs a "
                     "labelled dataset, but dataset='npz:.*' has no labels"):
    pretrain.run(config, str(tmp_path / "work"))


def test_method_sections_are_checked_on_resume():
  """Changing the chosen method's section refuses to resume; the sections of
  methods the run does not train change nothing; a config.json from before
  the fields existed resumes with them at their defaults."""
  old = workdir_lib.config_to_dict(tiny_config())
  new = tiny_config()
  new.simclr.loss, new.simclr.margin = "triplet_batch_hard", 0.3
  new.byol.tau_base = 0.5  # Not the run's method.
  assert workdir_lib.config_differences(old, workdir_lib.config_to_dict(
      new)) == ["simclr.loss: 'nt_xent' -> 'triplet_batch_hard'",
                "simclr.margin: 0.2 -> 0.3"]
  for name in ("method", "simclr", "supcon", "byol", "nnclr", "optimizer"):
    del old[name]
  del old["model"]["proj_hidden_dim"]
  del old["model"]["proj_output_norm"]
  assert workdir_lib.config_differences(
      old, workdir_lib.config_to_dict(tiny_config())) == []


def test_a_config_from_before_the_method_sections_resumes_as_it_ran():
  """The flat objective fields of jaxclr <= 2739732 (temperature, loss,
  loss_labels, byol_tau_base, ...) read as today's method sections."""
  new = tiny_config()
  new.method, new.supcon.temperature = "supcon", 0.5
  old = workdir_lib.config_to_dict(new)
  for name in ("simclr", "supcon", "byol", "nnclr"):
    del old[name]
  old.update(loss="nt_xent", loss_labels=None, temperature=0.5,
             hidden_norm=True, triplet_margin=0.2, infonce_queue_size=0,
             byol_tau_base=0.99, predictor_hidden_dim=4096,
             nnclr_queue_size=65536)
  upgraded = legacy.upgrade(old)
  assert upgraded["supcon"] == {"temperature": 0.5, "hidden_norm": True,
                                "positives": "class"}
  assert workdir_lib.config_differences(
      upgraded, workdir_lib.config_to_dict(new)) == []
  new.supcon.temperature = 0.1
  assert workdir_lib.config_differences(
      upgraded, workdir_lib.config_to_dict(new)) == [
          "supcon.temperature: 0.5 -> 0.1"]


def test_fields_added_with_a_new_default_read_as_the_run_computed():
  """byol.per_view_bn (BatchNorm per view, new default True) and N-pair's
  reference form (unnormalised, with an L2 term): a config.json from before
  them reads as what that run computed, so resuming it with today's
  defaults is refused, and with the old behaviour set it is not."""
  new = tiny_config()
  new.method = "byol"
  old = workdir_lib.config_to_dict(new)
  del old["byol"]["per_view_bn"]
  upgraded = legacy.upgrade(old)
  assert upgraded["byol"]["per_view_bn"] is False
  assert workdir_lib.config_differences(
      upgraded, workdir_lib.config_to_dict(new)) == [
          "byol.per_view_bn: False -> True"]
  new.byol.per_view_bn = False
  assert workdir_lib.config_differences(
      upgraded, workdir_lib.config_to_dict(new)) == []
  # N-pair on unit vectors with no L2 term was InfoNCE at temperature 1.
  npair = tiny_config()
  npair.simclr.loss = "npair"
  for hidden_norm, loss, temperature in ((True, "infonce", 1.0),
                                         (False, "npair", 0.1)):
    old = workdir_lib.config_to_dict(npair)
    del old["simclr"]["embedding_l2"]
    old["simclr"]["hidden_norm"] = hidden_norm
    section = legacy.upgrade(old)["simclr"]
    assert (section["loss"], section["temperature"],
            section["embedding_l2"]) == (loss, temperature, 0.0)
  # A config saved by today's jaxclr is read as it is.
  today = workdir_lib.config_to_dict(npair)
  assert legacy.upgrade(today) == today


def test_remote_tfds_data_dir_is_left_to_tfds():
  """gs:// (TFDS reads it through tf.io.gfile) cannot be stat'ed locally: it
  is checked when the dataset is opened, not refused here."""
  c = tiny_config()
  c.dataset, c.data_dir = "imagenet2012", "gs://my-bucket/tensorflow_datasets"
  config_lib.validate(c)
  c.dataset = "tfds:oxford_flowers102"
  config_lib.validate(c)


def test_unusable_workdir_is_refused(no_data_or_compilation, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"Cannot create workdir .*a_file/run"):
    pretrain.run(tiny_config(), str(blocker / "run"))


def test_url_workdir_is_refused(no_data_or_compilation, tmp_path,
                                monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError,
                     match="workdir='gs://bucket/run' is a URL.*gcsfuse"):
    pretrain.run(tiny_config(), "gs://bucket/run")
  assert not (tmp_path / "gs:").exists()


def test_eval_workdir_checks(tmp_path):
  with pytest.raises(workdir_lib.WorkdirError, match="does not exist"):
    workdir_lib.require_pretraining_workdir(str(tmp_path / "missing"))
  with pytest.raises(workdir_lib.WorkdirError,
                     match="not a jaxclr pretraining workdir"):
    workdir_lib.require_pretraining_workdir(str(tmp_path))
  (tmp_path / workdir_lib.CONFIG_FILE).write_text("{}")
  with pytest.raises(workdir_lib.WorkdirError, match="has no checkpoint yet"):
    workdir_lib.require_pretraining_workdir(str(tmp_path))
  with pytest.raises(workdir_lib.WorkdirError, match="No pretraining workdir"):
    workdir_lib.require_pretraining_workdir(None)


@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [
    ("--config.model.depth=19", "jaxclr: error: model.depth=19 is unknown"),
    ("--config.model.deptth=18",
     "jaxclr: error: unknown config field 'deptth' in "
     "--config.model.deptth=18; Did you mean \"depth\""),
    ("--config.simclr.temperature=abc",
     "jaxclr: error: flag --config.simclr.temperature="),
])
def test_cli_reports_one_line_and_exit_2(override, expected, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "jaxclr.main", "--config",
       "configs/synthetic_tiny.py", "--workdir", str(tmp_path / "w"), override],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(expected), last
  assert not (tmp_path / "w").exists()
