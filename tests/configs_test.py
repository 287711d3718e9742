"""Every configs/*.py, with each argument its docstring documents, passes
`config_lib.validate` for its job; the three schemas refuse unknown fields,
a config of another job, and each evaluation and fine-tuning rule."""

import glob
import math
import os
import re

import pytest

import config_validation_test  # Its config-editing helpers (tests/ is on the path).
from jaxclr import config as config_lib, losses, methods
from jaxclr.training import optim, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# Values for the placeholders of documented arguments ('steps=N').
PLACEHOLDER_VALUES = {"steps": "50", "batch": "128", "every": "5",
                      "depth": "50", "width": "2.0", "epochs": "50",
                      "per_class": "5", "fraction": "0.1", "sk": "0.0625",
                      "temperature": "0.5", "labelled": "1",
                      # Every registered method and loss.
                      "method": methods.names(), "loss": losses.names()}
DUMMY_WORKDIR = "dummy/pretraining/workdir"  # Not read by validate.


def _name(path):
  return os.path.splitext(os.path.basename(path))[0]


def _docstring(path):
  with open(path) as f:
    source = f.read()
  match = re.match(r'\s*"""(.*?)"""', source, re.S)
  assert match, f"{path} has no module docstring"
  return match.group(1)


def documented_arguments(path) -> dict[str, list[str | None]]:
  """{name: example values (None: a bare flag)} of the docstring's
  'Arguments' section: one entry per line indented by two spaces,
  'name=v1|v2', 'name=PLACEHOLDER', 'flag' or 'a / b'; deeper lines
  continue an entry, an unindented line ends the section."""
  lines = _docstring(path).splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith("Arguments")),
               None)
  if start is None:
    return {}
  args = {}
  for line in lines[start + 1:]:
    if not line.startswith("  "):
      break
    if line.startswith("   "):  # A continuation.
      continue
    for item in re.split(r"\s+/\s+", re.split(r"\s{2,}", line.strip())[0]):
      name, sep, values = item.partition("=")
      if not sep:
        args[name] = [None]
      elif values.isupper():
        assert name in PLACEHOLDER_VALUES, (
            f"{path}: argument {item!r}: add an example value for it to "
            "PLACEHOLDER_VALUES")
        value = PLACEHOLDER_VALUES[name]
        args[name] = [value] if isinstance(value, str) else list(value)
      else:
        args[name] = values.split("|")
  return args


def parsed_arguments(path, monkeypatch) -> dict:
  """The defaults that get_config passes to parse_arg: its arguments."""
  seen = {}
  real = config_lib.parse_arg

  def spy(arg, **defaults):
    seen.update(defaults)
    return real(arg, **defaults)
  monkeypatch.setattr(config_lib, "parse_arg", spy)
  config_lib.load_config_file(path)
  return seen


def entry_point_job(path) -> str:
  """The job of the module the docstring's command runs."""
  match = re.search(r"python -m (jaxclr\.\w+)", _docstring(path))
  assert match, f"{path}: the docstring gives no 'python -m jaxclr...' command"
  jobs = {module: job for job, (module, _) in config_lib.ENTRY_POINTS.items()}
  return jobs[match.group(1)]


def _config_cases():
  cases = []
  for path in CONFIG_FILES:
    cases.append((path, None))
    for name, values in documented_arguments(path).items():
      for value in values:
        cases.append((path, name if value is None else f"{name}={value}"))
  return cases


CONFIG_CASES = _config_cases()


@pytest.fixture
def no_tfds_env(monkeypatch, tmp_path):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # No ~/tensorflow_datasets.


def ready_to_validate(config, data_dir):
  """What a launcher would add: a data_dir for TFDS datasets, an encoder
  source for evaluation jobs (none for the random_init variants)."""
  if config.dataset is not None and (
      config.dataset in config_lib.TFDS_DATASETS or
      config.dataset.startswith("tfds:")):
    config.data_dir = str(data_dir)
  if config.job != "pretrain":
    config.pretrained_workdir = (
        "none" if config.model.depth is not None else DUMMY_WORKDIR)
  if config.job == "distill":
    config.teacher_workdir = DUMMY_WORKDIR
  return config


