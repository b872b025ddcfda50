"""The fused LSTM's C++ ops (cell.cc, sequence*.cc), compiled for this CPU at first use.

pipeline.fused_lstm runs its recurrence with them where train.cell_kernels
picks 'cc' (CPU, outside XLA):
- float32: sequence.cc, each layer's whole recurrence (time loop, recurrent
  matmuls, gate math) as one op forward and one backward, one thread per
  chain. The train step ran 1.31x faster than with the per-step C++ gate
  kernels at H=256 and 1.02x at H=512 (same-process A/B; BUILD.md).
- bfloat16 where the build has AVX512-BF16 (`sequence_dtypes`): the same
  op, its products on AMX tiles where the CPU has AMX (amx.h; 2.29x
  float32's train step at H=512), else on vdpbf16ps (1.58x on an AMD Zen 5).
- bfloat16 elsewhere: cell.cc, the per-step gate math between oneDNN's
  bfloat16 matmuls. As XLA kernels these cost more than their arithmetic (a
  dozen fusions per call, 400 calls per step at T=100); the C++ op made the
  train step 1.17-1.29x faster (and float32 1.10-1.23x, before sequence.cc).
Bench row d4 (the XLA kernels) measures the difference in every run.

`load()` compiles both files into one binary with $CXX (else g++, else
c++) against this interpreter's TensorFlow headers (tf.sysconfig) with -O3
-march=native, into a cache directory: $CHARLSTM_OPS_DIR, else <venv>/charlstm-ops, else
~/.cache/charlstm-ops. The file name hashes everything the binary depends on
(the sources, TensorFlow's version and headers, the CPU's feature flags), so a
venv shared by different machines or TensorFlow versions keeps one binary per
combination. One process compiles (about 8 s, one compiler per source) while the others wait on a file
lock; the rest load the binary in milliseconds, compiler or not.

Where it cannot be built (no compiler, no headers, another OS), `resolve`
says so once and the XLA kernels run: the same math, slower. The ops never
reach a SavedModel (the sampler's one-char step is plain TensorFlow ops) or
an XLA-compiled step, so nothing but this process's train step depends on them.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from absl import logging
import tensorflow as tf

from pipeline import config
from pipeline import errors

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(_HERE, name)
           for name in ('cell.cc', 'sequence.cc', 'sequence_ops.cc')]
HEADERS = [os.path.join(_HERE, name)
           for name in ('packets.h', 'panels.h', 'amx.h', 'tiles.h')]
KINDS = config.CELL_KERNELS
_COMPILE_TIMEOUT_S = 600
# Tried in order: Eigen's AVX512-FP16 packet code fails to compile with GCC 12
# (PacketMathFP16.h), and the gate math has no float16, so that extension is
# turned off where the compiler knows the flag; the last set builds anywhere.
_ARCH_FLAGS = (['-march=native', '-mno-avx512fp16'], ['-march=native'], [])

_state = {}  # 'module' once loaded, or 'error': why it could not be (one try per process)


class BuildError(errors.Error):
  """The C++ gate op could not be built or loaded on this machine."""


def _cpu_flags():
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _binary_name():
  key = hashlib.sha256()
  for path in SOURCES + HEADERS:
    with open(path, 'rb') as f:
      key.update(f.read())
  for part in (tf.__version__, tf.sysconfig.get_include(), platform.machine(), _cpu_flags(),
               *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()):
    key.update(part.encode() + b'\0')
  return f'cell-{key.hexdigest()[:16]}.so'


def cache_dir():
  """Where the compiled op lives (see the module docstring)."""
  if os.environ.get('CHARLSTM_OPS_DIR'):
    return os.environ['CHARLSTM_OPS_DIR']
  if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
    return os.path.join(sys.prefix, 'charlstm-ops')
  return os.path.join(os.path.expanduser('~'), '.cache', 'charlstm-ops')


def find_compiler():
  """The C++ compiler a build would use ($CXX, else g++, else c++), or None."""
  return next((shutil.which(name) for name in (os.environ.get('CXX'), 'g++', 'c++')
               if name and shutil.which(name)), None)


def _compiler():
  cxx = find_compiler()
  if cxx:
    return cxx
  raise BuildError(f'no C++ compiler: $CXX is {os.environ.get("CXX")!r} and neither g++ nor '
                   'c++ is on PATH. Install one (Debian: apt-get install g++), or set '
                   '--config.train.cell_kernels=xla.')


def _run_together(cmds):
  """Runs the commands side by side; the first failure's last stderr line, else ''."""
  procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for cmd in cmds]
  failure = ''
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=_COMPILE_TIMEOUT_S)
      if proc.returncode and not failure:
        failure = (err.strip().splitlines() or ['(no output)'])[-1]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return failure


