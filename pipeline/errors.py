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


def fail(message, exit_code=EXIT_USAGE):
  """Prints a one-line error and exits."""
  message = ' '.join(str(message).split())
  print(f'charlstm: error: {message}', file=sys.stderr, flush=True)
  sys.exit(exit_code)


def run(main):
  """absl app.run(main), with pipeline and config-flag errors printed as one line (exit 2)."""
  started = False

  def wrapped(argv):
    nonlocal started
    started = True
    try:
      return main(argv)
    except Error as e:
      fail(e, getattr(e, 'exit_code', EXIT_USAGE))

  try:
    app.run(wrapped)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if started:
      raise
    # ml_collections' config flag raises these while parsing flags, e.g. for
    # --config.model.hiden_size=3 ("Did you mean ..."); they are usage errors.
    text = str(e.args[0] if e.args else e)
    text = text.replace('\\n', ' ').replace('\\', '').replace("'", '').strip('"')
    fail(f'invalid --config flag: {text}')
