"""What every jaxclr command does before and around its job.

User errors (bad config, missing data, unusable workdir, a diverged run) are
printed as one line naming the problem, with exit status 2, and no traceback.
"""

from __future__ import annotations

import contextlib
import logging as logging_lib
import sys

from absl import flags, logging

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def define_distributed_flags():
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0 for jax.distributed; not needed on Cloud TPU, "
      "SLURM or Open MPI, where it is detected.")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Initialise jax.distributed: 'auto' when the environment "
                    "or the flags above describe several processes.")


class _QuietLibraries(logging_lib.Filter):
  """Keeps Orbax's and TensorStore's per-save INFO lines off the console."""

  def filter(self, record):
    return (record.levelno >= logging_lib.WARNING or
            not any(f"/{lib}/" in record.pathname for lib in _CHATTY))


_CHATTY = ("orbax", "tensorstore", "clu")


def initialize_runtime():
  """Quiets library logs and starts jax.distributed when asked or detected.

  Call before anything uses jax devices.
  """
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from jaxclr.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(mode=FLAGS.distributed,
                         coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes,
                         process_id=FLAGS.process_id)


@contextlib.contextmanager
def user_errors_exit():
  from jaxclr import config_lib, pretrain, workdir  # pylint: disable=g-import-not-at-top
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    yield
  except (config_lib.ConfigError, input_pipeline.DataError,
          workdir.WorkdirError) as e:
    logging.flush()
    print(f"jaxclr: error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  except pretrain.NonFiniteError as e:
    logging.flush()
    print(f"jaxclr: error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_DIVERGED)