def test_every_config_file_is_covered():
  names = {_name(p) for p in CONFIG_FILES}
  assert {"default", "cifar10", "imagenet", "synthetic_tiny", "linear_eval",
          "finetune", "distill"} <= names
  assert len(CONFIG_CASES) > 2 * len(CONFIG_FILES)  # Arguments were found.


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_name)
def test_documented_arguments_are_the_parsed_ones(path, monkeypatch):
  assert set(documented_arguments(path)) == set(
      parsed_arguments(path, monkeypatch)), (
          f"{path}: the docstring's Arguments section and get_config's "
          "parse_arg(...) differ")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_name)
def test_config_files_start_from_a_schema_not_another_file(path):
  with open(path) as f:
    source = f.read()
  assert "load_config_file" not in source and "__file__" not in source
  # cifar10_method_recipe is the pretraining schema with the fields the
  # method recipes share.
  assert re.search(r"config_lib\.((pretrain|linear_eval|finetune|distill)_"
                   r"config\(\)|cifar10_method_recipe\()", source)


@pytest.mark.parametrize("path,arg", CONFIG_CASES,
                         ids=[f"{_name(p)}:{a}" for p, a in CONFIG_CASES])
def test_config_file_with_argument_validates(path, arg, tmp_path, no_tfds_env):
  config = config_lib.load_config_file(path, arg)
  job = entry_point_job(path)
  assert config.job == job
  config_lib.validate(ready_to_validate(config, tmp_path), job=job)


# ---- Derived values that the docstrings state ----

def _load(name, arg=None):
  return config_lib.load_config_file(
      os.path.join(REPO, "configs", f"{name}.py"), arg)


# Steps are n x epochs // B + 1 and warmup steps int(n x warmup_epochs / B),
# as the official code counts them; the numbers are worked by hand from the
# official commands (docs/simclr.md section 8 gives the commands).
@pytest.mark.parametrize("name,arg,num_examples,steps,warmup,peak_lr", [
    # CIFAR-10 README: 50,000 x 1000 // 512 + 1; 10 warmup epochs
    # (5,000,000 / 512 = 976.6); lr 1.0 x 512/256.
    ("cifar10", None, 50_000, 97_657, 976, 2.0),
    ("cifar10", "v1", 50_000, 97_657, 976, 2.0),
    # P1: 1,281,167 x 100 // 4096 + 1; 10 warmup epochs; 0.3 x 4096/256.
    ("imagenet", None, 1_281_167, 31_279, 3_127, 4.8),
    # SimCLRv2: 1,281,167 x 800 // 4096 + 1 = 250,228, the released v2
    # checkpoints' step; 5% warmup = 40 epochs, 51,246,680 / 4096 = 12,511.4;
    # 0.1 x sqrt(4096).
    ("imagenet", "v2", 1_281_167, 250_228, 12_511, 6.4),
    ("imagenet", "v2,epochs=100", 1_281_167, 31_279, 1_563, 6.4),
    # BYOL / NNCLR CIFAR-10 (solo-learn's recipes): 50,000 x 1000 // 256 + 1;
    # 10 warmup epochs (500,000 / 256 = 1,953.1); lr 1.0 / 0.4 x 256/256.
    ("byol", None, 50_000, 195_313, 1_953, 1.0),
    ("nnclr", None, 50_000, 195_313, 1_953, 0.4),
    # MoCo v2+ / v3 CIFAR-10 (solo-learn's recipes): the same counts.
    ("mocov2", None, 50_000, 195_313, 1_953, 0.3),
    ("mocov3", None, 50_000, 195_313, 1_953, 0.3),
    # SupCon CIFAR-10 (solo-learn's recipe): the same counts; SGD lr 0.4.
    ("supcon", None, 50_000, 195_313, 1_953, 0.4),
    ("default", None, 1_347, 300, 26, 0.5),
    ("synthetic_tiny", None, 64, 12, 0, 1.0 * 16 / 256),
    # configs/finetune.py: the digits subsets.
    ("finetune", None, 100, 188, 0, 0.00625),
    ("finetune", "per_class=1", 10, 61, 0, 0.05 * 10 / 256),
    ("finetune", "per_class=5", 50, 94, 0, 0.00625),
    ("finetune", "protocol=v2", 100, 188, 0, 0.005 * math.sqrt(32)),
    # P1 B.5 (v1): 12,811 x 60 // 4096 + 1; 128,116 x 30 // 4096 + 1 = 939;
    # 0.05 x 4096/256.
    ("finetune", "1pct", 12_811, 188, 0, 0.8),
    ("finetune", "10pct", 128_116, 939, 0, 0.8),
    # SimCLRv2 README (1%): 12,811 x 60 // 1024 + 1 = 751, 0.005 x sqrt(1024)
    # = 0.16; 10% at 30 epochs: 3,843,480 // 1024 + 1 = 3,754.
    ("finetune", "1pct,protocol=v2", 12_811, 751, 0, 0.16),
    ("finetune", "10pct,protocol=v2", 128_116, 3_754, 0, 0.16),
])
def test_training_plans_are_what_the_docstrings_say(name, arg, num_examples,
                                                    steps, warmup, peak_lr):
  plan = optim.training_plan(_load(name, arg), num_examples)
  assert (plan.total_steps, plan.warmup_steps) == (steps, warmup)
  assert plan.peak_learning_rate == pytest.approx(peak_lr)