def _compile(path):
  """Builds the op into `path` (atomically: a reader never sees half a file).

  Each source compiles in its own compiler process (sequence.cc and cell.cc
  take about as long each, so two cores halve the first run's wait), then
  one link.
  """
  cxx = _compiler()
  tmp = tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix='.so.tmp', delete=False)
  tmp.close()
  last = ''
  try:
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as objects:
      for arch in _ARCH_FLAGS:
        outs = [os.path.join(objects, os.path.basename(src) + '.o') for src in SOURCES]
        last = _run_together([[cxx, '-O3', *arch, '-fPIC', '-w', '-c', src, '-o', out,
                               *tf.sysconfig.get_compile_flags()]
                              for src, out in zip(SOURCES, outs)])
        if not last:
          last = _run_together([[cxx, '-shared', *outs, '-o', tmp.name,
                                 *tf.sysconfig.get_link_flags()]])
        if not last:
          os.replace(tmp.name, path)
          logging.info('kernels.cell: compiled %s (%s)', path, ' '.join(arch) or 'no -march')
          return
  finally:
    if os.path.exists(tmp.name):
      os.remove(tmp.name)
  raise BuildError(f'{os.path.basename(cxx)} could not compile {" ".join(SOURCES)}: {last[:300]} '
                   'Set --config.train.cell_kernels=xla to train without it.')


def _build_and_load():
  directory = cache_dir()
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, _binary_name())
  if not os.path.exists(path):
    try:
      import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only
    except ImportError:
      fcntl = None
    with open(os.path.join(directory, '.lock'), 'w', encoding='utf-8') as lock:
      if fcntl:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      if not os.path.exists(path):  # another process may have built it meanwhile
        _compile(path)
  try:
    return tf.load_op_library(path)
  except (tf.errors.OpError, OSError) as e:
    raise BuildError(f'could not load the compiled gate op {path}: '
                     f'{str(e).splitlines()[0][:300]} Delete it to rebuild, or set '
                     '--config.train.cell_kernels=xla.') from None


def load():
  """The compiled ops' module (charlstm_cell_*, charlstm_sequence_*); raises BuildError."""
  if 'module' not in _state and 'error' not in _state:
    try:
      _state['module'] = _build_and_load()
    except (BuildError, OSError, subprocess.SubprocessError) as e:
      _state['error'] = e if isinstance(e, BuildError) else BuildError(
          f'building the C++ gate op failed: {e}. Set --config.train.cell_kernels=xla.')
  if 'error' in _state:
    raise _state['error']
  return _state['module']


def sequence_dtypes():
  """The matmul dtypes whose whole recurrence runs as sequence.cc's op here.

  float32 always (once the ops load). bfloat16 where this build multiplies
  bfloat16 natively (the op library says; it registers no slow emulation):
  on AMX tiles where the CPU has AMX (amx.h; the train step 2.29x float32's
  at H=512 against 1.36x for the per-step loop of oneDNN's AMX matmuls, same
  process, 2026-12-07), else with AVX512-BF16's vdpbf16ps (1.58x float32 at
  H=512 on an AMD Zen 5). On an AMX CPU whose kernel refuses this process
  the tiles, the per-step loop, which oneDNN runs as it can, stays: the
  vdpbf16ps op measured 1.05x float32 there against 1.33x.
  """
  if 'dtypes' not in _state:
    ops = load()
    with tf.init_scope():  # an eager answer, also while a tf.function traces
      native = bool(ops.charlstm_sequence_bf16_native())
      tiles = bool(ops.charlstm_sequence_amx())
    amx = 'amx_bf16' in _cpu_flags().split()
    _state['dtypes'] = (tf.float32, tf.bfloat16) if native and (tiles or not amx) else (tf.float32,)
  return _state['dtypes']


def resolve(kind):
  """train.cell_kernels -> 'cc' or 'xla'. 'auto' falls back to XLA with one warning."""
  if kind not in KINDS:
    raise ValueError(f'cell_kernels must be one of {KINDS}, got {kind!r}')
  if kind == 'xla':
    return 'xla'
  try:
    load()
  except BuildError as e:
    if kind == 'cc':
      raise
    if not _state.get('warned'):
      _state['warned'] = True
      logging.warning('kernels.cell: %s Training runs the XLA gate kernels instead: the same '
                      'math, 1.1-1.3x slower.', e)
    return 'xla'
  return 'cc'
