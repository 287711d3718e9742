"""Pretrain with SimCLR.

  python -m jaxclr.main --config configs/default.py --workdir runs/demo \
      [--config.batch_size=512 ...]

Re-running the same command resumes from the newest checkpoint in --workdir.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jaxclr import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with cli.user_errors_exit():
    cli.initialize_runtime()
    from jaxclr import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_pretrain_flags)
