"""The config schemas of the three jobs: pretraining, linear evaluation and
fine-tuning (read them as `jaxclr.config.pretrain_config()` etc.).

Every hyperparameter that docs/simclr.md names has a field with the
paper's default; the files in configs/ override what differs. A field that
several jobs read (seed, the data source, the optimisation and loop fields,
where the encoder comes from) is defined once, by one of the `_add_*`
helpers below, and every schema that has it calls that helper. Each schema
says which job it is for in `job`. Derived values (scaled learning rate,
step counts) are never stored: `jaxclr.training.optim.training_plan`
computes them.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

JOBS = ("pretrain", "linear_eval", "finetune", "distill")
# model.conv_kernel_grad's values (jaxclr/cpu resolves them).
CONV_KERNEL_GRADS = ("auto", "xla", "patches")
# model.conv_library's values (jaxclr/cpu resolves them).
CONV_LIBRARIES = ("auto", "xla", "onednn")
# model.proj_output_norm's values (jaxclr/models/heads.py: OUTPUT_NORMS).
PROJ_OUTPUT_NORMS = ("bn", "bn_no_affine", "none")

# (name, type, pretraining default): the architecture fields. Pretraining
# sets them; an evaluation job reads them from the checkpoint's config.json
# (so they are None there, and a value set must match the checkpoint).
MODEL_FIELDS = (
    ("depth", int, 50),
    ("width_multiplier", float, 1.0),
    ("cifar_stem", bool, None),  # None: image_size <= 32.
    # SimCLRv2's selective kernels (docs/simclr.md 5.3): 0 = plain ResNet;
    # 0.0625 = SK1, which also turns on ResNet-D (3x3 stem, avg-pool shortcuts).
    ("sk_ratio", float, 0.0),
    ("se_ratio", float, 0.0),  # Squeeze-excitation ratio; 0 = off.
    ("num_proj_layers", int, 3),  # 3 = SimCLRv2 head; 2 = SimCLRv1.
    ("proj_out_dim", int, 128),
    # Width of the head's hidden layers; 0 = the encoder's output width
    # (SimCLR). BYOL / NNCLR recipes use 4096 / 2048.
    ("proj_hidden_dim", int, 0),
    # What ends the head (jaxclr/models/heads.py OUTPUT_NORMS): 'bn'
    # (SimCLR), 'bn_no_affine' (SimSiam) or 'none' (Barlow Twins, VICReg).
    ("proj_output_norm", str, "bn"),
    ("bn_momentum", float, 0.9),
    ("bn_epsilon", float, 1e-5),
    ("compute_dtype", str, "float32"),  # 'bfloat16': bf16 compute, float32 params.
    # Recompute residual blocks in the backward (memory for FLOPs); changes
    # no value, so a run may resume with it flipped.
    ("remat", bool, False),
    # How convolutions get their kernel gradient: 'auto' (one matmul per
    # kernel tap in a one-device CPU job, XLA's own elsewhere), 'xla' or
    # 'patches' (jaxclr/models/conv.py); same values to float32 round-off.
    ("conv_kernel_grad", str, "auto"),
    # Which kernels run the float32 convolutions: 'auto'
    # (TensorFlow's oneDNN ones in a one-device CPU job, XLA's elsewhere),
    # 'xla' or 'onednn' (jaxclr/cpu/onednn_conv.py); same values to
    # float32 round-off.
    ("conv_library", str, "auto"),
)


def _add_job(c: ml_collections.ConfigDict, job: str) -> None:
  # Which entry point the config is for: 'pretrain' (jaxclr.main),
  # 'linear_eval' (jaxclr.linear_eval) or 'finetune' (jaxclr.finetune).
  c.job = job
  c.seed = 0


def _add_data_source(c: ml_collections.ConfigDict, *, dataset, image_size):
  """The data source fields; None values (evaluation jobs) take the
  pretraining run's value."""
  # 'imagenet2012', 'imagenet2012_subset/1pct', 'cifar10', 'cifar100', 'stl10',
  # 'digits' (embedded), 'synthetic', 'folder:/path', 'npz:/path.npz',
  # 'tfds:NAME'.
  c.dataset = dataset if dataset is not None else config_dict.placeholder(str)
  c.data_dir = config_dict.placeholder(str)
  # None: the dataset's own default (pretraining 'train', or 'unlabelled' for
  # stl10; labelled jobs 'train'; eval 'validation' for ImageNet, 'test' for
  # CIFAR/STL-10/digits).
  c.train_split = config_dict.placeholder(str)
  c.eval_split = config_dict.placeholder(str)
  # folder:/npz: data in one pile: hold out this fraction of each class
  # (stratified, fixed seed) as split 'holdout', the default eval split;
  # 0 = off. None (evaluation jobs): the pretraining run's value.
  c.holdout_fraction = (0.0 if dataset is not None
                        else config_dict.placeholder(float))
  # Evaluate (kNN, probes, fine-tuning) on the split trained on; else that
  # is refused (docs/data.md, "Held-out splits of your own data").
  c.allow_eval_on_train = False
  c.image_size = (image_size if image_size is not None
                  else config_dict.placeholder(int))