def test_finetune_and_linear_eval_presets():
  c = _load("finetune")
  assert (c.labels_per_class, c.label_fraction, c.batch_size,
          c.ft_proj_selector) == (10, None, 32, 1)
  assert _load("finetune", "per_class=1").batch_size == 10
  c = _load("finetune", "fraction=0.1")
  assert (c.label_fraction, c.labels_per_class, c.num_epochs) == (
      0.1, None, 30.0)
  c = _load("finetune", "10pct")
  assert (c.dataset, c.batch_size, c.num_epochs) == (
      "imagenet2012_subset/10pct", 4096, 30.0)


@pytest.mark.parametrize("arg,selector,optimizer,batch_size", [
    (None, 1, "momentum", 32),           # digits: v1's optimiser, layer 1.
    ("protocol=v1", 0, "momentum", 32),
    ("protocol=v2", 1, "lars", 32),
    ("1pct", 0, "momentum", 4096),       # P1 B.5: from h.
    ("1pct,protocol=v1", 0, "momentum", 4096),
    ("1pct,protocol=v2", 1, "lars", 1024),  # The v2 README command.
    ("10pct,protocol=v2", 1, "lars", 1024),
])
def test_finetune_protocols_are_what_they_name(arg, selector, optimizer,
                                               batch_size):
  c = _load("finetune", arg)
  assert (c.ft_proj_selector, c.optimizer, c.batch_size) == (
      selector, optimizer, batch_size)
  assert (c.weight_decay, c.warmup_epochs) == (0.0, 0.0)
  assert c.momentum == 0.9


def test_finetune_refuses_an_unknown_protocol():
  with pytest.raises(ValueError, match="protocol='v3' is unknown; valid: "
                     "digits, v1, v2"):
    _load("finetune", "protocol=v3")


@pytest.mark.parametrize("arg,weight_decay,head_layers", [
    (None, 1e-4, 3), ("v1", 1e-6, 2)])
def test_cifar10_follows_the_official_readme(arg, weight_decay, head_layers):
  c = _load("cifar10", arg)
  assert (c.weight_decay, c.model.num_proj_layers) == (weight_decay,
                                                       head_layers)
  assert (c.simclr.temperature, c.batch_size,
          c.augment.color_jitter_strength,
          c.augment.use_blur) == (0.5, 512, 0.5, False)


