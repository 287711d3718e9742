"""Evaluate a pretrained encoder: linear probe, few-label probes, kNN.

  python -m jaxclr.linear_eval --config configs/linear_eval.py \
      --config.pretrained_workdir=runs/digits --workdir runs/digits_eval

The architecture, dataset and image size come from the pretraining workdir's
config.json; fields set here must agree with it (or they raise). Arguments:
  dataset=cifar10|imagenet  the paper protocol's epochs and batch for it
                            (100 epochs B=512 / 90 epochs B=4096)
  protocol=fast|paper|knn   fast (default): features once + L-BFGS logistic
                            regression; paper: SGD-Nesterov on crop+flip views;
                            knn: the weighted kNN alone (top1/top5 null)
  random_init               random-init baseline of the default digits model:
                            also pass --config.pretrained_workdir=none
Writes OUT/results.json: top1, top5, knn_top1, few_label_top1 {"1", "5",
"10"}, few_label_top1_std, checkpoint_step, protocol, wall times.
Cost on the 2-core CPU for the digits default (16 px, R18 x0.25): ~50 s
for the fast protocol with few-label probes and kNN (README, Evaluation).
Several processes (jax.distributed, e.g. launch/local.sh 2 4 with
JAXCLR_MODULE=jaxclr.linear_eval) give the same results as one.
"""

import ml_collections
from ml_collections import config_dict

from jaxclr import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dataset="digits", protocol="fast",
                             random_init=False)
  c = ml_collections.ConfigDict()
  c.pretrained_workdir = config_dict.placeholder(str)  # 'none': random init.
  c.checkpoint_step = -1  # -1: the newest checkpoint.
  c.protocol = arg.protocol  # 'fast', 'paper' or 'knn'.
  c.feature_layer = 0  # 0: h; k: output of projection-head layer k.
  c.seed = 0
  # Data: None takes the pretraining run's value.
  c.dataset = config_dict.placeholder(str)
  c.data_dir = config_dict.placeholder(str)
  c.train_split = config_dict.placeholder(str)
  c.eval_split = config_dict.placeholder(str)
  c.image_size = config_dict.placeholder(int)
  c.eval_batch_size = 256
  # Architecture: None takes the checkpoint's; set values must match it. A
  # random-init baseline (pretrained_workdir='none') needs them set.
  c.model = ml_collections.ConfigDict(dict(
      depth=config_dict.placeholder(int),
      width_multiplier=config_dict.placeholder(float),
      cifar_stem=config_dict.placeholder(bool),
      num_proj_layers=config_dict.placeholder(int),
      proj_out_dim=config_dict.placeholder(int),
      bn_momentum=config_dict.placeholder(float),
      bn_epsilon=config_dict.placeholder(float),
      compute_dtype=config_dict.placeholder(str)))
  # Paper protocol (P1 B.6): SGD + Nesterov 0.9, lr 0.1 x B/256, cosine, no
  # warmup, no weight decay, crop + flip.
  c.batch_size = 256
  c.num_epochs = 100.0
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
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
  if arg.dataset == "cifar10":
    c.batch_size, c.num_epochs = 512, 100.0
  elif arg.dataset == "imagenet":
    c.batch_size, c.num_epochs = 4096, 90.0
    c.labels_per_class = ()  # Too many classes for the in-memory probes.
    c.knn = False
  elif arg.dataset == "digits":
    c.num_epochs = 30.0  # 150 steps at B=256 (5 steps per epoch).
  else:
    raise ValueError(f"dataset={arg.dataset!r}; valid: digits, cifar10, imagenet")
  if arg.random_init:  # The default digits architecture (configs/default.py).
    c.model.update(depth=18, width_multiplier=0.25, cifar_stem=True,
                   num_proj_layers=2, proj_out_dim=64)
    c.dataset, c.image_size = "digits", 16
  return c
