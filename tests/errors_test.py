"""errors: stdlib-only at import, one base class that is not ValueError, exit codes defined once."""

import subprocess
import sys

from pipeline import checkpoint
from pipeline import errors
from tests.conftest import ROOT


def test_errors_imports_without_third_party_packages():
  # bootstrap uses errors under the bare system python, before absl is installed.
  code = ('import sys\n'
          'class Block:\n'
          '  def find_spec(self, name, *a):\n'
          '    if name.split(".")[0] in ("absl", "tensorflow", "numpy", "keras"):\n'
          '      raise ImportError("blocked " + name)\n'
          'sys.meta_path.insert(0, Block())\n'
          'from pipeline import errors\n'
          'from pipeline.cloud import bootstrap\n'
          'print(errors.EXIT_USAGE, errors.EXIT_PREEMPTED)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['2', '75']


def test_interruptions_are_not_bad_input():
  assert not issubclass(errors.Error, ValueError)
  assert not issubclass(checkpoint.Interrupted, ValueError)
  assert checkpoint.Interrupted.exit_code == errors.EXIT_PREEMPTED == 75
  assert checkpoint.WorkerLost.exit_code == errors.EXIT_FAILED
  assert errors.Error.exit_code == errors.EXIT_USAGE == 2


def test_exit_code_75_is_written_once():
  hits = []
  for path in (ROOT / 'pipeline').rglob('*.py'):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split('#')[0]
      if '= 75' in code or '=75' in code:
        hits.append(str(path.relative_to(ROOT)))
  assert hits == ['pipeline/errors.py'], hits
