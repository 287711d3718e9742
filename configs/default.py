"""The default: SimCLR on the embedded digits dataset, on a CPU.

  python -m jaxclr.main --config configs/default.py --workdir runs/default

scikit-learn's 1,797 8x8 handwritten digits (bundled, no download), served as
32x32x3 and trained at 16 px (the digits are 8x8 underneath, so 16 px loses
nothing and costs ~4x less per step than 32 px); pretraining uses the fixed
stratified 75% train split (1,347 images), the 25% test split (450) is for
evaluation. ResNet-18 with the CIFAR stem and width multiplier 0.25 (16 base
channels), 2-layer projection head, B=256, 300 steps (~57 epochs), LARS
lr 0.5 x B/256 with 5 warmup epochs, tau=0.5, colour strength 0.5, no blur
(as SimCLR's CIFAR recipe).
Cost and result: a few minutes on a 2-core CPU; the README's quick start
gives the latest wall time and its linear evaluation, the digits table one
row per method (history: benchmarks/RESULTS.md, "Quick start").
Arguments (configs/default.py:steps=50,batch=128 for a quicker look):
  steps=N      training steps (default 300)
  batch=B      global batch size (default 256)
  on_device    colour jitter, grayscale and blur on the accelerator
  method=NAME  a registered method (jaxclr.methods.names()):
               simclr (default), supervised contrastive (L_out, positives
               by label; the digits have labels), BYOL (no negatives:
               predictor 512 wide, target EMA tau 0.99 -> 1), NNCLR
               (nearest-neighbour positives from a support set of the last
               4 global batches, predictor 512 wide), Barlow Twins or
               VICReg (their published weights; the projector ends on its
               Dense, no BN), SimSiam (predictor 512 wide, the projector
               ends in BN without scale), MoCo v2 (a queue of
               the last 4 global batches' keys, key encoder m 0.99: 0.999
               is for runs of 10^5 steps), MoCo v3 (predictor 512 wide,
               m 0.99 -> 1), DINO or SwAV (both with 4 local crops of
               8 px beside the 16 px views and 256 prototypes; DINO's
               teacher EMA from 0.99, its teacher temperature 0.04)
  loss=NAME    method=simclr's loss, a registered one (default nt_xent;
               nt_xent|supcon|triplet_batch_hard|triplet_semi_hard|npair|
               infonce|barlow_twins|vicreg; docs/losses.md)
"""

from jaxclr import config as config_lib, methods

# What ends the projector, per method, as its reference has it (default:
# SimCLR's BN): the last Dense where the loss reads z's scale, BN without
# scale or offset for SimSiam (docs/losses.md).
PROJ_OUTPUT_NORM = {"barlow_twins": "none", "vicreg": "none",
                    "simsiam": "bn_no_affine"}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=256, steps=300, on_device=False,
                             method="simclr", loss="nt_xent")
  c = config_lib.pretrain_config()
  c.dataset = "digits"
  # The digits are 8x8 underneath: training at 16 px loses nothing the 32 px
  # upscale had, and each step costs ~4x less on a CPU.
  c.image_size = 16
  c.batch_size = arg.batch
  c.num_train_steps = arg.steps
  c.model.depth = 18
  c.model.width_multiplier = 0.25
  c.model.cifar_stem = True
  c.model.num_proj_layers = 2
  c.model.proj_out_dim = 64
  c.model.proj_output_norm = PROJ_OUTPUT_NORM.get(arg.method, "bn")
  # SimCLR's small-batch advice (simclr#166): higher lr, short warmup.
  c.learning_rate = 0.5
  c.learning_rate_scaling = "linear"
  c.warmup_epochs = 5.0
  c.weight_decay = 1e-6
  c.augment.color_jitter_strength = 0.5
  c.augment.use_blur = False
  c.augment.on_device = arg.on_device
  # Every objective keeps the recipe above (tau 0.5 where it has one, a
  # 512-wide predictor), so the methods differ in their loss only.
  c.method = arg.method
  c.simclr.loss = arg.loss
  for section in (c.simclr, c.supcon, c.nnclr, c.mocov2, c.mocov3):
    section.temperature = 0.5
  c.byol.predictor_hidden_dim = c.nnclr.predictor_hidden_dim = 512
  c.mocov3.predictor_hidden_dim = 512
  c.nnclr.queue_size = c.mocov2.queue_size = 4 * arg.batch
  c.mocov2.tau_base = c.mocov2.tau_final = 0.99
  c.dino.num_prototypes = c.swav.num_prototypes = 256
  c.dino.tau_base = 0.99  # As BYOL's here: 300 steps is a short run.
  # main_dino.py's own teacher temperature (0.04, no warm-up; its ResNet-50
  # command's): with the paper's 0.04 -> 0.07 warm-up the teacher drifted
  # towards uniform in 300 steps (benchmarks/RESULTS.md, DINO and SwAV on
  # digits).
  c.dino.teacher_temperature = c.dino.warmup_teacher_temperature = 0.04
  if arg.method in methods.names() and methods.get(
      arg.method).reads_local_crops(c[arg.method]):
    # Multi-crop at DINO's default area ranges (main_dino.py: global
    # crops 0.4-1, local 0.05-0.4), local crops half the views' size.
    c.augment.update(num_local_crops=4, local_crop_size=8,
                     crop_area_range=(0.4, 1.0),
                     local_crop_area_range=(0.05, 0.4))
  c.log_every_steps = 25
  c.checkpoint_every_steps = 100
  c.eval_every_steps = -1
  return c
