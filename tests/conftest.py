"""Shared fixtures: the repo root, a subprocess runner and one trained smoke run."""

import os
import pathlib
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


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A workdir trained with the smoke config by `python -m launch.train`, as a user runs it."""
  workdir = tmp_path_factory.mktemp('smoke')
  run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke', f'--workdir={workdir}'])
  return workdir
