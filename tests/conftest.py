"""Shared fixtures: the repo root, a subprocess runner and one trained smoke run."""

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Quiet TF's C++ logging in child processes; it is noise in assertion messages.
CHILD_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(ROOT))


def run(args, timeout=300, check=True, cwd=ROOT, env=None):
  """Runs `python args...` in a fresh process (env: extra variables); returns CompletedProcess."""
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env={**CHILD_ENV, **(env or {})},
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}')
  return proc


def error_lines(stderr):
  """The user-facing error lines of a failed launcher run."""
  return [l for l in stderr.splitlines()
          if l.startswith(('charlstm: error', 'FATAL', 'Traceback'))]


def built_once(tmp_path_factory, name, build):
  """<session temp>/name, made by build(path) once for the whole run, xdist workers included.

  launch.test runs pytest-xdist workers, each with its own session and basetemp
  (<run>/popen-gwN); a session fixture alone would train the same model once
  per worker. The first worker to ask builds it under an exclusive lock on a
  file beside it (the others block on the lock, not on a timer), then marks it
  done; the tests only read what is built. A build that failed leaves no mark,
  so the next asker builds it again and fails the same way.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # the run's directory, shared by its workers
  path, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      build(path)
      done.touch()
  return path


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A workdir trained with the smoke config by `python -m launch.train`, as a user runs it."""
  return built_once(tmp_path_factory, 'smoke', lambda workdir: run(
      ['-m', 'launch.train', '--config=configs/shakespeare.py:smoke', f'--workdir={workdir}']))


@pytest.fixture
def kernels(request):
  """fused_lstm's gate kernels for a test parametrized indirectly over 'xla' and 'cc'.

  'cc' compiles pipeline/kernels/cell.cc on first use, so it needs a C++
  compiler: bootstrap.cxx() installs g++ with apt-get when there is none (as
  chromium() does for the browser test), or fails the test in one line.
  """
  if request.param == 'cc':
    from pipeline.cloud import bootstrap  # pylint: disable=g-import-not-at-top
    bootstrap.cxx()
  return request.param
