r"""README command 2: run the test suite in the project venv.

  python3 -m launch.test [--tf=2.20|2.21] [pytest args]

Runs with the bare system python3 of a fresh clone: it creates and fills
./.venv on first use (pipeline/cloud/bootstrap.py), then replaces itself with
  python -m pytest -n 2 tests -q [pytest args]   (-n: pytest-xdist workers)
in the venv, so the exit status is pytest's (5 means no tests were collected).
Arguments naming test files or node ids replace `tests`, e.g.
  python3 -m launch.test tests/train_test.py::test_resume_is_bit_exact -x

--tf=2.20 runs the tests that matter on a TPU run (TF_TEST_FILES: train, exact
resume, export, sample, the XLA TPU proxy) in a second venv, ./.venv-tf2.20
($CHARLSTM_VENV-tf2.20), with TensorFlow 2.20, the newest TF that has a
tensorflow-tpu wheel and so what the pyproject's tpu extra installs on a TPU
VM. --tf=2.21 runs the same files in the main venv. Path arguments replace
the list here too.
"""

import os
import sys

import pipeline
from pipeline import errors
from pipeline.cloud import bootstrap

# What a TPU VM runs, as whole files. tests/tpu_test.py (the XLA TPU proxy) is
# new; it joins the list where it exists, so the list works with and without it.
TF_TEST_FILES = (
    'tests/train_test.py',  # the train loop, checkpoints and bit-exact resume
    'tests/export_test.py',
    'tests/sample_test.py',
    'tests/tpu_test.py',
)
OPTIONAL_TEST_FILES = frozenset({'tests/tpu_test.py'})


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


def _usage(message):
  errors.fail(f'{message}; --tf takes one of {", ".join(sorted(bootstrap.TF_PINS))} '
              '(usage: python3 -m launch.test [--tf=VERSION] [pytest args])')


def _split_tf(args):
  """Takes --tf=X / --tf X out of args: (X or None, the rest for pytest)."""
  tf, rest = None, []
  it = iter(args)
  for a in it:
    if a == '--tf':
      tf = next(it, None)
      if tf is None:
        _usage('--tf needs a value')
    elif a.startswith('--tf='):
      tf = a[len('--tf='):]
    else:
      rest.append(a)
  if tf is not None and tf not in bootstrap.TF_PINS:
    _usage(f'unsupported --tf={tf}')
  return tf, rest


def tf_test_files():
  """TF_TEST_FILES less the optional ones not (yet) in the checkout."""
  return [f for f in TF_TEST_FILES
          if f not in OPTIONAL_TEST_FILES or os.path.exists(os.path.join(pipeline.ROOT, f))]


def main(argv=None):
  tf, args = _split_tf(sys.argv[1:] if argv is None else list(argv))
  bootstrap.ensure(tf=tf)
  venv = bootstrap.venv_dir(tf)
  if _names_paths(args):
    targets = []
  elif tf:
    targets = tf_test_files()
    bootstrap.say(f'TensorFlow {tf} ({venv}): {" ".join(targets)}')
  else:
    targets = ['tests']
  if targets and not any(a == '-n' or a.startswith(('-n=', '--numprocesses')) for a in args):
    # Two pytest-xdist workers (more on bigger machines): TensorFlow leaves a
    # core idle in much of the suite (subprocess start-up, tracing, servers).
    # (No --dist=loadgroup: with pytest 9.2 and xdist 3.8 its xdist_group marks
    # do not group, since xdist renames item._nodeid, which pytest 9.2 no longer
    # reads. Fixtures the workers share go through tests/conftest.built_once.)
    targets = ['-n', str(max(2, min(4, os.cpu_count() or 2)))] + targets
  bootstrap.exec_module('pytest', targets + ['-q'] + args, venv=venv)


if __name__ == '__main__':
  main()
