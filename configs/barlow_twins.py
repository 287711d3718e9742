"""Barlow Twins on CIFAR-10: solo-learn's ResNet-18 recipe
(scripts/pretrain/cifar/barlow.yaml; linear top-1 92.10 after 1000 epochs,
the CIFAR-10 table of solo-learn's README), the figure it targets.

  python -m jaxclr.main --config configs/barlow_twins.py --workdir runs/barlow_twins

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 0.3 x B/256, wd 1e-4, trust coefficient 0.02,
biases and BN excluded from decay and adaptation; projector Dense 2048 -> BN
-> ReLU -> Dense 2048 -> BN -> ReLU -> Dense 2048, with no BN on z (the loss
standardises); lambda 0.0051 and the loss scaled by 0.1 (solo-learn's
scale_loss; the authors' code has no scale). Requires the TFDS cifar10
dataset prepared in data_dir.
Where this differs from solo-learn's recipe (docs/losses.md, "Barlow
Twins"): both views get SimCLR's CIFAR augmentation (colour strength 0.5,
no blur), not solo-learn's asymmetric one (solarisation on one view,
saturation 0.2); LARS without solo-learn's clip_lr; the loss standardises
over the global batch, where solo-learn's standardises each device's rows
(the same on its one GPU); BatchNorm in the network normalises the two
views together, not each view alone.
Arguments (e.g. configs/barlow_twins.py:epochs=200):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("barlow_twins", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.trust_coefficient, c.weight_decay = 0.3, 0.02, 1e-4
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 2048
  c.model.proj_output_norm = "none"
  c.barlow_twins.barlow_lambda = 0.0051
  c.barlow_twins.barlow_scale = 0.1
  return c
