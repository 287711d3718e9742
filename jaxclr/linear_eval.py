"""Evaluate a pretrained encoder (linear probe, few-label probes, kNN).

  python -m jaxclr.linear_eval --config configs/linear_eval.py \
      --config.pretrained_workdir=DIR --workdir OUT [--config.protocol=paper]

--config.pretrained_workdir=none evaluates a randomly initialised encoder of
the architecture set in the config (configs/linear_eval.py:random_init).
Writes OUT/results.json; re-running resumes the paper protocol's training.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jaxclr import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an eval config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with cli.user_errors_exit():
    cli.initialize_runtime()
    from jaxclr.evaluation import job  # pylint: disable=g-import-not-at-top
    results = job.run(FLAGS.config, FLAGS.workdir)
  keys = ("top1", "top5", "knn_top1", "few_label_top1", "checkpoint_step")
  logging.info("results: %s", {k: results.get(k) for k in keys})


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_flags)