# The published CIFAR-10 recipes (R-18, B=256, solo-learn's
# scripts/pretrain/cifar/*.yaml): method, optimiser, lr, weight decay,
# lars_clip_lr, temperature (None: the method has none), projector
# hidden/out widths, predictor width.
@pytest.mark.parametrize(
    "name,method,optimizer,lr,wd,clip_lr,temperature,proj,pred", [
        ("byol", "byol", "lars", 1.0, 1e-5, True, None, (4096, 256), 4096),
        ("nnclr", "nnclr", "lars", 0.4, 1e-5, True, 0.2, (2048, 256), 4096),
        ("supcon", "supcon", "sgd", 0.4, 1e-5, False, 0.2, (2048, 256),
         None),
        ("mocov2", "mocov2", "sgd", 0.3, 1e-4, False, 0.2, (2048, 256),
         None),
        ("mocov3", "mocov3", "lars", 0.3, 1e-6, True, 0.2, (4096, 256),
         4096),
    ])
def test_method_recipes(name, method, optimizer, lr, wd, clip_lr, temperature,
                        proj, pred):
  c = _load(name)
  assert (c.method, c.optimizer, c.learning_rate, c.weight_decay,
          c.lars_clip_lr, c.batch_size, c.model.depth, c.num_epochs) == (
              method, optimizer, lr, wd, clip_lr, 256, 18, 1000)
  assert (c.model.proj_hidden_dim, c.model.proj_out_dim) == proj
  section = c[method]
  if temperature is not None:
    assert section.temperature == temperature
  if pred is not None:
    assert section.predictor_hidden_dim == pred
  if method == "nnclr":
    assert section.queue_size == 65536
  if method == "mocov2":  # solo-learn's v2+: symmetric, 0.99 -> 0.999.
    assert (section.queue_size, section.symmetric, section.tau_base,
            section.tau_final) == (32768, True, 0.99, 0.999)
  if method == "supcon":  # The loss and augmentation of the cited 93.82.
    assert (section.form, c.augment.color_jitter_strength, c.augment.use_blur,
            c.augment.blur_prob) == ("in", 1.0, True, 0.5)


# configs/imagenet.py:method=NAME: the paper's ImageNet values (batch,
# epochs, optimiser, lr, weight decay) of each method's recipe there.
@pytest.mark.parametrize("method,batch,epochs,optimizer,lr,wd", [
    ("byol", 4096, 1000, "lars", 0.2, 1.5e-6),
    ("nnclr", 4096, 1000, "lars", 0.3, 1e-6),
    ("supcon", 6144, 350, "lars", 0.4, 1e-3),
    ("mocov2", 256, 800, "sgd", 0.03, 1e-4),
    ("mocov3", 4096, 1000, "lars", 0.3, 1.5e-6),
])
def test_imagenet_method_presets(method, batch, epochs, optimizer, lr, wd):
  c = _load("imagenet", f"method={method}")
  assert (c.method, c.batch_size, c.num_epochs, c.optimizer, c.learning_rate,
          c.weight_decay, c.learning_rate_scaling) == (
              method, batch, epochs, optimizer, lr, wd, "linear")
  # batch= and epochs= still choose.
  c = _load("imagenet", f"method={method},batch=512,epochs=100")
  assert (c.batch_size, c.num_epochs) == (512, 100)


@pytest.mark.parametrize("arg,epochs,head_layers,weight_decay,sk_ratio", [
    (None, 100, 2, 1e-6, 0.0), ("v2", 800, 3, 1e-4, 0.0),
    ("v2,sk=0.0625", 800, 3, 1e-4, 0.0625), ("epochs=1000", 1000, 2, 1e-6,
                                             0.0)])
