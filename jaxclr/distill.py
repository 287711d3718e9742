"""Distil a teacher classifier into a student on unlabelled images.

  python -m jaxclr.distill --config configs/distill.py \
      --config.teacher_workdir=FT_DIR --workdir OUT

The teacher: a jaxclr.finetune (or jaxclr.distill) workdir, or a converted
official checkpoint with its supervised head. The student starts from the
teacher's pretrained encoder unless --config.pretrained_workdir says
otherwise ('none': random init of --config.model.*). Writes OUT/results.json
(student and teacher top-1); re-running the command resumes.
"""

from jaxclr import cli

cli.define_job_flags("Path to a distillation config file.",
                     "Directory for results and checkpoints.")

if __name__ == "__main__":
  cli.run_job("jaxclr.jobs.distill",
              flags_parser=cli.job_flags_parser("distill"),
              summary_keys=("top1", "teacher_top1", "num_train_examples",
                            "steps", "teacher_workdir"))
