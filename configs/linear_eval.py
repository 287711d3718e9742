"""Evaluate a pretrained encoder: linear probe, few-label probes, kNN.

  python -m jaxclr.linear_eval --config configs/linear_eval.py \
      --config.pretrained_workdir=runs/digits --workdir runs/digits_eval

The architecture, dataset and image size come from the pretraining workdir's
config.json; fields set here must agree with it (or they raise).
Arguments:
  dataset=digits|cifar10|imagenet
                            the paper protocol's epochs and batch for it
                            (digits, the default: 30 epochs B=256; 100
                            epochs B=512 / 90 epochs B=4096)
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

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dataset="digits", protocol="fast",
                             random_init=False)
  # The schema's defaults: paper protocol (P1 B.6) at B=256 for 100 epochs,
  # fast L-BFGS probe, few-label probes (1, 5, 10 per class, 5 draws), kNN
  # k=200; data and architecture None: the checkpoint's.
  c = config_lib.linear_eval_config()
  c.protocol = arg.protocol  # 'fast', 'paper' or 'knn'.
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
    config_lib.set_digits_random_init(c)
  return c
