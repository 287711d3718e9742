"""MoCo v3 on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
MoCo v3, linear top-1 93.10 after 1000 epochs).

  python -m jaxclr.main --config configs/mocov3.py --workdir runs/mocov3

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 0.3 x B/256 with solo-learn's clip_lr
(lars_clip_lr), trust coefficient 0.02, wd 1e-6; projector Dense 4096 ->
BN -> ReLU -> Dense 256 -> BN, predictor Dense 4096 -> BN -> ReLU -> Dense
256; temperature 0.2; momentum encoder 0.99 -> 1 (cosine). Values from
vturrisi/solo-learn scripts/pretrain/cifar/mocov3.yaml; the figure from its
README's CIFAR-10 table. Requires the TFDS cifar10 dataset prepared in
data_dir.
Where this differs from that recipe (docs/losses.md, "MoCo v3"): both views
get the same augmentation, colour 0.4 / 0.4 / 0.4 / 0.1 (strength 0.5) and
no blur, where solo-learn's asymmetric one has saturation 0.2 and
solarises the second view with probability 0.2; the projector's last
BatchNorm has a scale (solo-learn's: none); classic momentum.
Arguments (e.g. configs/mocov3.py:epochs=200):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("mocov3", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.weight_decay = 0.3, 1e-6
  c.trust_coefficient, c.lars_clip_lr = 0.02, True
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 4096, 256
  c.mocov3.update(temperature=0.2, tau_base=0.99, tau_final=1.0,
                  predictor_hidden_dim=4096)
  return c
