"""BYOL on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
BYOL, linear top-1 92.6 after 1000 epochs).

  python -m jaxclr.main --config configs/byol.py --workdir runs/byol

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 1.0 x B/256 with solo-learn's clip_lr
(lars_clip_lr), wd 1e-5, trust coefficient 0.02; projector Dense 4096 ->
BN -> ReLU -> Dense 256 -> BN, predictor Dense 4096 -> BN -> ReLU -> Dense
256; target EMA tau 0.99 -> 1.0 (cosine); BatchNorm per view. Values from
vturrisi/solo-learn scripts/pretrain/cifar/byol.yaml. Requires the TFDS
cifar10 dataset prepared in data_dir.
Where this differs from the published recipe (docs/losses.md, "BYOL"):
the projector ends in BatchNorm (SimCLR's head, which jaxclr's evaluation
jobs read); both views get the same SimCLR CIFAR augmentation (colour
strength 0.5, no blur), not solo-learn's asymmetric one (saturation 0.2,
solarisation 0.2 on the second view); classic momentum.
Arguments (e.g. configs/byol.py:epochs=200):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("byol", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.trust_coefficient = 1.0, 0.02
  c.lars_clip_lr = True
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 4096, 256
  c.byol.predictor_hidden_dim = 4096
  c.byol.tau_base = 0.99
  return c