def test_imagenet_presets(arg, epochs, head_layers, weight_decay, sk_ratio):
  c = _load("imagenet", arg)
  assert (c.num_epochs, c.model.num_proj_layers, c.weight_decay,
          c.model.sk_ratio) == (epochs, head_layers, weight_decay, sk_ratio)
  # The paper probe's count, round(epochs x steps_per_epoch): 150 at B=256.
  c = _load("linear_eval")
  assert optim.training_plan(c, 1_347).steps_per_epoch * c.num_epochs == 150
  assert (_load("linear_eval", "dataset=cifar10").batch_size,
          _load("linear_eval", "dataset=imagenet").batch_size) == (512, 4096)


@pytest.mark.parametrize("name", ["linear_eval", "finetune"])
def test_random_init_is_configs_default_model(name):
  pretrain = _load("default")
  c = _load(name, "random_init")
  for key, value in c.model.items():
    if value is not None:
      assert value == pretrain.model[key], key
  assert {k for k, v in c.model.items() if v is not None} == {
      "depth", "width_multiplier", "cifar_stem", "num_proj_layers",
      "proj_out_dim"}
  assert (c.dataset, c.image_size) == (pretrain.dataset, pretrain.image_size)


# ---- The schemas ----

def test_schemas_share_field_definitions():
  """The shared fields have the same names in every schema; pretraining
  keeps base_config's fields and defaults."""
  schemas = {job: config_lib.job_schema(job) for job in config_lib.JOBS}
  for job, c in schemas.items():
    assert c.job == job
  shared = ("seed", "dataset", "data_dir", "train_split", "eval_split",
            "image_size", "batch_size", "num_epochs", "num_train_steps",
            "learning_rate", "learning_rate_scaling", "warmup_epochs",
            "momentum", "weight_decay", "log_every_steps",
            "checkpoint_every_steps", "max_checkpoints_to_keep",
            "nonfinite_policy", "mesh_axis_type", "allow_config_mismatch",
            "model")
  for c in schemas.values():
    assert all(k in c for k in shared)
  eval_only = ("pretrained_workdir", "checkpoint_step", "eval_batch_size")
  for job in ("linear_eval", "finetune"):
    assert all(k in schemas[job] for k in eval_only)
    assert all(v is None for v in schemas[job].model.values())
    # Today's evaluation behaviour: an 'auto' mesh, nothing saved as NaN.
    assert (schemas[job].mesh_axis_type, schemas[job].nonfinite_policy,
            schemas[job].allow_config_mismatch,
            schemas[job].max_checkpoints_to_keep) == ("auto", "stop", False, 2)
  assert set(schemas["pretrain"].model) == set(schemas["finetune"].model)
  assert config_lib.base_config().to_dict() == schemas["pretrain"].to_dict()
  assert "debug_inject_nan_at_step" not in schemas["pretrain"]


def _pretrain():
  c = config_lib.pretrain_config()
  c.dataset = "synthetic"
  return c


def _linear_eval():
  c = _load("linear_eval")
  c.pretrained_workdir = DUMMY_WORKDIR
  return c


def _finetune():
  c = _load("finetune")
  c.pretrained_workdir = DUMMY_WORKDIR
  return c


def _distill():
  c = _load("distill")
  c.teacher_workdir = DUMMY_WORKDIR
  return c


BASES = {"pretrain": _pretrain, "linear_eval": _linear_eval,
         "finetune": _finetune, "distill": _distill}


@pytest.mark.parametrize("job", config_lib.JOBS)
def test_each_schema_refuses_an_unknown_field(job):
  c = BASES[job]()
  config_lib.validate(c, job=job)
  c.unlock()
  c.knn_kk = 5
  with pytest.raises(config_lib.ConfigError,
                     match=rf"unknown config field\(s\) knn_kk for "
                     rf"job='{job}'.*{job}_config\(\)"):
    config_lib.validate(c)


@pytest.mark.parametrize("job", config_lib.JOBS)
def test_a_missing_field_is_refused(job):
  c = BASES[job]()
  c.unlock()
  del c["log_every_steps"]
  with pytest.raises(config_lib.ConfigError,
                     match=r"missing config field\(s\) log_every_steps"):
    config_lib.validate(c)


