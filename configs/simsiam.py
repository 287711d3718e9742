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


def imagenet_recipe(c):
  """configs/imagenet.py:method=simsiam: the paper's ImageNet recipe, as the
  authors' code defaults it (facebookresearch/simsiam `main_simsiam.py`,
  `simsiam/builder.py`; 68.1% linear top-1 after 100 epochs at B=512, the
  README's table and the paper's Table 4).

  R-50, B=512, 100 epochs, SGD with momentum 0.9, lr 0.05 x B/256, wd
  1e-4, cosine decay with no warmup; projector 2048-2048-2048 ending in BN
  without scale or offset, predictor 2048 -> 512 -> 2048; MoCo v2's
  augmentation (crops from 20% of the image, colour jitter 0.4, 0.4, 0.4,
  0.1 = strength 0.5, blur 0.5). Not expressed: the predictor's fixed
  learning rate (--fix-pred-lr), weight decay on biases and BN, the bias of
  the predictor's last Dense.
  """
  c.batch_size, c.num_epochs, c.warmup_epochs = 512, 100, 0.0
  c.optimizer, c.learning_rate, c.learning_rate_scaling = "sgd", 0.05, "linear"
  c.momentum, c.weight_decay = 0.9, 1e-4
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 2048
  c.model.proj_output_norm = "bn_no_affine"
  c.simsiam.predictor_hidden_dim = 512
  c.augment.crop_area_range = (0.2, 1.0)
  c.augment.color_jitter_strength = 0.5
