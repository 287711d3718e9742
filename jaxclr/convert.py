"""Convert an official SimCLRv1/v2 TF2 checkpoint into a jaxclr workdir.

  python -m jaxclr.convert --tf_checkpoint PATH --out DIR [--image_size N]

The conversion is jaxclr/jobs/convert.py.
"""


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxclr import cli  # pylint: disable=g-import-not-at-top
  from jaxclr.jobs import convert as job  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  with cli.user_errors_exit():
    config = job.convert(f.tf_checkpoint, f.out, image_size=f.image_size,
                         dataset=f.dataset, depth=f.depth,
                         width_multiplier=f.width_multiplier,
                         sk_ratio=f.sk_ratio)
  print(f"Wrote {f.out}: {config['model']}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("tf_checkpoint", None, "Official TF2 checkpoint prefix "
                      "(e.g. .../ckpt-0) or directory.")
  flags.DEFINE_string("out", None, "New jaxclr workdir.")
  flags.DEFINE_integer("image_size", None, "Default: 32 for the CIFAR stem, "
                       "else 224.")
  flags.DEFINE_string("dataset", None, "The workdir's dataset (default: "
                      "cifar10 for the CIFAR stem, else imagenet2012).")
  flags.DEFINE_integer("depth", None, "Pin the inferred ResNet depth.")
  flags.DEFINE_float("width_multiplier", None, "Pin the inferred width.")
  flags.DEFINE_float("sk_ratio", None, "Pin sk_ratio (inferred as 0.0625 "
                     "when the mixing width is at its minimum of 32).")
  flags.mark_flags_as_required(["tf_checkpoint", "out"])
  app.run(main)
