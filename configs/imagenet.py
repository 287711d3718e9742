"""SimCLR on ImageNet: the paper's default setting (P1 section 2.3).

  python -m jaxclr.main --config configs/imagenet.py --workdir DIR \
      --config.data_dir=/path/to/tensorflow_datasets

ResNet-50, B=4096, LARS lr 0.3 x B/256 (peak 4.8), wd 1e-6, tau=0.1,
100 epochs (31,279 steps) with 10 warmup epochs (3,127 steps), colour
strength 1.0 + blur (on the accelerators; the host sends uint8 crops),
2-layer projection head (v1). The paper reports 64.5%
linear top-1 after 100 epochs (Table B.1: 64.6 linear-LR / 64.5 sqrt-LR).

Variants (as config arguments, e.g. configs/imagenet.py:epochs=1000):
  * 1000 epochs (P1 Table 6: 69.3% R-50, 74.2% R-50 2x with width=2).
  * SimCLRv2: v2 -> 3-layer head, wd 1e-4, lr 0.1 x sqrt(B) (6.4 at B=4096),
    800 epochs (250,228 steps: the step of the released v2 checkpoints) with
    5% warmup (40 epochs, 12,511 steps), as the maintainers describe it. Not
    reproduced: v2's MoCo-style memory buffer and EMA network (unreleased).
    Add sk=0.0625 for the SK1 rows (selective kernels + ResNet-D).
Arguments:
  depth=D      ResNet depth (default 50)
  width=W      width multiplier (default 1.0)
  batch=B      global batch size (default 4096, or the method recipe's)
  epochs=E     training epochs (default 100; 800 with v2; or the method
               recipe's)
  sk=R         selective-kernel ratio (default 0; 0.0625 = SimCLRv2's SK1)
  method=NAME  simclr (default), byol, nnclr, supcon, barlow_twins, vicreg,
               simsiam, mocov2, mocov3, dino, swav: that method's published
               ImageNet recipe over SimCLR's (METHOD_RECIPES below: the
               paper's values and the figure it targets, cited with each);
               batch= and epochs= given here override the recipe's
  v2           the SimCLRv2 changes above
  tiny         the same recipe and code paths (device colour + blur, uint8
               transfer, bf16 compute, ImageNet stem) at CPU size: R-18
               x1/8 on 32 px synthetic images, B=16, 2 steps (tests)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  # batch=0, epochs=0: the recipe's own (SimCLR: B=4096, 100 (v1) or 800
  # (v2) epochs; another method's: its recipe's).
  arg = config_lib.parse_arg(arg, depth=50, width=1.0, batch=0,
                             epochs=0, sk=0.0, v2=False, tiny=False,
                             method="simclr")
  epochs = arg.epochs or (800 if arg.v2 else 100)
  c = config_lib.pretrain_config()
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.batch_size = arg.batch or 4096
  c.num_epochs = epochs
  c.model.depth = arg.depth
  c.model.width_multiplier = arg.width
  c.model.sk_ratio = arg.sk
  c.model.num_proj_layers = 2
  c.learning_rate = 0.3
  c.learning_rate_scaling = "linear"
  c.weight_decay = 1e-6
  c.simclr.temperature = 0.1
  c.warmup_epochs = 10.0
  c.augment.color_jitter_strength = 1.0
  c.augment.use_blur = True
  # The host decodes, crops and flips; colour jitter, grayscale and blur run
  # on the accelerators inside the train step, where they cost little next
  # to a ResNet-50 step (on the host they cost ~4x the crop at 224 px). Host
  # views go as uint8: 4x fewer bytes to copy and send, ~1.7x more images per
  # host core; rounding to 1/255 is the only difference (benchmarks/RESULTS.md).
  c.augment.on_device = True
  c.augment.transfer_dtype = "uint8"
  c.model.compute_dtype = "bfloat16"
  if arg.v2:
    c.model.num_proj_layers = 3
    c.weight_decay = 1e-4
    c.learning_rate = 0.1
    c.learning_rate_scaling = "sqrt"
    c.warmup_epochs = 0.05 * epochs
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  if arg.method != "simclr":
    c.method = arg.method
    if arg.method not in METHOD_RECIPES:
      raise ValueError(f"configs/imagenet.py: method={arg.method!r} has no "
                       f"ImageNet recipe; valid: simclr, "
                       f"{', '.join(sorted(METHOD_RECIPES))}")
    METHOD_RECIPES[arg.method](c)
    # The arguments given override the method recipe's batch and epochs.
    c.batch_size = arg.batch or c.batch_size
    c.num_epochs = arg.epochs or c.num_epochs
  if arg.tiny:
    c.dataset, c.image_size, c.batch_size = "synthetic", 32, 16
    c.synthetic.num_examples, c.synthetic.num_classes = 64, 4
    c.model.update(depth=18, width_multiplier=0.125, cifar_stem=False,
                   proj_out_dim=16)
    c.num_train_steps, c.warmup_epochs = 2, 0.0
    # Multi-crop recipes: local crops keep their ratio to the views.
    c.augment.local_crop_size = c.augment.local_crop_size * 32 // 224
    c.log_every_steps, c.checkpoint_every_steps = 1, 2
  return c


# Each method's published ImageNet values, applied over SimCLR's above.
# Kept here, beside the config they modify, so that this file reads alone.


def _byol(c):
  """BYOL's ImageNet values (Grill et al. 2020; deepmind-research
  byol/configs/byol.py at 1000 epochs): R-50, B=4096, 1000 epochs, LARS lr
  0.2 x B/256, trust coefficient 1e-3, wd 1.5e-6, 10 warmup epochs; target
  tau 0.996 -> 1; projector 4096 -> 256, predictor 4096; BatchNorm per
  view; colour 0.4 / 0.4 / 0.2 / 0.1. Published: 74.3% linear top-1 (the
  paper's Table 1). Differences: both views get the same augmentation
  (strength 0.5: saturation 0.4; blur with probability 0.5), not BYOL's
  asymmetric blur (1.0 / 0.1) and solarisation (0 / 0.2); the projector
  ends in BatchNorm."""
  c.batch_size, c.num_epochs, c.warmup_epochs = 4096, 1000, 10.0
  c.learning_rate, c.learning_rate_scaling = 0.2, "linear"
  c.weight_decay, c.trust_coefficient = 1.5e-6, 1e-3
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 4096, 256
  c.byol.update(tau_base=0.996, predictor_hidden_dim=4096, per_view_bn=True)
  c.augment.color_jitter_strength = 0.5


def _nnclr(c):
  """NNCLR's ImageNet values (Dwibedi et al. 2021, section 4, as read from
  the paper): R-50, B=4096, 1000 epochs, LARS lr 0.3 x B/256, wd 1e-6, 10
  warmup epochs, temperature 0.1, support set 98,304; projector 3 layers
  2048 wide -> 256, predictor 4096. Published: 75.6% linear top-1 (the
  paper's abstract). Differences: both views get the same augmentation
  (strength 0.5, blur with probability 0.5), not BYOL's asymmetric one;
  both views share one BatchNorm batch."""
  c.batch_size, c.num_epochs, c.warmup_epochs = 4096, 1000, 10.0
  c.learning_rate, c.learning_rate_scaling = 0.3, "linear"
  c.weight_decay = 1e-6
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  c.nnclr.update(temperature=0.1, queue_size=98304, predictor_hidden_dim=4096)
  c.augment.color_jitter_strength = 0.5


def _supcon(c):
  """SupCon's ImageNet values (Khosla et al. 2020; google-research/
  google-research supcon/scripts/supcon_imagenet_resnet50.sh with
  configs.sh and hparams_flags.py): R-50, B=6144, 350 epochs, LARS lr 0.4 x
  B/256, wd 1e-3, 12 warmup epochs, temperature 0.1, L_out; a one-layer
  projection to 128. Published: 78.7% top-1 (the paper's ResNet-50 row,
  with AutoAugment). Differences: SimCLR's augmentation (strength 1.0,
  blur) instead of AutoAugment; the projection ends in BatchNorm; the loss
  is not scaled by the temperature (scale_by_temperature, a constant
  factor); weight decay skips BatchNorm and biases; the reference's
  classifier is trained in a second stage, jaxclr's evaluation is the
  linear probe."""
  c.batch_size, c.num_epochs, c.warmup_epochs = 6144, 350, 12.0
  c.optimizer, c.learning_rate = "lars", 0.4
  c.learning_rate_scaling, c.weight_decay = "linear", 1e-3
  c.model.num_proj_layers, c.model.proj_out_dim = 1, 128
  c.supcon.update(temperature=0.1, form="out")


def _barlow_twins(c):
  """configs/imagenet.py:method=barlow_twins: the authors' released command
  (facebookresearch/barlowtwins at f13c949, README: `main.py --epochs 1000
  --batch-size 2048 --learning-rate 0.2 --lambd 0.0051 --projector
  8192-8192-8192 --scale-loss 0.024`, 73.3% linear top-1; the paper's
  Table 1 gives 73.2%).

  R-50, B=2048, 1000 epochs, 10 warmup epochs, LARS lr 0.2 x B/256 (trust
  coefficient 0.001), wd 1e-6, projector 8192-8192-8192 with no BN on z,
  lambda 0.0051, loss scale 0.024. That command's one learning rate with a
  loss scale is what jaxclr's single learning rate can express; the
  authors' later main.py drops the scale for a separate learning rate of
  biases and BN (0.0048 = 0.2 x 0.024, which the scale gives them under
  LARS, since their updates are not trust-ratio normalised). The paper
  says lambda 5e-3 and wd 1.5e-6; this follows the code. Colour strength
  0.5 is BYOL's jitter (0.4, 0.4, 0.2 -> 0.4, 0.1), which Barlow Twins
  uses, symmetric: no solarisation, blur 0.5 on both views, the cosine
  decays to 0 (the authors': to 1/1000).
  """
  c.batch_size, c.num_epochs, c.warmup_epochs = 2048, 1000, 10.0
  c.learning_rate, c.learning_rate_scaling = 0.2, "linear"
  c.weight_decay, c.trust_coefficient = 1e-6, 1e-3
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 8192
  c.model.proj_output_norm = "none"
  c.barlow_twins.barlow_lambda = 0.0051
  c.barlow_twins.barlow_scale = 0.024
  c.augment.color_jitter_strength = 0.5


def _vicreg(c):
  """configs/imagenet.py:method=vicreg: the paper's ImageNet recipe, as the
  authors' README runs it (facebookresearch/vicreg: `main_vicreg.py --arch
  resnet50 --epochs 1000 --batch-size 2048 --base-lr 0.2`, 73.2% linear
  top-1, also the paper's Table 1).

  R-50, B=2048, 1000 epochs, 10 warmup epochs, LARS lr 0.2 x B/256 (trust
  coefficient 0.001), wd 1e-6, projector 8192-8192-8192 with no BN on z,
  invariance 25, variance 25, covariance 1. Colour strength 0.5 is the
  paper's jitter (BYOL's: 0.4, 0.4, 0.2 -> 0.4, 0.1), symmetric: no
  solarisation, blur 0.5 on both views; the cosine decays to 0 (the
  authors': to 1/1000).
  """
  c.batch_size, c.num_epochs, c.warmup_epochs = 2048, 1000, 10.0
  c.learning_rate, c.learning_rate_scaling = 0.2, "linear"
  c.weight_decay, c.trust_coefficient = 1e-6, 1e-3
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = c.model.proj_out_dim = 8192
  c.model.proj_output_norm = "none"
  c.vicreg.invariance_weight = 25.0
  c.vicreg.variance_weight = 25.0
  c.vicreg.covariance_weight = 1.0
  c.augment.color_jitter_strength = 0.5


def _simsiam(c):
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


def _mocov2(c):
  """MoCo v2's ImageNet values (facebookresearch/moco main_moco.py with the
  README's MoCo v2 flags --mlp --moco-t 0.2 --aug-plus --cos): R-50, B=256,
  800 epochs, SGD lr 0.03 x B/256, momentum 0.9, wd 1e-4, no warmup, cosine;
  queue 65,536, m 0.999, tau 0.2, one direction; MLP head 2048 -> 128;
  crops of 20-100% of the area, colour 0.4 / 0.4 / 0.4 / 0.1 (strength
  0.5), blur with probability 0.5. Published: 71.1% linear top-1 (the
  README's 800-epoch row). Differences: the head has BatchNorm; weight decay
  skips BatchNorm and biases; the cosine is per step (the reference's per
  epoch); global per-view BatchNorm instead of shuffling BN."""
  c.batch_size, c.num_epochs, c.warmup_epochs = 256, 800, 0.0
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.03, 0.9
  c.learning_rate_scaling, c.weight_decay = "linear", 1e-4
  c.model.num_proj_layers, c.model.proj_out_dim = 2, 128
  c.mocov2.update(temperature=0.2, queue_size=65536, tau_base=0.999,
                  tau_final=0.999, symmetric=False)
  c.augment.crop_area_range = (0.2, 1.0)
  c.augment.color_jitter_strength = 0.5


def _mocov3(c):
  """MoCo v3's ResNet-50 values (facebookresearch/moco-v3 CONFIG.md, the
  1000-epoch command, and main_moco.py's defaults): B=4096, 1000 epochs,
  LARS lr 0.3 x B/256, trust coefficient 1e-3, wd 1.5e-6, 10 warmup epochs;
  m 0.996 -> 1 (cosine), tau 1.0; projector 4096 -> 256, predictor 4096;
  crops of 20-100% of the area, colour 0.4 / 0.4 / 0.2 / 0.1. Published:
  74.6% linear top-1 (CONFIG.md). Differences: both views get the same
  augmentation (strength 0.5, blur with probability 0.5), not BYOL's
  asymmetric blur (1.0 / 0.1) and solarisation (0 / 0.2); the predictor
  ends without BatchNorm (the reference's ends in BatchNorm without
  affine); classic momentum."""
  c.batch_size, c.num_epochs, c.warmup_epochs = 4096, 1000, 10.0
  c.learning_rate, c.learning_rate_scaling = 0.3, "linear"
  c.weight_decay, c.trust_coefficient = 1.5e-6, 1e-3
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 4096, 256
  c.mocov3.update(temperature=1.0, tau_base=0.996, tau_final=1.0,
                  predictor_hidden_dim=4096)
  c.augment.crop_area_range = (0.2, 1.0)
  c.augment.color_jitter_strength = 0.5


def _dino(c):
  """DINO's ResNet-50 on ImageNet, over SimCLR's ImageNet config
  (configs/imagenet.py:method=dino): the README's ResNet-50 command of
  facebookresearch/dino (main_dino.py --arch resnet50 --optimizer sgd
  --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
  --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14, 100 epochs)
  with main_dino.py's other defaults: 8 local crops of 96 px, head 2048 ->
  2048 -> 256 and 65,536 prototypes, teacher EMA 0.996 -> 1, last layer
  frozen for 1 epoch; lr 0.03 x B/256 after 10 warmup epochs. The teacher
  temperature is the paper's (0.04 -> 0.07 over 30 epochs; the command
  keeps main_dino.py's 0.04). The paper's ResNet-50 row (75.3% linear) was
  trained otherwise (B=4080 with LARS, per the maintainers), with arguments
  we could not read; docs/methods.md lists the differences."""
  c.optimizer, c.learning_rate, c.learning_rate_scaling = "sgd", 0.03, "linear"
  c.weight_decay, c.warmup_epochs = 1e-4, 10.0
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 256
  c.augment.update(crop_area_range=(0.14, 1.0), num_local_crops=8,
                   local_crop_size=96, local_crop_area_range=(0.05, 0.14),
                   color_jitter_strength=0.5)
  c.dino.update(num_prototypes=65536, tau_base=0.996)


def _swav(c):
  """SwAV's ResNet-50 on ImageNet, over SimCLR's ImageNet config
  (configs/imagenet.py:method=swav): facebookresearch/swav's
  scripts/swav_100ep_pretrain.sh (72.1% linear top-1 in its README; 75.3%
  with epochs=800, swav_800ep_pretrain.sh): B=4096, LARS lr 4.8 = 0.3 x
  B/256 after 10 warmup epochs, wd 1e-6, trust coefficient 0.001; 2 x 224
  px crops (area 0.14-1) + 6 x 96 px (0.05-0.14); projector 2048 -> 128,
  3,000 prototypes frozen for the first epoch, temperature 0.1, epsilon
  0.05, 3 Sinkhorn iterations, no queue; SimCLR's colour (strength 1.0)
  and blur. docs/methods.md lists the differences (the schedule's ends,
  LARS's exclusions, the projector's last BN)."""
  c.learning_rate, c.learning_rate_scaling = 0.3, "linear"
  c.weight_decay, c.warmup_epochs, c.trust_coefficient = 1e-6, 10.0, 1e-3
  c.model.num_proj_layers = 2
  c.model.proj_hidden_dim, c.model.proj_out_dim = 2048, 128
  c.augment.update(crop_area_range=(0.14, 1.0), num_local_crops=6,
                   local_crop_size=96, local_crop_area_range=(0.05, 0.14))
  c.swav.update(num_prototypes=3000, temperature=0.1, epsilon=0.05,
                sinkhorn_iterations=3, queue_size=0,
                freeze_prototypes_epochs=1.0)


METHOD_RECIPES = {"byol": _byol, "nnclr": _nnclr, "supcon": _supcon,
                  "barlow_twins": _barlow_twins, "vicreg": _vicreg,
                  "simsiam": _simsiam, "mocov2": _mocov2, "mocov3": _mocov3,
                  "dino": _dino, "swav": _swav}
