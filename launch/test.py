r"""README command 2: run the test suite in the project venv.

  python3 -m launch.test [pytest args]

Runs with the bare system python3 of a fresh clone: it creates and fills
./.venv on first use (pipeline/cloud/bootstrap.py), then replaces itself with
  python -m pytest tests -q [pytest args]
in the venv, so the exit status is pytest's (5 means no tests were collected).
Arguments naming test files or node ids replace `tests`, e.g.
  python3 -m launch.test tests/train_test.py::test_resume_is_bit_exact -x
"""

import os
import sys

import pipeline
from pipeline.cloud import bootstrap


def _names_paths(args):
  """Whether an argument names a test path or node id (tests/x.py::name) that exists.

  Only path-looking arguments count, so option values such as `-k tests` don't.
  """
  for a in args:
    path = a.split('::')[0]
    looks_like_path = '/' in path or path.endswith('.py') or '::' in a
    if (not a.startswith('-') and looks_like_path and
        os.path.exists(os.path.join(pipeline.ROOT, path))):
      return True
  return False


def main(argv=None):
  args = sys.argv[1:] if argv is None else list(argv)
  bootstrap.ensure()
  targets = [] if _names_paths(args) else ['tests']
  bootstrap.exec_module('pytest', targets + ['-q'] + args)


if __name__ == '__main__':
  main()