def _model(pretraining: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      name: (default if pretraining and default is not None
             else config_dict.placeholder(kind))
      for name, kind, default in MODEL_FIELDS})


def _add_encoder_source(c: ml_collections.ConfigDict) -> None:
  """Where an evaluation job's encoder comes from, and its architecture."""
  c.pretrained_workdir = config_dict.placeholder(str)  # 'none': random init.
  c.checkpoint_step = -1  # -1: the newest checkpoint.
  c.eval_batch_size = 256  # Feature extraction and evaluation batches.
  # Architecture: None takes the checkpoint's; set values must match it. A
  # random-init baseline (pretrained_workdir='none') needs them set.
  c.model = _model(pretraining=False)


def _add_optimization(c: ml_collections.ConfigDict, *, batch_size: int,
                      num_epochs: float, learning_rate: float,
                      learning_rate_scaling: str, warmup_epochs: float,
                      momentum: float, weight_decay: float) -> None:
  """Batch, duration and the warmup + cosine schedule's fields."""
  c.batch_size = batch_size  # Global, in images.
  c.num_epochs = num_epochs
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.learning_rate = learning_rate
  c.learning_rate_scaling = learning_rate_scaling  # 'linear': lr*B/256; 'sqrt': lr*sqrt(B).
  c.warmup_epochs = warmup_epochs
  c.momentum = momentum
  c.weight_decay = weight_decay


def _add_lars(c: ml_collections.ConfigDict) -> None:
  c.trust_coefficient = 1e-3  # LARS's eta.
  # solo-learn's clip_lr: each layer moves at min(eta|w| / (|g| + wd|w|),
  # lr) instead of lr x eta|w| / |g + wd w| (jaxclr.training.optim.lars).
  c.lars_clip_lr = False


def _add_loop(c: ml_collections.ConfigDict, *, log_every_steps: int,
              checkpoint_every_steps: int, max_checkpoints_to_keep: int,
              mesh_axis_type: str) -> None:
  """The training loop's logging, checkpoint and failure fields."""
  c.log_every_steps = log_every_steps
  c.checkpoint_every_steps = checkpoint_every_steps
  c.max_checkpoints_to_keep = max_checkpoints_to_keep
  c.nonfinite_policy = "stop"  # 'stop' or 'skip' the update.
  c.mesh_axis_type = mesh_axis_type  # 'explicit' or 'auto' data axis.
  # Resume a workdir whose config.json differs in fields that change results.
  c.allow_config_mismatch = False


def _add_method_sections(c: ml_collections.ConfigDict) -> None:
  """config.<name>: every registered method's section at its defaults."""
  from jaxclr import methods  # pylint: disable=g-import-not-at-top
  for method in methods.registered():
    if method.name in c:
      raise ValueError(f"method {method.name!r} cannot have a config section "
                       "of that name: it is a pretraining config field")
    c[method.name] = ml_collections.ConfigDict(dict(method.defaults()))


def method_section_names() -> tuple[str, ...]:
  """The pretraining config's method sections: one per registered method."""
  from jaxclr import methods  # pylint: disable=g-import-not-at-top
  return methods.names()


