"""Bootstrap: a repo-local venv with the project installed, then run a command in it.

This module (and pipeline.errors, which it uses) is standard library only: it
runs under the bare system `python3` of a fresh clone, before anything is
installed. The README commands (`python3 -m launch.demo`, `python3 -m
launch.test`) call `ensure()`, which

  1. creates the venv (`python3 -m venv .venv`) if it has no python yet;
  2. runs `pip install -e .[cpu,test]` in it unless the stamp file inside the
     venv holds the current hash of pyproject.toml (and of the extras), so
     editing the dependencies reinstalls on the next run and an unchanged
     checkout costs one file read;

and then run the real work with the venv's python (`run`, `exec_module`).

CHARLSTM_VENV overrides the venv location (default: <repo>/.venv).
"""

import hashlib
import os
import shutil
import subprocess
import sys

import pipeline
from pipeline import errors

PYPROJECT = os.path.join(pipeline.ROOT, 'pyproject.toml')
VENV_ENV = 'CHARLSTM_VENV'
EXTRAS = 'cpu,test'
STAMP_FILE = 'charlstm-deps.sha256'
LOCK_FILE = 'charlstm-deps.lock'
MIN_PYTHON = (3, 10)


def say(message):
  print(f'charlstm: {message}', file=sys.stderr, flush=True)


def venv_dir():
  """The venv path: $CHARLSTM_VENV, else <repo>/.venv."""
  path = os.environ.get(VENV_ENV) or os.path.join(pipeline.ROOT, '.venv')
  return os.path.abspath(os.path.expanduser(path))


def venv_python(venv=None):
  venv = venv or venv_dir()
  if os.name == 'nt':
    return os.path.join(venv, 'Scripts', 'python.exe')
  return os.path.join(venv, 'bin', 'python')


def deps_hash(extras=EXTRAS):
  """Hash of pyproject.toml plus the extras installed; the stamp file holds it."""
  with open(PYPROJECT, 'rb') as f:
    digest = hashlib.sha256(f.read())
  digest.update(f'\n[extras] {extras}\n'.encode())
  return digest.hexdigest()


def _read(path):
  try:
    with open(path, encoding='utf-8') as f:
      return f.read().strip()
  except OSError:
    return None


class _Lock:
  """Serialises concurrent bootstraps of one venv (no-op where fcntl is missing)."""

  def __init__(self, path):
    self.path = path
    self.file = None

  def __enter__(self):
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:
      return self
    self.file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    fcntl.flock(self.file, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    if self.file:
      self.file.close()  # releases the lock


def _check_not_foreign(venv):
  """Refuses a non-empty directory that is not a venv, before touching anything in it."""
  if not os.path.isdir(venv) or os.path.exists(os.path.join(venv, 'pyvenv.cfg')):
    return
  if set(os.listdir(venv)) - {LOCK_FILE}:
    errors.fail(f'{venv} exists and is not a venv. Set {VENV_ENV} to a new directory '
                '(or an existing venv) and re-run.')


def ensure_venv(venv):
  """Creates the venv with `python3 -m venv` unless it already has a python."""
  python = venv_python(venv)
  if os.path.exists(python):
    return python
  if sys.version_info < MIN_PYTHON:
    errors.fail(f'charlstm needs Python >= {".".join(map(str, MIN_PYTHON))}, but '
                f'{sys.executable} is {sys.version.split()[0]}. Run the command with a newer '
                'python3.')
  leftovers = sorted(set(os.listdir(venv)) - {LOCK_FILE})
  if leftovers:
    # A venv without a working python: interrupted creation, or its base
    # interpreter was removed. Rebuild it (_check_not_foreign made sure it is one).
    _check_not_foreign(venv)
    say(f'{venv} has no working python; recreating it ...')
    for name in leftovers:
      path = os.path.join(venv, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  say(f'creating {venv} ...')
  code = subprocess.call([sys.executable, '-m', 'venv', venv])
  if code or not os.path.exists(python):
    errors.fail(f'`{sys.executable} -m venv {venv}` failed (exit {code}). Install the venv '
                'module (Debian/Ubuntu: `sudo apt-get install python3-venv`) or set '
                f'{VENV_ENV} to a writable directory, then re-run.')
  return python


def ensure_deps(venv, extras=EXTRAS):
  """Installs `-e .[extras]` into the venv unless its stamp matches pyproject.toml."""
  python = venv_python(venv)
  stamp = os.path.join(venv, STAMP_FILE)
  want = deps_hash(extras)
  if _read(stamp) == want:
    return python
  if os.path.exists(stamp):
    say('pyproject.toml changed; updating dependencies ...')
    os.remove(stamp)  # an interrupted reinstall must not look up to date
  else:
    say('installing dependencies (first run takes a few minutes) ...')
  code = subprocess.call(
      [python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
       '-e', f'{pipeline.ROOT}[{extras}]'], cwd=pipeline.ROOT, env=_env())
  if code:
    errors.fail(f'`pip install -e .[{extras}]` failed in {venv} (exit {code}); see pip\'s '
                'message above. Fix its cause (network, disk space, proxy settings) and '
                f're-run, or delete {venv} to start over.')
  tmp = f'{stamp}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(want + '\n')
  os.replace(tmp, stamp)
  say('dependencies installed.')
  return python


def ensure(extras=EXTRAS):
  """Makes sure the venv exists and matches pyproject.toml; returns its python.

  Holds a lock file inside the venv directory meanwhile, so two commands
  started together on a fresh clone install once, not twice at the same time.
  """
  venv = venv_dir()
  _check_not_foreign(venv)
  try:
    os.makedirs(venv, exist_ok=True)
  except OSError as e:
    errors.fail(f'cannot create {venv}: {e.strerror}. Set {VENV_ENV} to a writable directory.')
  with _Lock(os.path.join(venv, LOCK_FILE)):
    ensure_venv(venv)
    return ensure_deps(venv, extras)


def _env(base=None):
  env = dict(os.environ if base is None else base)
  env.pop('PYTHONHOME', None)  # would point the venv's python at another stdlib
  return env


def run(args, **kwargs):
  """Runs `<venv python> *args` from the repo root and returns its exit code.

  Ctrl-C reaches the child too (same process group); we wait for it to finish
  (launch.train checkpoints before stopping) and return its code.
  """
  kwargs.setdefault('cwd', pipeline.ROOT)
  kwargs['env'] = _env(kwargs.get('env'))
  proc = subprocess.Popen([venv_python()] + list(args), **kwargs)  # pylint: disable=consider-using-with
  while True:
    try:
      return proc.wait()
    except KeyboardInterrupt:
      continue


def run_module(module, args=(), **kwargs):
  """`python -m module *args` in the venv; returns the exit code."""
  return run(['-m', module] + list(args), **kwargs)


def exec_module(module, args=()):
  """Replaces this process with `<venv python> -m module *args`, run from the repo root."""
  python = venv_python()
  argv = [python, '-m', module] + list(args)
  sys.stdout.flush()
  sys.stderr.flush()
  if os.name == 'nt':  # no real exec on Windows: wait and pass the exit code on
    sys.exit(run(argv[1:]))
  os.chdir(pipeline.ROOT)
  os.execve(python, argv, _env())
