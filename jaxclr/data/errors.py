"""DataError: a dataset that cannot be used as configured."""


class DataError(ValueError):
  """A dataset that cannot be used as configured (user error, no traceback).

  The message names the bad value and what is valid; the CLI prints it alone.
  """
