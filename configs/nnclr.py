"""NNCLR on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
NNCLR, linear top-1 91.9 after 1000 epochs).

  python -m jaxclr.main --config configs/nnclr.py --workdir runs/nnclr

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 0.4 x B/256 with solo-learn's clip_lr
(lars_clip_lr), wd 1e-5, trust coefficient 0.02, temperature 0.2; projector 3 layers (Dense 2048 -> BN -> ReLU, twice, -> Dense 256 ->
BN), predictor Dense 4096 -> BN -> ReLU -> Dense 256; support set of
65,536 view-1 projections (256 global batches). Values from
vturrisi/solo-learn scripts/pretrain/cifar/nnclr.yaml. Requires the TFDS
cifar10 dataset prepared in data_dir.
Where this differs from the published recipe (docs/losses.md, "NNCLR"):
both views get the same SimCLR CIFAR augmentation (colour strength 0.5, no
blur), not solo-learn's asymmetric one (saturation 0.2, solarisation 0.2
on the second view); both views share one BatchNorm batch (solo-learn runs
the network per view); classic momentum.
Arguments (e.g. configs/nnclr.py:epochs=200):
  batch=B      global batch size (default 256; the support set stays
               65,536 rounded down to whole batches)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("nnclr", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.trust_coefficient = 0.4, 0.02
  c.lars_clip_lr = True
  c.nnclr.temperature = 0.2
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  c.nnclr.predictor_hidden_dim = 4096
  c.nnclr.queue_size = max(1, 65536 // arg.batch) * arg.batch
  return c
