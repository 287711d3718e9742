"""Semi-supervised fine-tuning of all layers on a label subset.

  python -m jaxclr.finetune --config configs/finetune.py \
      --config.pretrained_workdir=runs/default --workdir runs/default_ft

Encoder + first ft_proj_selector projection-head layers + a zero-initialised
linear classifier, all trained (BN in training mode, global), on random crop +
flip views of a class-balanced label subset; centre-crop eval. The
architecture, dataset and image size come from the pretraining workdir's
config.json. Three protocols, each named by what it follows:
  v1      SimCLR (P1 B.5): from h (ft_proj_selector=0), SGD + Nesterov 0.9,
          lr 0.05 x B/256, B=4096 on ImageNet, no warmup, no weight decay,
          60 epochs for 1% labels and 30 for 10%. P1 Table B.4, R-50 1x,
          1% / 10%: 48.3 / 65.6% top-1.
  v2      SimCLRv2 (official README command and the paper's text): from
          projection-head layer 1 (ft_proj_selector=1), LARS lr 0.005 x
          sqrt(B), B=1024 on ImageNet (peak 0.16), wd 0, no warmup, 60
          epochs for 1% and 30 for 10%. P2 Table 1, R-50 1x SK0, 1% / 10%:
          57.9 / 68.4% top-1.
  digits  the default off ImageNet: v1's optimiser (SGD-Nesterov, 0.05 x
          B/256) from v2's head layer 1, which measured best on digits
          (docs/evaluation.md, "What fine-tuning reaches on digits").
Arguments:
  protocol=digits|v1|v2  the recipe above (default: digits; v1 with 1pct /
                      10pct)
  per_class=K         K labels per class (class-balanced, drawn from the seed)
  fraction=F          a class-balanced fraction F of the labels (0 < F <= 1)
  1pct / 10pct        ImageNet: TFDS imagenet2012_subset/1pct or /10pct as the
                      training set, at the protocol's batch and epochs
  random_init         the default digits architecture from random init; also
                      pass --config.pretrained_workdir=none
Digits default (configs/default.py's model): 10 labels per class (100 of the
1,347 training images), B=32, 60 epochs = 188 steps, lr 0.05 x 32/256 =
0.00625, ft_proj_selector=1: the paper's 1% run scaled down, which is also
188 steps (12,811 x 60 // 4096 + 1) at B/N = 0.32 (4096/12,811; here 32/100).
Measured results (digits, pretrained vs random init) are in docs/evaluation.md.
Writes OUT/results.json: top1, top5, label_subset, num_labelled_examples,
peak_learning_rate, steps, wall_times, ... (and the linear-eval keys
knn_top1=None, few_label_top1={}).
"""

from jaxclr import config as config_lib

PROTOCOLS = ("digits", "v1", "v2")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, protocol="", per_class=-1, fraction=-1.0,
                             random_init=False, **{"1pct": False,
                                                   "10pct": False})
  imagenet_subset = arg["1pct"] or arg["10pct"]
  protocol = arg.protocol or ("v1" if imagenet_subset else "digits")
  if protocol not in PROTOCOLS:
    raise ValueError(f"configs/finetune.py: protocol={protocol!r} is unknown; "
                     f"valid: {', '.join(PROTOCOLS)}")
  # The schema's defaults are the digits protocol: SGD + Nesterov 0.9, B=32,
  # 60 epochs, lr 0.05 x B/256, no warmup, no weight decay,
  # ft_proj_selector=1. Data and architecture: None takes the pretraining
  # run's value; a model field set here must match the checkpoint.
  c = config_lib.finetune_config()
  if protocol == "v1":
    c.ft_proj_selector = 0
  elif protocol == "v2":
    c.ft_proj_selector = 1
    c.optimizer, c.learning_rate = "lars", 0.005
    c.learning_rate_scaling = "sqrt"
  if arg.random_init:
    # The default digits architecture (configs/default.py), and dataset
    # digits at 16 px.
    config_lib.set_digits_random_init(c)
  # Label subset: a subset dataset (1pct / 10pct), else 10 per class.
  if imagenet_subset:
    c.dataset = ("imagenet2012_subset/1pct" if arg["1pct"] else
                 "imagenet2012_subset/10pct")
    c.batch_size = 1024 if protocol == "v2" else 4096
    c.num_epochs = 60.0 if arg["1pct"] else 30.0
    c.eval_batch_size = 1024
  else:
    c.labels_per_class = 10
  if arg.per_class > 0:
    c.label_fraction, c.labels_per_class = None, arg.per_class
    # A batch no larger than the subset of a 10-class dataset (digits).
    c.batch_size = min(c.batch_size, 10 * arg.per_class)
  if arg.fraction > 0:
    c.label_fraction, c.labels_per_class = arg.fraction, None
    c.num_epochs = 30.0 if arg.fraction >= 0.1 else 60.0  # P1 B.5.
  return c
