"""SupCon on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
SupCon, linear top-1 93.82 after 1000 epochs).

  python -m jaxclr.main --config configs/supcon.py --workdir runs/supcon

Supervised contrastive learning: every view of the same class in the global
batch is a positive, so pretraining reads the labels. The loss is
solo-learn's, the positives' sum inside the log (supcon.form='in'; Khosla
et al.'s L_out is form='out'). ResNet-18 with the CIFAR stem, B=256, 1000
epochs (195,313 steps; 10 warmup epochs, 1,953 steps), SGD with momentum
0.9 (optimizer='sgd', not LARS), lr 0.4 x B/256, wd 1e-5, temperature 0.2;
projector Dense 2048 -> BN -> ReLU -> Dense 256 -> BN; colour 0.8 / 0.8 /
0.8 / 0.2 (strength 1.0) and blur with probability 0.5 on both views
(solo-learn's symmetric augmentation). Values from vturrisi/solo-learn
scripts/pretrain/cifar/supcon.yaml; the figure from its README's CIFAR-10
table. Requires the TFDS cifar10 dataset prepared in data_dir.
Where this differs from that recipe (docs/losses.md, "SupCon"): the
projector has SimCLR's BatchNorm layers; weight decay skips BatchNorm and
biases (SimCLR's exclusions); SimCLR's blur kernel (10% of the image side).
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
  c.supcon.temperature, c.supcon.form = 0.2, "in"
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  c.augment.color_jitter_strength = 1.0
  c.augment.use_blur, c.augment.blur_prob = True, 0.5
  return c
