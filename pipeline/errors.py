"""The errors users see, the exit codes, and the one place that turns errors into one-line messages.

Every error the pipeline raises for bad input or an unusable environment
derives from `Error`; its message names the problem and the fix. Launchers
run their main through `run`, which prints such errors as a single line and
exits with the error's `exit_code` instead of dumping a traceback.

Standard library only at import time: pipeline/cloud/bootstrap.py uses it
under the bare system python of a fresh clone, before absl is installed.
"""

import sys

# Exit codes, shared by the launchers, the cluster runner and the VM scripts.
EXIT_OK = 0
EXIT_FAILED = 1  # the run failed (a lost worker, a failed cloud command)
EXIT_USAGE = 2  # bad input or an unusable environment; nothing was started or lost
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; the same command resumes
EXIT_TIMEOUT = 124  # what coreutils `timeout` exits with
EXIT_SSH = 255  # ssh lost the host (booting, or a stopped spot VM)


class Error(Exception):
  """Base class of the pipeline's user-facing errors."""
  exit_code = EXIT_USAGE


def fail(message, exit_code=EXIT_USAGE):
  """Prints a one-line error and exits."""
  message = ' '.join(str(message).split())
  print(f'charlstm: error: {message}', file=sys.stderr, flush=True)
  sys.exit(exit_code)


def run(main):
  """absl app.run(main), with pipeline and config-flag errors printed as one line."""
  from absl import app  # pylint: disable=g-import-not-at-top  # keeps this module stdlib-only
  started = False

  def wrapped(argv):
    nonlocal started
    started = True
    try:
      return main(argv)
    except Error as e:
      fail(e, e.exit_code)

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
