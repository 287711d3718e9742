"""SimSiam on CIFAR-10: solo-learn's ResNet-18 recipe
(scripts/pretrain/cifar/simsiam.yaml; linear top-1 90.51 after 1000
epochs, the CIFAR-10 table of solo-learn's README), the figure it targets.

  python -m jaxclr.main --config configs/simsiam.py --workdir runs/simsiam

ResNet-18 with the CIFAR stem, B=256, 1000 epochs (195,313 steps; 10 warmup
epochs, 1,953 steps), SGD with momentum 0.9, lr 0.5 x B/256, wd 1e-5;
projector Dense 2048 -> BN -> ReLU -> Dense 2048 -> BN -> ReLU -> Dense
2048 -> BN without scale or offset, predictor Dense 512 -> BN -> ReLU ->
Dense 2048 (a bottleneck); colour strength 0.5 (solo-learn's jitter 0.4,
0.4, 0.4, 0.1) and blur with probability 0.5 on both views, as its
symmetric_weak augmentation. Requires the TFDS cifar10 dataset prepared in
data_dir.
Where this differs from solo-learn's recipe (docs/losses.md, "SimSiam"):
the predictor learns on the schedule like the rest (solo-learn and the
paper keep its learning rate fixed); its last Dense has no bias; weight
decay skips biases and BN (solo-learn decays them); the blur kernel is
SimCLR's (10% of the image); BatchNorm normalises the two views together,
not each view alone.
Arguments (e.g. configs/simsiam.py:epochs=200):
  batch=B      global batch size (default 256)
  epochs=E     training epochs (default 1000)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, epochs=1000)
  c = config_lib.cifar10_method_recipe("simsiam", batch=arg.batch,
                                       epochs=arg.epochs)
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.5, 0.9
  c.weight_decay = 1e-5
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 2048
  c.model.proj_output_norm = "bn_no_affine"
  c.simsiam.predictor_hidden_dim = 512
  c.augment.use_blur, c.augment.blur_prob = True, 0.5
  return c