@pytest.mark.parametrize("given,job", [
    (g, j) for g in config_lib.JOBS for j in config_lib.JOBS if g != j])
def test_a_config_of_another_job_is_refused(given, job):
  module, example = config_lib.ENTRY_POINTS[job]
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(BASES[given](), job=job)
  assert str(e.value) == (
      f"this is a {given!r} config (job={given!r}); {module} needs a {job} "
      f"config such as {example}")


def test_a_config_without_or_with_a_bad_job_is_refused():
  c = _linear_eval()
  c.unlock()
  del c["job"]
  with pytest.raises(config_lib.ConfigError,
                     match=r"the linear_eval config has no 'job' field; build "
                     r"it from config_lib.linear_eval_config\(\) "
                     r"\(configs/linear_eval.py\)"):
    config_lib.validate(c, job="linear_eval")
  with pytest.raises(config_lib.ConfigError, match="has no 'job' field"):
    config_lib.validate(c)
  c = _finetune()
  c.job = "distil"
  with pytest.raises(config_lib.ConfigError,
                     match=r"job='distil' is unknown; valid: \('pretrain', "
                     r"'linear_eval', 'finetune', 'distill'\)"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="validate"):
    config_lib.validate(_finetune(), job="fine-tune")


# Fields as keyword arguments, nested ones with '__' (model__depth=...).
_set = config_validation_test._many


def _random_init(**fields):
  return _set(pretrained_workdir="none", **fields)


