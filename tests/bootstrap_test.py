"""The venv bootstrap and launch.test: venv names, stamps, pins, test selection, and
conftest.built_once, which launch.test's xdist workers share fixtures through.

No real venv or pip: a venv here is a directory whose bin/python is a shell
script that records its arguments, so these tests take milliseconds (built_once's
starts four real processes without TensorFlow).
"""

import os
import stat
import subprocess
import sys

import pytest

import pipeline
from launch import test as launch_test
from pipeline.cloud import bootstrap
from tests.conftest import CHILD_ENV, ROOT


@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
  """$CHARLSTM_VENV -> a main venv and its -tf2.20 sibling, each with a recording python."""
  base = tmp_path / 'venv'
  monkeypatch.setenv(bootstrap.VENV_ENV, str(base))
  log = tmp_path / 'pip.log'
  for venv in (base, tmp_path / 'venv-tf2.20'):
    (venv / 'bin').mkdir(parents=True)
    (venv / 'pyvenv.cfg').write_text('home = /usr/bin\n')
    python = venv / 'bin' / 'python'
    python.write_text(f'#!/bin/sh\necho "$0 $*" >> {log}\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
  return base, log


def test_venv_dir_names_one_venv_per_tf(monkeypatch, tmp_path):
  monkeypatch.setenv(bootstrap.VENV_ENV, str(tmp_path / 'v') + '/')
  assert bootstrap.venv_dir() == str(tmp_path / 'v')
  assert bootstrap.venv_dir(bootstrap.MAIN_TF) == str(tmp_path / 'v')
  assert bootstrap.venv_dir('2.20') == str(tmp_path / 'v-tf2.20')
  monkeypatch.delenv(bootstrap.VENV_ENV)
  assert bootstrap.venv_dir('2.20') == os.path.join(pipeline.ROOT, '.venv-tf2.20')


def test_tf_pins_match_pyproject():
  """Every pinned venv installs a TF and TensorBoard that pyproject's ranges admit."""
  text = open(bootstrap.PYPROJECT, encoding='utf-8').read()
  assert '"tensorflow-cpu>=2.20,<2.22"' in text
  assert '"tensorboard>=2.20,<2.22"' in text
  assert bootstrap.TF_PINS[bootstrap.MAIN_TF] == ()
  assert bootstrap.TF_PINS['2.20'] == ('tensorflow-cpu==2.20.*', 'tensorboard==2.20.*')


def test_deps_hash_covers_the_pins():
  plain = bootstrap.deps_hash()
  assert plain == bootstrap.deps_hash(pins=())
  assert bootstrap.deps_hash(pins=bootstrap.TF_PINS['2.20']) != plain


def test_ensure_tf220_installs_the_pins_once_and_stamps(fake_venv):
  base, log = fake_venv
  python = bootstrap.ensure(tf='2.20')
  venv = f'{base}-tf2.20'
  assert python == os.path.join(venv, 'bin', 'python')
  calls = log.read_text().splitlines()
  assert len(calls) == 1
  assert calls[0].startswith(f'{python} -m pip install ')
  assert calls[0].endswith(f'-e {pipeline.ROOT}[cpu,test] tensorflow-cpu==2.20.* tensorboard==2.20.*')
  stamp = open(os.path.join(venv, bootstrap.STAMP_FILE), encoding='utf-8').read().strip()
  assert stamp == bootstrap.deps_hash(pins=bootstrap.TF_PINS['2.20'])
  assert open(os.path.join(venv, '.gitignore'), encoding='utf-8').read().splitlines()[-1] == '*'
  bootstrap.ensure(tf='2.20')  # up to date: no second pip run
  assert len(log.read_text().splitlines()) == 1
  # The main venv is a separate install, without pins.
  bootstrap.ensure()
  calls = log.read_text().splitlines()
  assert len(calls) == 2 and calls[1].endswith(f'-e {pipeline.ROOT}[cpu,test]')


def test_ensure_refuses_an_unknown_tf():
  with pytest.raises(ValueError, match='2.20, 2.21'):
    bootstrap.ensure(tf='2.19')


def test_a_venv_holding_only_bootstrap_files_is_not_foreign(tmp_path):
  (tmp_path / bootstrap.LOCK_FILE).write_text('')
  (tmp_path / '.gitignore').write_text('*\n')
  bootstrap._check_not_foreign(str(tmp_path))  # pylint: disable=protected-access
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(SystemExit):
    bootstrap._check_not_foreign(str(tmp_path))  # pylint: disable=protected-access


@pytest.mark.parametrize('argv, tf, rest', [
    ([], None, []),
    (['-x', '-k', 'resume'], None, ['-x', '-k', 'resume']),
    (['--tf=2.20', '-x'], '2.20', ['-x']),
    (['-q', '--tf', '2.21', 'tests/train_test.py'], '2.21', ['-q', 'tests/train_test.py']),
])
def test_split_tf(argv, tf, rest):
  assert launch_test._split_tf(argv) == (tf, rest)  # pylint: disable=protected-access


@pytest.mark.parametrize('argv', [['--tf=2.19'], ['--tf=2.21.0'], ['--tf='], ['--tf']])
def test_bad_tf_is_a_one_line_usage_error(argv, capsys):
  with pytest.raises(SystemExit) as e:
    launch_test._split_tf(argv)  # pylint: disable=protected-access
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('charlstm: error: ')
  assert '2.20, 2.21' in err[0]


def test_tf_test_files_take_tpu_test_only_where_it_exists(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'ROOT', str(tmp_path))
  (tmp_path / 'tests').mkdir()
  required = [f for f in launch_test.TF_TEST_FILES if f not in launch_test.OPTIONAL_TEST_FILES]
  assert launch_test.tf_test_files() == required
  (tmp_path / 'tests' / 'tpu_test.py').write_text('')
  assert launch_test.tf_test_files() == list(launch_test.TF_TEST_FILES)


@pytest.mark.parametrize('argv, venv_suffix, targets', [
    ([], '', ['tests']),
    (['--tf=2.21'], '', None),
    (['--tf=2.20', '-x'], '-tf2.20', None),
    (['--tf=2.20', 'tests/config_test.py'], '-tf2.20', []),
])
def test_main_picks_venv_and_tests(argv, venv_suffix, targets, monkeypatch, tmp_path):
  monkeypatch.setenv(bootstrap.VENV_ENV, str(tmp_path / 'v'))
  ensured, execs = [], []
  monkeypatch.setattr(bootstrap, 'ensure', lambda tf=None: ensured.append(tf))
  monkeypatch.setattr(bootstrap, 'exec_module',
                      lambda module, args, venv=None: execs.append((module, args, venv)))
  launch_test.main(argv)
  module, args, venv = execs[0]
  assert module == 'pytest' and venv == str(tmp_path / 'v') + venv_suffix
  want = launch_test.tf_test_files() if targets is None else targets
  rest = [a for a in argv if not a.startswith('--tf')]
  if want:  # whole files: in pytest-xdist workers
    assert args[:2] == ['-n', str(max(2, min(4, os.cpu_count() or 2)))]
    args = args[2:]
  assert args == want + ['-q'] + rest


def test_an_explicit_worker_count_is_kept(monkeypatch, tmp_path):
  monkeypatch.setenv(bootstrap.VENV_ENV, str(tmp_path / 'v'))
  execs = []
  monkeypatch.setattr(bootstrap, 'ensure', lambda tf=None: None)
  monkeypatch.setattr(bootstrap, 'exec_module',
                      lambda module, args, venv=None: execs.append(args))
  launch_test.main(['-n', '0'])
  assert execs == [['tests', '-q', '-n', '0']]


BUILD_ONCE = r"""
import pathlib, sys, types
from tests import conftest
worker, run_dir = sys.argv[1], pathlib.Path(sys.argv[2])
base = run_dir / f'popen-{worker}'
base.mkdir(exist_ok=True)
factory = types.SimpleNamespace(getbasetemp=lambda: base)
def build(path):
  with open(run_dir / 'builds.log', 'a') as log:
    log.write(worker + '\n')
  sum(range(3_000_000))  # a build that takes a while: the others ask meanwhile
  (path / 'model').write_text('built by ' + worker)
sys.stdin.readline()  # all four started: ask at once
print(conftest.built_once(factory, 'shared', build))
"""


def test_built_once_builds_once_for_all_xdist_workers(tmp_path):
  # Four worker processes ask for the same fixture at once: one builds, all get its path.
  procs = [subprocess.Popen([sys.executable, '-c', BUILD_ONCE, f'gw{i}', str(tmp_path)],
                            cwd=ROOT, env={**CHILD_ENV, 'PYTEST_XDIST_WORKER': f'gw{i}'},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
           for i in range(4)]
  for p in procs:
    p.stdin.write('go\n')
    p.stdin.flush()
  paths = {p.communicate(timeout=60)[0].strip() for p in procs}
  assert all(p.returncode == 0 for p in procs)
  assert paths == {str(tmp_path / 'shared')}
  builders = (tmp_path / 'builds.log').read_text().split()
  assert len(builders) == 1 and (tmp_path / 'shared' / 'model').read_text() == f'built by {builders[0]}'
