"""Pretrain with SimCLR.

  python -m jaxclr.main --config configs/default.py --workdir runs/demo \
      [--config.batch_size=512 ...]

Re-running the same command resumes from the newest checkpoint in --workdir.
"""

from jaxclr import cli

cli.define_job_flags("Path to a config file.",
                     "Directory for checkpoints and metrics.")

if __name__ == "__main__":
  cli.run_job("jaxclr.jobs.pretrain",
              flags_parser=cli.job_flags_parser("pretrain"))