# (id, job, mutation, substrings of the one-line message)
BAD_EVAL_CONFIGS = [
    # Both evaluation jobs: where the encoder comes from, data, loop.
    *[(f"{job}_{case}", job, mutate, expected) for job in ("linear_eval",
                                                           "finetune")
      for case, mutate, expected in [
          ("no_workdir", _set(pretrained_workdir=None),
           ["pretrained_workdir is required", "'none'"]),
          ("checkpoint_step", _set(checkpoint_step=-2),
           ["checkpoint_step=-2 must be -1 (the newest) or a step >= 0"]),
          ("eval_batch_size", _set(eval_batch_size=0),
           ["eval_batch_size=0 must be > 0"]),
          ("random_init_no_model", _random_init(dataset="digits",
                                                image_size=16),
           ["pretrained_workdir='none' (random init) needs the architecture",
            "model.depth"]),
          ("random_init_no_data", _random_init(model__depth=18,
                                               model__num_proj_layers=2),
           ["pretrained_workdir='none'", "unset: dataset, image_size"]),
          ("model_depth", _set(model__depth=19),
           ["model.depth=19 is unknown", "(18, 34, 50, 101, 152, 200)"]),
          ("model_dtype", _set(model__compute_dtype="float16"),
           ["model.compute_dtype='float16'", "bfloat16"]),
          ("dataset", _set(dataset="cifar"), ["dataset='cifar' is unknown"]),
          ("image_size", _set(image_size=4), ["image_size=4 must be >= 8"]),
          ("data_dir", _set(dataset="cifar10", data_dir="/no/such/dir"),
           ["data_dir='/no/such/dir'", "does not exist"]),
          ("random_init_tfds_no_data_dir",
           _random_init(dataset="cifar10", image_size=32, model__depth=18,
                        model__num_proj_layers=2),
           ["dataset='cifar10'", "data_dir is not set"]),
          ("batch_size", _set(batch_size=0), ["batch_size=0 must be > 0"]),
          ("num_epochs", _set(num_epochs=0.0),
           ["num_epochs=0.0 must be > 0"]),
          ("learning_rate", _set(learning_rate=-0.1),
           ["learning_rate=-0.1 must be > 0"]),
          ("lr_scaling", _set(learning_rate_scaling="log"),
           ["learning_rate_scaling='log'", "'linear', 'sqrt'"]),
          ("warmup", _set(warmup_epochs=-1.0),
           ["warmup_epochs=-1.0 must be >= 0"]),
          ("weight_decay", _set(weight_decay=-1.0),
           ["weight_decay=-1.0 must be >= 0"]),
          ("momentum", _set(momentum=1.0), ["momentum=1.0 must be in [0, 1)"]),
          ("log_every", _set(log_every_steps=0),
           ["log_every_steps=0 must be > 0"]),
          ("checkpoint_every", _set(checkpoint_every_steps=0),
           ["checkpoint_every_steps=0 must be > 0"]),
          ("max_checkpoints", _set(max_checkpoints_to_keep=0),
           ["max_checkpoints_to_keep=0 must be > 0"]),
          ("policy", _set(nonfinite_policy="ignore"),
           ["nonfinite_policy='ignore'", "'stop', 'skip'"]),
          ("mesh", _set(mesh_axis_type="manual"),
           ["mesh_axis_type='manual'", "'explicit', 'auto'"]),
      ]],
    # Linear evaluation (was jaxclr/jobs/linear_eval.py:validate).
    ("protocol", "linear_eval", _set(protocol="slow"),
     ["protocol='slow'", "('fast', 'paper', 'knn')"]),
    ("feature_layer", "linear_eval", _set(feature_layer=-1),
     ["feature_layer=-1 must be >= 0 (0 = h)"]),
    ("knn_k", "linear_eval", _set(knn_k=0), ["knn_k=0 must be > 0"]),
    ("knn_temperature", "linear_eval", _set(knn_temperature=0.0),
     ["knn_temperature=0.0 must be > 0"]),
    ("fast_max_iters", "linear_eval", _set(fast_max_iters=0),
     ["fast_max_iters=0 must be > 0"]),
    ("fast_l2", "linear_eval", _set(fast_l2=-1e-3),
     ["fast_l2=-0.001 must be >= 0"]),
    ("few_label_k", "linear_eval", _set(labels_per_class=(1, 0)),
     ["labels_per_class=(1, 0): each must be >= 1"]),
    ("label_draws", "linear_eval", _set(num_label_draws=0),
     ["num_label_draws=0 must be >= 1"]),
    # Fine-tuning (was jaxclr/jobs/finetune.py:validate, subset_options
    # and the random-init half of check_selector).
    ("two_subsets", "finetune", _set(label_fraction=0.1),
     ["set exactly one label subset, got 2 (label_fraction=0.1, "
      "labels_per_class=10)", "labels_per_class (k >= 1 per class)"]),
    ("no_subset", "finetune", _set(labels_per_class=None),
     ["set exactly one label subset, got 0:", "label_fraction (0 < f <= 1"]),
    ("subset_dataset_and_k", "finetune",
     _set(dataset="imagenet2012_subset/1pct"),
     ["got 2 (labels_per_class=10, dataset='imagenet2012_subset/1pct')"]),
    ("label_fraction", "finetune",
     _set(labels_per_class=None, label_fraction=1.5),
     ["label_fraction=1.5 must be in (0, 1]"]),
    ("label_fraction_zero", "finetune",
     _set(labels_per_class=None, label_fraction=0.0),
     ["label_fraction=0.0 must be in (0, 1]"]),
    ("labels_per_class", "finetune", _set(labels_per_class=0),
     ["labels_per_class=0 must be >= 1"]),
    ("selector_negative", "finetune", _set(ft_proj_selector=-1),
     ["ft_proj_selector=-1 must be >= 0 (0 = h"]),
    ("optimizer", "finetune", _set(optimizer="adam"),
     ["optimizer='adam'", "('momentum', 'lars')"]),
    ("trust_coefficient", "finetune", _set(trust_coefficient=0.0),
     ["trust_coefficient=0.0 must be > 0"]),
    ("random_init_no_head", "finetune",
     _random_init(dataset="digits", image_size=16, model__depth=18),
     ["unset: model.num_proj_layers", "configs/finetune.py:random_init"]),
    ("random_init_selector", "finetune",
     _random_init(dataset="digits", image_size=16, model__depth=18,
                  model__num_proj_layers=2, ft_proj_selector=3),
     ["ft_proj_selector=3 is invalid for a 2-layer projection head",
      "valid: 0 (h, head discarded) to 2"]),
]


