"""Semi-supervised fine-tuning of all layers on a label subset.

  python -m jaxclr.finetune --config configs/finetune.py \
      --config.pretrained_workdir=runs/default --workdir runs/default_ft

Encoder + first ft_proj_selector projection-head layers + a zero-initialised
linear classifier, all trained (BN in training mode, global), on random crop +
flip views of a class-balanced label subset; centre-crop eval. Paper recipe
(P1 B.5): SGD, Nesterov 0.9, lr 0.05 x B/256, no warmup, cosine, no weight
decay, 60 epochs for 1% labels and 30 for 10%. The architecture, dataset and
image size come from the pretraining workdir's config.json.
Arguments:
  per_class=K         K labels per class (class-balanced, drawn from the seed)
  fraction=F          a class-balanced fraction F of the labels (0 < F <= 1)
  1pct / 10pct        ImageNet: TFDS imagenet2012_subset/1pct or /10pct as the
                      training set, B=4096, 60 / 30 epochs, lr 0.8 (0.05 x
                      4096/256), ft_proj_selector=1 (SimCLRv2)
  lars                SimCLRv2 README's alternative: LARS, lr 0.005 x sqrt(B)
  random_init         the default digits architecture from random init; also
                      pass --config.pretrained_workdir=none
Digits default (configs/default.py's model): 10 labels per class (100
images), B=32, 60 epochs (188 steps), ft_proj_selector=1.
Writes OUT/results.json: top1, top5, label_subset, num_labelled_examples,
peak_learning_rate, steps, wall_times, ... (and the linear-eval keys
knn_top1=None, few_label_top1={}).
"""

import ml_collections
from ml_collections import config_dict

from jaxclr import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, per_class=-1, fraction=-1.0, lars=False,
                             random_init=False, **{"1pct": False,
                                                   "10pct": False})
  c = ml_collections.ConfigDict()
  c.pretrained_workdir = config_dict.placeholder(str)  # 'none': random init.
  c.checkpoint_step = -1  # -1: the newest checkpoint.
  c.seed = 0
  # Label subset: set exactly one of these, or a subset dataset below.
  c.label_fraction = config_dict.placeholder(float)
  c.labels_per_class = config_dict.placeholder(int)
  # 0: classifier on h (head discarded); k: after projection-head layer k.
  c.ft_proj_selector = 1
  # Data: None takes the pretraining run's value. dataset may name a TFDS
  # subset (imagenet2012_subset/1pct) whose train split is the labelled set.
  c.dataset = config_dict.placeholder(str)
  c.data_dir = config_dict.placeholder(str)
  c.train_split = config_dict.placeholder(str)
  c.eval_split = config_dict.placeholder(str)
  c.image_size = config_dict.placeholder(int)
  c.eval_batch_size = 256
  # Architecture: None takes the checkpoint's; set values must match it.
  c.model = ml_collections.ConfigDict(dict(
      depth=config_dict.placeholder(int),
      width_multiplier=config_dict.placeholder(float),
      cifar_stem=config_dict.placeholder(bool),
      num_proj_layers=config_dict.placeholder(int),
      proj_out_dim=config_dict.placeholder(int),
      bn_momentum=config_dict.placeholder(float),
      bn_epsilon=config_dict.placeholder(float),
      compute_dtype=config_dict.placeholder(str)))
  # Optimisation (P1 B.5). Steps = n_labelled x epochs // B + 1, as pretraining.
  c.optimizer = "momentum"  # 'momentum' (SGD + Nesterov) or 'lars'.
  c.batch_size = 32
  c.num_epochs = 60.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.learning_rate = 0.05
  c.learning_rate_scaling = "linear"  # lr x B/256; 'sqrt': lr x sqrt(B).
  c.warmup_epochs = 0.0
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.trust_coefficient = 1e-3  # LARS only.
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.max_checkpoints_to_keep = 2
  if arg["1pct"] or arg["10pct"]:
    c.dataset = ("imagenet2012_subset/1pct" if arg["1pct"] else
                 "imagenet2012_subset/10pct")
    c.batch_size, c.num_epochs = 4096, 60.0 if arg["1pct"] else 30.0
    c.eval_batch_size = 1024
    c.log_every_steps, c.checkpoint_every_steps = 10, 100
  else:
    c.labels_per_class = 10
  if arg.per_class > 0:
    c.label_fraction, c.labels_per_class, c.dataset = None, arg.per_class, None
  if arg.fraction > 0:
    c.label_fraction, c.labels_per_class, c.dataset = arg.fraction, None, None
  if arg.lars:  # SimCLRv2 README: LARS, lr 0.005 sqrt-scaled, wd 0.
    c.optimizer, c.learning_rate, c.learning_rate_scaling = "lars", 0.005, "sqrt"
  if arg.random_init:  # The default digits architecture (configs/default.py).
    c.model.update(depth=18, width_multiplier=0.25, cifar_stem=True,
                   num_proj_layers=2, proj_out_dim=64)
    c.dataset, c.image_size = "digits", 16
  return c
