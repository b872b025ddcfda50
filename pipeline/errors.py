"""The errors users see, and the one place that turns them into one-line messages.

Every error the pipeline raises for bad input or an unusable environment
derives from `Error`; its message names the problem and the fix. Launchers
run their main through `run`, which prints such errors as a single line and
exits with status 2 instead of dumping a traceback.
"""

import sys

from absl import app


class Error(ValueError):
  """Base class of the pipeline's user-facing errors."""


EXIT_USAGE = 2


def run(main):
  """absl app.run(main), with pipeline errors printed as one line (exit 2)."""

  def wrapped(argv):
    try:
      return main(argv)
    except Error as e:
      print(f'charlstm: error: {e}', file=sys.stderr, flush=True)
      sys.exit(getattr(e, 'exit_code', EXIT_USAGE))

  app.run(wrapped)
