"""VICReg on CIFAR-10: solo-learn's ResNet-18 recipe
(scripts/pretrain/cifar/vicreg.yaml; linear top-1 92.07 after 1000 epochs,
the CIFAR-10 table of solo-learn's README), the figure it targets.

  python -m jaxclr.main --config configs/vicreg.py --workdir runs/vicreg

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 0.3 x B/256, wd 1e-4, trust coefficient 0.02,
biases and BN excluded from decay and adaptation; projector Dense 2048 -> BN
-> ReLU -> Dense 2048 -> BN -> ReLU -> Dense 2048, with no BN on z;
invariance 25, variance 50, covariance 1: solo-learn's weights 25 / 25 / 1,
with its variance term summed over the two views where the authors' code
(and jaxclr) averages them, so its 25 is 50 here. Requires the TFDS
cifar10 dataset prepared in data_dir.
Where this differs from solo-learn's recipe (docs/losses.md, "VICReg"):
both views get SimCLR's CIFAR augmentation (colour strength 0.5, no blur)
with solo-learn's crops (from 20% of the image), without its solarisation
(0.1) and with saturation 0.4 (its 0.2); LARS without solo-learn's clip_lr;
BatchNorm in the network normalises the two views together, not each view
alone.
Arguments (e.g. configs/vicreg.py:epochs=200):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("vicreg", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.trust_coefficient, c.weight_decay = 0.3, 0.02, 1e-4
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 2048
  c.model.proj_output_norm = "none"
  c.augment.crop_area_range = (0.2, 1.0)
  c.vicreg.invariance_weight = 25.0
  c.vicreg.variance_weight = 50.0  # solo-learn's 25 on a sum of two views.
  c.vicreg.covariance_weight = 1.0
  return c