def test_eval_table_covers_both_jobs():
  jobs = [job for _, job, _, _ in BAD_EVAL_CONFIGS]
  assert jobs.count("linear_eval") >= 25 and jobs.count("finetune") >= 30


@pytest.mark.parametrize("job,mutate,expected",
                         [c[1:] for c in BAD_EVAL_CONFIGS],
                         ids=[c[0] for c in BAD_EVAL_CONFIGS])
def test_bad_eval_config_is_refused(job, mutate, expected, no_tfds_env):
  config = BASES[job]()
  mutate(config)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, job=job)
  message = str(e.value)
  assert "\n" not in message
  for part in expected:
    assert part in message, message


@pytest.mark.parametrize("job,fields", [
    ("finetune", dict(num_epochs=0.0, num_train_steps=5)),
    ("finetune", dict(labels_per_class=None, label_fraction=1.0)),
    ("finetune", dict(labels_per_class=None,
                      dataset="imagenet2012_subset/10pct")),
    ("finetune", dict(optimizer="lars", learning_rate_scaling="sqrt")),
    ("linear_eval", dict(labels_per_class=(), knn=False, protocol="paper")),
    ("linear_eval", dict(checkpoint_step=0, model__depth=18)),
])
def test_valid_eval_variants_pass(job, fields):
  config = BASES[job]()
  _set(**fields)(config)
  config_lib.validate(config, job=job)


def test_random_init_variants_pass():
  for job in ("linear_eval", "finetune"):
    c = _load(job, "random_init")
    c.pretrained_workdir = "none"
    config_lib.validate(c, job=job)


def test_check_batch_sizes():
  c = _finetune()
  c.batch_size, c.eval_batch_size = 32, 100
  config_lib.check_batch_sizes(c, ("batch_size",), num_devices=8,
                               num_processes=2)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_batch_sizes(c, ("batch_size", "eval_batch_size"),
                                 num_devices=8, num_processes=2)
  assert str(e.value) == (
      "eval_batch_size: batch_size=100 must be divisible by the number of "
      "devices (8) and of processes (2); nearest valid: 96")
  c.batch_size = 12
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_batch_sizes(c, ("batch_size",), num_devices=1,
                                 num_processes=8)
  assert str(e.value).startswith("batch_size=12 must be divisible by the "
                                 "number of devices (1) and of processes (8)")


def test_subset_options():
  c = _finetune()
  assert config_lib.subset_options(c) == ["labels_per_class=10"]
  c.labels_per_class, c.dataset = None, "imagenet2012_subset/1pct"
  assert config_lib.subset_options(c) == ["dataset='imagenet2012_subset/1pct'"]


def test_existing_workdirs_keep_their_meaning():
  """A config.json written before the job / loop fields existed (or with
  the removed NaN hook off) is no difference from today's config."""
  for job in config_lib.JOBS:
    new = workdir_lib.config_to_dict(BASES[job]())
    old = {k: v for k, v in new.items() if k not in (
        "job", "nonfinite_policy", "mesh_axis_type", "allow_config_mismatch",
        "learning_rate_scaling", "warmup_epochs", "weight_decay",
        "num_train_steps", "max_checkpoints_to_keep")
           or job == "pretrain"}
    if job == "pretrain":
      del old["job"]
      old["debug_inject_nan_at_step"] = -1
    assert workdir_lib.config_differences(old, new) == [], job
  new = workdir_lib.config_to_dict(_pretrain())
  old = dict(new, debug_inject_nan_at_step=5)
  assert workdir_lib.config_differences(old, new) == [
      "debug_inject_nan_at_step: 5 -> '<absent>'"]
  new = workdir_lib.config_to_dict(_linear_eval())
  old = dict(new, mesh_axis_type="explicit")
  assert workdir_lib.config_differences(old, new) == [
      "mesh_axis_type: 'explicit' -> 'auto'"]
