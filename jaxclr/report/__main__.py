"""`python -m jaxclr.report`: a run's report page, or a comparison of runs.

  python -m jaxclr.report --workdir DIR [--eval_workdir EVAL_DIR] [--out R]
  python -m jaxclr.report --compare EVAL1,EVAL2,... --metric knn_top1 --out R

The page is jaxclr/report/page.py, the comparison jaxclr/report/compare.py.
"""

import os

from absl import app, flags

from jaxclr import cli
from jaxclr.report import compare, page

flags.DEFINE_string("workdir", None, "Pretraining workdir.")
flags.DEFINE_string("eval_workdir", None,
                    "A finished jaxclr.linear_eval workdir of it.")
flags.DEFINE_string("random_eval_workdir", None,
                    "A finished random-init jaxclr.linear_eval workdir.")
flags.DEFINE_string("out", None, "Report directory (default DIR/report; "
                    "compare_report with --compare).")
flags.DEFINE_integer("max_eval", 2000, "Eval examples embedded and shown.")
flags.DEFINE_integer("max_bank", 10000, "Training examples in the bank.")
flags.DEFINE_integer("aug_step", 0, "Pretraining step whose batch the "
                     "augmentation preview shows.")
flags.DEFINE_list("compare", None, "Runs to compare (pretraining or "
                  "linear_eval workdirs): one figure of --metric against "
                  "the config fields in which they differ.")
flags.DEFINE_string("x_field", None, "With --compare: the config field "
                    "on the x axis when several differ (e.g. batch_size).")
flags.DEFINE_string("metric", "knn_top1", "With --compare: top1, top5, "
                    "knn_top1, few_label_top1/K, final_loss, "
                    "final_contrast_acc, final_probe_acc.")


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.user_errors_exit():
    if f.compare:
      out = f.out or "compare_report"
      c = compare.write_comparison(f.compare, f.metric, out,
                                   x_field=f.x_field)
      print(f"Wrote {os.path.join(out, compare.FIGURE)} ({f.metric} "
            f"against {', '.join(c['fields'])})")
      return
    if not f.workdir:
      raise page.report_error(
          "pass --workdir DIR (a report of one run) or --compare "
          "DIR1,DIR2,... (a metric across runs)")
    report = page.build_report(
        f.workdir, f.out, eval_workdir=f.eval_workdir,
        random_eval_workdir=f.random_eval_workdir, max_eval=f.max_eval,
        max_bank=f.max_bank, aug_step=f.aug_step)
  out = f.out or os.path.join(f.workdir, "report")
  print(f"Wrote {os.path.join(out, page.INDEX)} "
        f"({len(report['images'])} figures, {report['wall_s']:.1f} s)")


if __name__ == "__main__":
  app.run(main)
