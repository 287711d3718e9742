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


def imagenet_recipe(c):
  """configs/imagenet.py:method=barlow_twins: the authors' released command
  (facebookresearch/barlowtwins at f13c949, README: `main.py --epochs 1000
  --batch-size 2048 --learning-rate 0.2 --lambd 0.0051 --projector
  8192-8192-8192 --scale-loss 0.024`, 73.3% linear top-1; the paper's
  Table 1 gives 73.2%).

  R-50, B=2048, 1000 epochs, 10 warmup epochs, LARS lr 0.2 x B/256 (trust
  coefficient 0.001), wd 1e-6, projector 8192-8192-8192 with no BN on z,
  lambda 0.0051, loss scale 0.024. That command's one learning rate with a
  loss scale is what jaxclr's single learning rate can express; the
  authors' later main.py drops the scale for a separate learning rate of
  biases and BN (0.0048 = 0.2 x 0.024, which the scale gives them under
  LARS, since their updates are not trust-ratio normalised). The paper
  says lambda 5e-3 and wd 1.5e-6; this follows the code. Colour strength
  0.5 is BYOL's jitter (0.4, 0.4, 0.2 -> 0.4, 0.1), which Barlow Twins
  uses, symmetric: no solarisation, blur 0.5 on both views, the cosine
  decays to 0 (the authors': to 1/1000).
  """
  c.batch_size, c.num_epochs, c.warmup_epochs = 2048, 1000, 10.0
  c.learning_rate, c.learning_rate_scaling = 0.2, "linear"
  c.weight_decay, c.trust_coefficient = 1e-6, 1e-3
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 8192
  c.model.proj_output_norm = "none"
  c.barlow_twins.barlow_lambda = 0.0051
  c.barlow_twins.barlow_scale = 0.024
  c.augment.color_jitter_strength = 0.5
