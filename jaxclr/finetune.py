"""Fine-tune a pretrained encoder, all layers, on a label subset.

  python -m jaxclr.finetune --config configs/finetune.py \
      --config.pretrained_workdir=DIR --workdir OUT

configs/finetune.py:per_class=5 or :fraction=0.1 picks the label subset.

--config.pretrained_workdir=none fine-tunes a randomly initialised network of
the architecture set in the config (configs/finetune.py:random_init).
Writes OUT/results.json; re-running the command resumes from OUT/checkpoints.
"""

from jaxclr import cli

cli.define_job_flags("Path to a fine-tuning config file.",
                     "Directory for results and checkpoints.")

if __name__ == "__main__":
  cli.run_job("jaxclr.jobs.finetune",
              flags_parser=cli.job_flags_parser("finetune"),
              summary_keys=("top1", "top5", "num_labelled_examples",
                            "steps", "checkpoint_step"))
