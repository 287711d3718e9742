"""SupCon on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
SupCon, linear top-1 93.8 after 1000 epochs).

  python -m jaxclr.main --config configs/supcon.py --workdir runs/supcon

Supervised contrastive learning (Khosla et al. 2020, L_out): every view of
the same class in the global batch is a positive, so pretraining reads the
labels. ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps;
10 warmup epochs, 1,953 steps), SGD with momentum 0.9 (optimizer='sgd', not
LARS), lr 0.4 x B/256, wd 1e-5, temperature 0.2; projector Dense 2048 ->
BN -> ReLU -> Dense 256 -> BN. Requires the TFDS cifar10 dataset prepared
in data_dir.
Where this differs from the published recipe (docs/losses.md, "SupCon"):
the projector has SimCLR's BatchNorm layers; weight decay skips BatchNorm
and biases (SimCLR's exclusions); both views get SimCLR's CIFAR
augmentation (colour strength 0.5, no blur).
Arguments (e.g. configs/supcon.py:epochs=200):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("supcon", batch=arg.batch,
                                       epochs=arg.epochs)
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.4, 0.9
  c.supcon.temperature = 0.2
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  return c
