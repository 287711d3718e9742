"""MoCo v2 on CIFAR-10: the published ResNet-18 recipe (solo-learn's CIFAR
MoCo v2+, linear top-1 92.94 after 1000 epochs).

  python -m jaxclr.main --config configs/mocov2.py --workdir runs/mocov2

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), SGD with momentum 0.9 (optimizer='sgd'), lr 0.3 x
B/256, wd 1e-4; projector Dense 2048 -> BN -> ReLU -> Dense 256 -> BN;
temperature 0.2, a queue of 32,768 keys per direction, symmetric loss (both
views query, as solo-learn's v2+), key-encoder momentum 0.99 -> 0.999
(cosine); colour strength 0.5 (0.4 / 0.4 / 0.4 / 0.1) and blur with
probability 0.5 on both views (solo-learn's symmetric_weak augmentation).
Values from vturrisi/solo-learn scripts/pretrain/cifar/mocov2plus.yaml; the
figure from its README's CIFAR-10 table. Requires the TFDS cifar10 dataset
prepared in data_dir.
Where this differs from that recipe (docs/losses.md, "MoCo v2"): the
projector has BatchNorm after each Dense (SimCLR's head, which evaluation
reads; solo-learn's is Dense -> ReLU -> Dense); weight decay skips
BatchNorm and biases; SimCLR's blur kernel (10% of the image side);
classic momentum (the learning rate inside the momentum trace).
The paper's own form (one direction, constant m 0.999, queue 65,536) is
the mocov2 section's default and configs/imagenet.py:method=mocov2.
Arguments (e.g. configs/mocov2.py:epochs=200):
  batch=B      global batch size (default 256; the queue stays 32,768
               rounded down to whole batches)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("mocov2", batch=arg.batch,
                                       epochs=arg.epochs)
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.3, 0.9
  c.weight_decay = 1e-4
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  c.mocov2.update(temperature=0.2, tau_base=0.99, tau_final=0.999,
                  symmetric=True,
                  queue_size=max(1, 32768 // arg.batch) * arg.batch)
  c.augment.use_blur, c.augment.blur_prob = True, 0.5
  return c
