"""Export a pretrained encoder to one .npz (jaxclr.load_encoder reads it).

  python -m jaxclr.export --workdir DIR --out encoder.npz [--step N]

The format and the loader are jaxclr/jobs/export.py.
"""


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxclr import cli  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from jaxclr.jobs import export as job  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  with cli.user_errors_exit():
    manifest = job.export_encoder(f.workdir, f.out,
                                  None if f.step < 0 else f.step)
  print(f"Wrote {f.out}: {json.dumps(manifest)}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Pretraining workdir.")
  flags.DEFINE_string("out", None, "Output .npz path.")
  flags.DEFINE_integer("step", -1, "Checkpoint step (default: newest).")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
