"""A seconds-per-step run on generated images, for tests and chaos testing.

  python -m jaxclr.main --config configs/synthetic_tiny.py --workdir /tmp/tiny

ResNet-18 at width 1/8 on 8x8 synthetic images (64 examples, 4 classes),
B=16, 12 steps, a checkpoint every 3 and a log line every step. Nothing is
downloaded. Cost: ~25 s of compilation, then well under a second per step on
a laptop CPU. No accuracy to expect: this exercises the machinery only.
Arguments (e.g. configs/synthetic_tiny.py:steps=40,every=5):
  steps=N      training steps (default 12)
  every=N      checkpoint cadence in steps (default 3)
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=12, every=3)
  c = config_lib.pretrain_config()
  c.dataset = "synthetic"
  c.synthetic.num_examples = 64
  c.synthetic.num_classes = 4
  c.image_size = 8
  c.batch_size = 16
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.num_proj_layers = 2
  c.model.proj_out_dim = 16
  c.num_train_steps = arg.steps
  c.warmup_epochs = 0.0
  c.learning_rate = 1.0
  c.weight_decay = 1e-4
  c.log_every_steps = 1
  c.checkpoint_every_steps = arg.every
  c.max_checkpoints_to_keep = 3
  return c
