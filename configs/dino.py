"""DINO on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
DINO, scripts/pretrain/cifar/dino.yaml: linear top-1 89.52 after 1000
epochs, two crops, no multi-crop).

  python -m jaxclr.main --config configs/dino.py --workdir runs/dino

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 0.3 x B/256, wd 1e-6, trust coefficient
0.02; head Dense 2048 -> Dense 2048 -> Dense 256 (the bottleneck), then a
weight-normalised layer of 4,096 prototypes; student temperature 0.1,
teacher 0.07 from the start (solo-learn's warm-up of 0 epochs), centre
momentum 0.9, teacher EMA 0.9995 -> 1 (cosine), last layer frozen for the
first epoch. Requires the TFDS cifar10 dataset prepared in data_dir.
Where this differs from the published recipe (docs/methods.md, "DINO"):
the head is SimCLR's (BatchNorm + ReLU after each Dense, BN on the
bottleneck; solo-learn's has GELU and no BN); both views get SimCLR's CIFAR
augmentation (colour strength 0.5, no blur), not the asymmetric one with
solarisation on the second view.
Arguments (e.g. configs/dino.py:epochs=200,local_crops=6):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
  local_crops=0|6
               multi-crop local views of 18 px (area 0.08-0.5, as
               solo-learn's CIFAR multi-crop) besides the two 32 px ones
               (default 0: the published recipe)
ImageNet: configs/imagenet.py:method=dino (its recipe is in that file).
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000, local_crops=0)
  c = config_lib.cifar10_method_recipe("dino", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.weight_decay, c.trust_coefficient = 0.3, 1e-6, 0.02
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  c.dino.update(num_prototypes=4096, tau_base=0.9995,
                teacher_temperature=0.07,
                warmup_teacher_temperature_epochs=0)
  if arg.local_crops:
    c.augment.update(num_local_crops=arg.local_crops, local_crop_size=18,
                     local_crop_area_range=(0.08, 0.5))
  return c
