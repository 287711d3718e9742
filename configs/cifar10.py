"""SimCLR on CIFAR-10: the official README recipe.

  python -m jaxclr.main --config configs/cifar10.py --workdir runs/cifar10

ResNet-18 with the CIFAR stem, B=512, LARS lr 1.0 x B/256 (peak 2.0),
wd 1e-4, 3-layer projection head, tau=0.5, 1000 epochs (97,657 steps, 976
warmup), colour strength 0.5, no blur: the current official README command
(its v2 code, whose head has 3 layers by default). The first release's README
used wd 1e-6 and the 2-layer v1 head: the argument v1. The reference reports
~91% linear top-1 for this recipe. Requires the TFDS cifar10 dataset prepared
in data_dir.
Arguments (e.g. configs/cifar10.py:depth=50,epochs=500):
  depth=D      ResNet depth (default 18)
  batch=B      global batch size (default 512)
  epochs=E     training epochs (default 1000)
  v1           the first release's README: wd 1e-6, 2-layer head
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, depth=18, batch=512, epochs=1000, v1=False)
  c = config_lib.pretrain_config()
  c.dataset = "cifar10"
  c.eval_split = "test"
  c.image_size = 32
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.learning_rate = 1.0
  c.learning_rate_scaling = "linear"
  c.weight_decay = 1e-6 if arg.v1 else 1e-4
  c.simclr.temperature = 0.5
  c.model.depth = arg.depth
  c.model.num_proj_layers = 2 if arg.v1 else 3
  c.augment.color_jitter_strength = 0.5
  c.augment.use_blur = False
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  return c