def pretrain_config() -> ml_collections.ConfigDict:
  """All pretraining fields with SimCLR's defaults (ImageNet, R-50)."""
  c = ml_collections.ConfigDict()
  _add_job(c, "pretrain")

  # ---- Data ----
  _add_data_source(c, dataset="imagenet2012", image_size=224)
  # TFDS access: 'auto' (array_record -> random access; tfrecord -> in memory
  # when small, else a layout-dependent stream), 'random', 'memory', 'stream'.
  c.data_access = "auto"
  c.shuffle_buffer_multiplier = 10  # tf.data streaming fallback only.
  c.synthetic = ml_collections.ConfigDict(dict(
      num_examples=1024, num_classes=10))

  # ---- Augmentation (docs/simclr.md section 4) ----
  c.augment = ml_collections.ConfigDict(dict(
      crop_area_range=(0.08, 1.0),
      crop_min_object_covered=0.1,
      crop_aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      flip=True,
      color_jitter_strength=1.0,
      color_jitter_prob=0.8,
      grayscale_prob=0.2,
      brightness_impl="simclrv2",  # 'simclrv2' multiplicative, 'simclrv1' additive.
      use_blur=True,
      blur_prob=0.5,
      blur_sigma_range=(0.1, 2.0),
      on_device=False,  # Colour/grayscale/blur in JAX on the accelerator.
      # Host -> device views: 'float32' (exact), or 'uint8' (rounded to the
      # nearest 1/255 on the host, scaled back on device): 4x fewer bytes to
      # batch, copy and transfer, which roughly doubles host throughput at
      # 224 px (benchmarks/RESULTS.md).
      transfer_dtype="float32",
      # Multi-crop (SwAV, DINO; methods that read local crops only): this
      # many local crops per image besides the two global views, each
      # local_crop_size px from an area fraction in local_crop_area_range
      # (SwAV's and DINO's ResNet-50 values: 6-8 x 96 px, 0.05-0.14);
      # crop_area_range is then the global crops' range. 0 = off.
      num_local_crops=0,
      local_crop_size=96,
      local_crop_area_range=(0.05, 0.14),
  ))

  # ---- Model (section 5) ----
  c.model = _model(pretraining=True)

  # ---- Method (docs/methods.md) ----
  # A registered method (jaxclr.methods.names()); its hyperparameters are
  # its own section, config.<method>, one per registered method (added
  # last, below).
  c.method = "simclr"
  # Online linear probe on stop_gradient(h) (TF2 lineareval_while_pretraining);
  # only active when the dataset has labels.
  c.linear_probe = True

  # ---- Optimisation (sections 2, 3): LARS ----
  _add_optimization(c, batch_size=4096, num_epochs=100, learning_rate=0.3,
                    learning_rate_scaling="linear", warmup_epochs=10.0,
                    momentum=0.9, weight_decay=1e-6)
  # 'lars' (SimCLR's) or 'sgd' (heavy-ball momentum, SupCon's recipe); both
  # decay the same parameters (jaxclr.training.optim.lars_mask).
  c.optimizer = "lars"
  _add_lars(c)  # optimizer='lars' only.

  # ---- Loop, logging, checkpoints ----
  _add_loop(c, log_every_steps=100, checkpoint_every_steps=1000,
            max_checkpoints_to_keep=3, mesh_axis_type="explicit")
  c.eval_every_steps = -1  # > 0: periodic kNN evaluation (labelled data only).
  _add_method_sections(c)
  return c


def linear_eval_config() -> ml_collections.ConfigDict:
  """All linear-evaluation fields (jaxclr.linear_eval): the paper protocol's
  defaults (P1 B.6), the fast probe, few-label probes and kNN."""
  c = ml_collections.ConfigDict()
  _add_job(c, "linear_eval")
  _add_encoder_source(c)
  _add_data_source(c, dataset=None, image_size=None)
  c.protocol = "fast"  # 'fast', 'paper' or 'knn'.
  c.feature_layer = 0  # 0: h; k: output of projection-head layer k.
  # Paper protocol (P1 B.6): SGD + Nesterov 0.9, lr 0.1 x B/256, cosine, no
  # warmup, no weight decay, crop + flip.
  _add_optimization(c, batch_size=256, num_epochs=100.0, learning_rate=0.1,
                    learning_rate_scaling="linear", warmup_epochs=0.0,
                    momentum=0.9, weight_decay=0.0)
  _add_loop(c, log_every_steps=50, checkpoint_every_steps=500,
            max_checkpoints_to_keep=2, mesh_axis_type="auto")
  # Fast protocol: L-BFGS logistic regression on standardised features.
  c.fast_l2 = 1e-3
  c.fast_max_iters = 500
  # Few-label probes (always the fast solver): k labels per class, draws.
  c.labels_per_class = (1, 5, 10)
  c.num_label_draws = 5
  # Weighted kNN (Wu et al. 2018).
  c.knn = True
  c.knn_k = 200
  c.knn_temperature = 0.1
  return c


def finetune_config() -> ml_collections.ConfigDict:
  """All fine-tuning fields (jaxclr.finetune): the paper's recipe (P1 B.5)."""
  c = ml_collections.ConfigDict()
  _add_job(c, "finetune")
  # Data and architecture: None takes the pretraining run's value. dataset
  # may name a TFDS subset (imagenet2012_subset/1pct) whose train split is
  # the labelled set.
  _add_encoder_source(c)
  _add_data_source(c, dataset=None, image_size=None)
  # Label subset: set exactly one of these, or a subset dataset.
  c.label_fraction = config_dict.placeholder(float)
  c.labels_per_class = config_dict.placeholder(int)
  # 0: classifier on h (head discarded); k: after projection-head layer k.
  c.ft_proj_selector = 1
  # Optimisation (P1 B.5). Steps = n_labelled x epochs // B + 1, as pretraining.
  c.optimizer = "momentum"  # 'momentum' (SGD + Nesterov) or 'lars'.
  _add_optimization(c, batch_size=32, num_epochs=60.0, learning_rate=0.05,
                    learning_rate_scaling="linear", warmup_epochs=0.0,
                    momentum=0.9, weight_decay=0.0)
  _add_lars(c)  # optimizer='lars' only.
  _add_loop(c, log_every_steps=10, checkpoint_every_steps=100,
            max_checkpoints_to_keep=2, mesh_axis_type="auto")
  return c


