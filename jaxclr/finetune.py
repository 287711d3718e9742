"""Fine-tune a pretrained encoder, all layers, on a label subset.

  python -m jaxclr.finetune --config configs/finetune.py \
      --config.pretrained_workdir=DIR --workdir OUT

configs/finetune.py:per_class=5 or :fraction=0.1 picks the label subset.

--config.pretrained_workdir=none fine-tunes a randomly initialised network of
the architecture set in the config (configs/finetune.py:random_init).
Writes OUT/results.json; re-running the command resumes from OUT/checkpoints.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jaxclr import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Path to a fine-tuning config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with cli.user_errors_exit():
    cli.initialize_runtime()
    from jaxclr.evaluation import finetune  # pylint: disable=g-import-not-at-top
    results = finetune.run(FLAGS.config, FLAGS.workdir)
  keys = ("top1", "top5", "num_labelled_examples", "steps", "checkpoint_step")
  logging.info("results: %s", {k: results.get(k) for k in keys})


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_flags)
