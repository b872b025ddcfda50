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

The test extra pulls in the serve and litert extras (their tests run them), so
the test venvs hold `-e .[cpu,test]`, the HTTP stack and ai-edge-litert (so
EXTRAS stays cpu,test); training machines install `.[cpu]`, `.[gpu]` or
`.[tpu]` without them. The browser test also needs
a system Chromium, which pip cannot install: `chromium()` finds Debian's
/usr/bin/chromium, runs `apt-get install -y chromium` when it is missing and
we are root, and otherwise fails with one line saying how to install it
(.ci/run calls it first; the browser test calls it too, so it never skips).

One venv per supported TensorFlow minor (TF_PINS): the main venv gets whatever
TF pyproject.toml's cpu extra resolves to (pip picks the newest, 2.21), and
`ensure(tf='2.20')` keeps a second venv, <main venv>-tf2.20, that installs the
same `-e .[cpu,test]` plus `tensorflow-cpu==2.20.* tensorboard==2.20.*`, stamped
the same way (the pins are part of the hash). `python3 -m launch.test --tf=2.20`
uses it: TPU VMs run 2.20, the newest TF with a tensorflow-tpu wheel.
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
# Git must not see a venv that sits in the checkout under a name .gitignore
# does not list (.venv-tf2.20): a `*` .gitignore inside it hides it, as
# Python 3.13's venv module does itself.
GITIGNORE = '.gitignore'
_OWN_FILES = frozenset({LOCK_FILE, GITIGNORE})  # what ensure() writes before the venv exists

# The TensorFlow minor versions charlstm supports, and what each one's venv
# installs besides `-e .[EXTRAS]`. MAIN_TF's venv pins nothing: pip picks the
# newest TF the cpu extra allows, as on a developer's machine. Keep in step
# with pyproject.toml's ranges (tensorboard is released in lockstep with TF).
MAIN_TF = '2.21'
TF_PINS = {
    '2.21': (),
    '2.20': ('tensorflow-cpu==2.20.*', 'tensorboard==2.20.*'),
}


# Debian's package; Playwright drives it (a `playwright install` browser
# download cannot work on a closed network).
CHROMIUM = '/usr/bin/chromium'


class MissingBrowser(errors.Error):
  """The browser test's Chromium is missing and cannot be installed from here."""


class MissingCompiler(errors.Error):
  """The C++ gate op's tests need a compiler, and none can be installed from here."""


def say(message):
  print(f'charlstm: {message}', file=sys.stderr, flush=True)


def venv_dir(tf=None):
  """The venv path: $CHARLSTM_VENV, else <repo>/.venv; for a TF other than MAIN_TF, that plus -tfX.Y."""
  path = os.environ.get(VENV_ENV) or os.path.join(pipeline.ROOT, '.venv')
  path = os.path.abspath(os.path.expanduser(path))
  if tf and tf != MAIN_TF:
    path = f'{path}-tf{tf}'
  return path


def venv_python(venv=None):
  venv = venv or venv_dir()
  if os.name == 'nt':
    return os.path.join(venv, 'Scripts', 'python.exe')
  return os.path.join(venv, 'bin', 'python')


def deps_hash(extras=EXTRAS, pins=()):
  """Hash of pyproject.toml plus the extras and pins installed; the stamp file holds it."""
  with open(PYPROJECT, 'rb') as f:
    digest = hashlib.sha256(f.read())
  digest.update(f'\n[extras] {extras}\n'.encode())
  if pins:  # absent for the main venv, so its hash is what it always was
    digest.update(f'[pins] {" ".join(pins)}\n'.encode())
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
  if set(os.listdir(venv)) - _OWN_FILES:
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
  leftovers = sorted(set(os.listdir(venv)) - _OWN_FILES)
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


def ensure_deps(venv, extras=EXTRAS, pins=()):
  """Installs `-e .[extras] *pins` into the venv unless its stamp matches pyproject.toml."""
  python = venv_python(venv)
  stamp = os.path.join(venv, STAMP_FILE)
  want = deps_hash(extras, pins)
  if _read(stamp) == want:
    return python
  if os.path.exists(stamp):
    say('pyproject.toml changed; updating dependencies ...')
    os.remove(stamp)  # an interrupted reinstall must not look up to date
  else:
    say('installing dependencies (first run takes a few minutes) ...')
  # One pip call for the project and the pins, so the resolver intersects
  # them (tensorflow-cpu>=2.20,<2.22 with ==2.20.* gives 2.20) instead of a
  # second call up- or downgrading what the first installed.
  code = subprocess.call(
      [python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
       '-e', f'{pipeline.ROOT}[{extras}]'] + list(pins), cwd=pipeline.ROOT, env=_env())
  if code:
    what = ' '.join([f'-e .[{extras}]'] + [f"'{p}'" for p in pins])
    errors.fail(f'`pip install {what}` failed in {venv} (exit {code}); see pip\'s '
                'message above. Fix its cause (network, disk space, proxy settings) and '
                f're-run, or delete {venv} to start over.')
  tmp = f'{stamp}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(want + '\n')
  os.replace(tmp, stamp)
  say('dependencies installed.')
  return python


