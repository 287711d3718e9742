"""SwAV on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
SwAV, scripts/pretrain/cifar/swav.yaml: linear top-1 89.17 after 1000
epochs, two crops, no multi-crop).

  python -m jaxclr.main --config configs/swav.py --workdir runs/swav

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), LARS lr 0.6 x B/256, wd 1e-6, trust coefficient
0.02; projector Dense 2048 -> BN -> ReLU -> Dense 128, 3,000 prototypes,
temperature 0.1, Sinkhorn epsilon 0.05 with 3 iterations, a queue of 3,840
projections per global crop from epoch 50, prototypes frozen for the first
2 epochs; colour strength 1.0 and blur p=0.5 (solo-learn's symmetric CIFAR
augmentation). Requires the TFDS cifar10 dataset prepared in data_dir.
Where this differs from the published recipe (docs/methods.md, "SwAV"):
the projector ends in BatchNorm (SimCLR's head); the queue joins Sinkhorn
once full, as main_swav.py (solo-learn uses it from its first epoch).
Arguments (e.g. configs/swav.py:epochs=200,local_crops=6):
  batch=B      global batch size (default 256; the queue stays 3,840
               rounded down to whole batches)
  epochs=E     training epochs (default 1000)
  local_crops=0|6
               multi-crop local views of 18 px (area 0.08-0.5, as
               solo-learn's cifar-multicrop/swav.yaml) besides the two
               32 px ones (default 0: the published recipe)
ImageNet: configs/imagenet.py:method=swav (its recipe is in that file).
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000, local_crops=0)
  c = config_lib.cifar10_method_recipe("swav", batch=arg.batch,
                                       epochs=arg.epochs)
  c.learning_rate, c.weight_decay, c.trust_coefficient = 0.6, 1e-6, 0.02
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 128
  c.augment.update(color_jitter_strength=1.0, use_blur=True, blur_prob=0.5)
  c.swav.update(num_prototypes=3000, temperature=0.1,
                queue_size=max(1, 3840 // arg.batch) * arg.batch,
                queue_start_epoch=50, freeze_prototypes_epochs=2.0)
  if arg.local_crops:
    c.augment.update(num_local_crops=arg.local_crops, local_crop_size=18,
                     local_crop_area_range=(0.08, 0.5))
  return c
