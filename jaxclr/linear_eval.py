"""Evaluate a pretrained encoder (linear probe, few-label probes, kNN).

  python -m jaxclr.linear_eval --config configs/linear_eval.py \
      --config.pretrained_workdir=DIR --workdir OUT [--config.protocol=paper]

--config.pretrained_workdir=none evaluates a randomly initialised encoder of
the architecture set in the config (configs/linear_eval.py:random_init).
Writes OUT/results.json; re-running resumes the paper protocol's training.
"""

from jaxclr import cli

cli.define_job_flags("Path to an eval config file.",
                     "Directory for results and checkpoints.")

if __name__ == "__main__":
  cli.run_job("jaxclr.jobs.linear_eval",
              flags_parser=cli.job_flags_parser("linear_eval"),
              summary_keys=("top1", "top5", "knn_top1", "few_label_top1",
                            "checkpoint_step"))