def distill_config() -> ml_collections.ConfigDict:
  """All distillation fields (jaxclr.distill): SimCLRv2 section 2.3,
  docs/simclrv2.md. A teacher labels the training images on the fly; the
  student fits its softened predictions."""
  c = ml_collections.ConfigDict()
  _add_job(c, "distill")
  # A finished jaxclr.finetune or jaxclr.distill workdir (its classifier), or
  # a pretraining-format workdir whose checkpoint holds a supervised head
  # (jaxclr.convert of an official checkpoint; pretraining with linear_probe).
  c.teacher_workdir = config_dict.placeholder(str)
  c.teacher_checkpoint_step = -1  # -1: the newest.
  # The student's start: pretrained_workdir 'teacher' (the teacher's own
  # pretrained encoder: self-distillation), another pretraining workdir, or
  # 'none' (random init of the model fields set here, e.g. a smaller ResNet).
  _add_encoder_source(c)
  c.pretrained_workdir = "teacher"
  # Data: None takes the student's pretraining run's (or the teacher's).
  _add_data_source(c, dataset=None, image_size=None)
  # 0: the student's classifier sees h; k: projection-head layer k.
  c.ft_proj_selector = 1
  # Loss: -sum softmax(t/T) log softmax(s/T), plus labelled_weight x the
  # cross-entropy on the labelled subset below (0: unlabelled images only,
  # the paper's setting).
  c.temperature = 1.0
  c.scale_by_temperature_squared = False  # The colab's T^2 factor.
  # What the teacher labels: 'same' (the student's augmented view, as the
  # SimCLRv2 colab) or 'clean' (the image as evaluation preprocesses it; the
  # student still sees the augmented view, as in Noisy Student).
  c.teacher_view = "same"
  c.labelled_weight = 0.0
  c.label_fraction = config_dict.placeholder(float)
  c.labels_per_class = config_dict.placeholder(int)
  # Optimisation: SGD + Nesterov over every training image per epoch.
  c.optimizer = "momentum"  # 'momentum' (SGD + Nesterov) or 'lars'.
  _add_optimization(c, batch_size=64, num_epochs=30.0, learning_rate=0.1,
                    learning_rate_scaling="linear", warmup_epochs=0.0,
                    momentum=0.9, weight_decay=0.0)
  _add_lars(c)  # optimizer='lars' only.
  _add_loop(c, log_every_steps=50, checkpoint_every_steps=200,
            max_checkpoints_to_keep=2, mesh_axis_type="auto")
  return c


_SCHEMAS = {"pretrain": pretrain_config, "linear_eval": linear_eval_config,
            "finetune": finetune_config, "distill": distill_config}


def job_schema(job: str) -> ml_collections.ConfigDict:
  """The schema (every field at its default) of `job`, one of JOBS."""
  if job not in _SCHEMAS:
    raise ValueError(f"job={job!r} is unknown; valid: {JOBS}")
  return _SCHEMAS[job]()


def set_digits_random_init(c: ml_collections.ConfigDict) -> None:
  """An eval config's architecture and data for a random-init baseline
  (pretrained_workdir='none'): configs/default.py's digits model (R-18 x0.25,
  CIFAR stem, 2-layer 64-d head) at 16 px (tests/configs_test.py checks that
  the two agree)."""
  c.model.update(depth=18, width_multiplier=0.25, cifar_stem=True,
                 num_proj_layers=2, proj_out_dim=64)
  c.dataset, c.image_size = "digits", 16


def cifar10_method_recipe(method: str, *, batch: int,
                          epochs: float) -> ml_collections.ConfigDict:
  """What the published CIFAR-10 R-18 recipes of BYOL, NNCLR and SupCon
  (configs/byol.py, nnclr.py, supcon.py) share: CIFAR stem at 32 px, 10
  warmup epochs, lr x B/256, wd 1e-5, SimCLR's CIFAR augmentation (colour
  0.5, no blur). Each config then sets its method's own fields."""
  c = pretrain_config()
  c.method = method
  c.dataset, c.eval_split, c.image_size = "cifar10", "test", 32
  c.batch_size, c.num_epochs, c.warmup_epochs = batch, epochs, 10.0
  c.learning_rate_scaling, c.weight_decay = "linear", 1e-5
  c.model.depth = 18
  c.augment.color_jitter_strength, c.augment.use_blur = 0.5, False
  c.log_every_steps, c.checkpoint_every_steps = 50, 1000
  return c
