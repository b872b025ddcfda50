r"""README command 2: run the test suite in the project venv.

  python3 -m launch.test [pytest args]

Runs with the bare system python3 of a fresh clone: it creates and fills
./.venv on first use (pipeline/bootstrap.py), then replaces itself with
  python -m pytest tests -q [pytest args]
in the venv, so the exit status is pytest's (5 means no tests were collected).
"""

import sys

from pipeline import bootstrap


def main(argv=None):
  args = sys.argv[1:] if argv is None else list(argv)
  bootstrap.ensure()
  bootstrap.exec_module('pytest', ['tests', '-q'] + args)


if __name__ == '__main__':
  main()