def ensure(extras=EXTRAS, tf=None):
  """Makes sure the venv (for TF minor `tf`, default MAIN_TF) exists and matches pyproject.toml.

  Returns its python. Holds a lock file inside the venv directory meanwhile,
  so two commands started together on a fresh clone install once, not twice
  at the same time.
  """
  tf = tf or MAIN_TF
  if tf not in TF_PINS:
    raise ValueError(f'unsupported TensorFlow {tf!r}; supported: {", ".join(sorted(TF_PINS))}')
  venv = venv_dir(tf)
  _check_not_foreign(venv)
  try:
    os.makedirs(venv, exist_ok=True)
    gitignore = os.path.join(venv, GITIGNORE)
    if not os.path.exists(gitignore):
      with open(gitignore, 'w', encoding='utf-8') as f:
        f.write('# Created by charlstm\'s bootstrap: git ignores this venv.\n*\n')
  except OSError as e:
    errors.fail(f'cannot create {venv}: {e.strerror}. Set {VENV_ENV} to a writable directory.')
  with _Lock(os.path.join(venv, LOCK_FILE)):
    ensure_venv(venv)
    return ensure_deps(venv, extras, TF_PINS[tf])


def _env(base=None):
  env = dict(os.environ if base is None else base)
  env.pop('PYTHONHOME', None)  # would point the venv's python at another stdlib
  return env


def run(args, venv=None, **kwargs):
  """Runs `<venv python> *args` from the repo root and returns its exit code.

  `venv` defaults to the main venv (venv_dir()). Ctrl-C reaches the child too
  (same process group); we wait for it to finish (launch.train checkpoints
  before stopping) and return its code.
  """
  kwargs.setdefault('cwd', pipeline.ROOT)
  kwargs['env'] = _env(kwargs.get('env'))
  proc = subprocess.Popen([venv_python(venv)] + list(args), **kwargs)  # pylint: disable=consider-using-with
  while True:
    try:
      return proc.wait()
    except KeyboardInterrupt:
      continue


def run_module(module, args=(), venv=None, **kwargs):
  """`python -m module *args` in the venv; returns the exit code."""
  return run(['-m', module] + list(args), venv=venv, **kwargs)


def exec_module(module, args=(), venv=None):
  """Replaces this process with `<venv python> -m module *args`, run from the repo root."""
  python = venv_python(venv)
  argv = [python, '-m', module] + list(args)
  sys.stdout.flush()
  sys.stderr.flush()
  if os.name == 'nt':  # no real exec on Windows: wait and pass the exit code on
    sys.exit(run(argv[1:], venv=venv))
  os.chdir(pipeline.ROOT)
  os.execve(python, argv, _env())


def _apt_install(package, present, need, missing):
  """`apt-get install -y package` (refreshing the lists once) if we are root; else raises.

  need: what wants the package, for the messages; missing: the error class.
  """
  if os.name != 'posix' or os.geteuid() != 0 or not shutil.which('apt-get'):
    raise missing(f'{need}: run `sudo apt-get install -y {package}` (Debian/Ubuntu), '
                  'then re-run.')
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  install = ['apt-get', 'install', '-y', '-q', package]
  say(f'running `{" ".join(install)}`: {need} ...')
  code = subprocess.call(install, env=env)
  if code:  # stale or missing package lists: refresh them once and retry
    subprocess.call(['apt-get', 'update', '-q'], env=env)
    code = subprocess.call(install, env=env)
  if code or not present():
    raise missing(f'`{" ".join(install)}` failed (exit {code}); {need}. '
                  'Install it by hand, then re-run.')


def chromium(path=CHROMIUM):
  """Returns `path`, after `apt-get install -y chromium` if it is missing and we are root.

  Raises MissingBrowser (one line: how to install it) when it is missing and
  cannot be installed here.
  """
  if not os.path.exists(path):
    _apt_install('chromium', lambda: os.path.exists(path),
                 f'the browser test needs Chromium at {path}', MissingBrowser)
  return path


def cxx():
  """The C++ compiler pipeline/kernels/cell.py would use, after `apt-get install -y g++` if none.

  Training falls back to XLA kernels without one; the tests of the C++ gate
  op need it, so they call this (as the browser test calls chromium()).
  Raises MissingCompiler (one line) when none is found and none can be installed.
  """
  # Imported here: it imports TensorFlow, and this module must not (see the docstring).
  from pipeline.kernels import cell  # pylint: disable=g-import-not-at-top
  if not cell.find_compiler():
    _apt_install('g++', cell.find_compiler, 'the C++ gate op tests need a C++ compiler',
                 MissingCompiler)
  return cell.find_compiler()


def ensure_chromium():
  """chromium() for scripts (.ci/run): a MissingBrowser is a one-line error, exit 2."""
  try:
    chromium()
  except MissingBrowser as e:
    errors.fail(e)
