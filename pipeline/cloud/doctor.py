"""launch.doctor: a preflight of a config on the machine that will train it.

Each check builds the real pieces training uses, on this machine, and prints
one line as soon as it ends (`ok` or `FAILED`, what it found or why, seconds):

  devices     the devices TensorFlow sees and the strategy runtime.strategy picks
  corpus      the config's corpus, read as training reads it (local, gs:// or tfds:)
  train       STEPS real train steps through the compiled train loop, and one
              validation batch: on a GPU with use_cudnn=True, so a silent fall-back
              from cuDNN to the generic kernel fails loudly; on a TPU compiled as
              training compiles it
  checkpoint  the training state saved to, found in and restored from
              <workdir>/doctor-<id>/, values compared, then deleted
  export      a SavedModel written to <workdir>/doctor-<id>/, loaded on the CPU
              and sampled through its `generate` signature, then deleted

A check that fails prints FAILED and the doctor goes on with the checks that
do not depend on it; `run` returns False if any failed (launch.doctor exits 1;
--verbosity=1 logs the failed check's stack).
Bad input or an unusable environment (pipeline errors.Error: no TPU for
strategy=tpu, a missing corpus, no gs:// credentials) stops the doctor with
the usual one-line error and exit 2, naming the check it stopped in.

The workdir's own files (checkpoints/, export/, ...) are never touched, and
the doctor leaves nothing behind in it.
"""

import dataclasses
import math
import sys
import time
import unicodedata
import uuid

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import config as config_lib
from pipeline import distribute
from pipeline import errors
from pipeline import export as export_lib
from pipeline import source
from pipeline import steps as steps_lib
from pipeline import storage
from pipeline import train as train_lib

STEPS = 3  # enough to run the step twice after its first (compiling) call
SAMPLE_CHARS = 20  # characters the export check samples
_MAX_DEVICES_LISTED = 8


class DoctorError(errors.Error):
  """An errors.Error raised inside a check, its message prefixed with the check's name."""

  def __init__(self, check, error):
    super().__init__(f'{check}: {error}')
    self.exit_code = error.exit_code


@dataclasses.dataclass
class Result:
  name: str
  ok: bool
  detail: str  # what it found, or why it failed
  seconds: float


def _why(e):
  """One line saying why a check failed: the exception's type and the telling line."""
  text = str(getattr(e, 'message', None) or e)
  lines = [l.strip() for l in text.splitlines() if l.strip()] or [type(e).__name__]
  # Errors raised inside a tf.function open with "in user code:" and a stack;
  # what went wrong is the last line.
  line = lines[-1] if lines[0].endswith(':') else lines[0]
  return ' '.join(f'{type(e).__name__}: {line}'.split())[:400]


class _Report:
  """Runs checks, prints one line for each as it ends, and keeps the results."""

  def __init__(self, out):
    self.out = out
    self.results = []
    self.start = time.perf_counter()

  def _line(self, result):
    self.results.append(result)
    status = 'ok' if result.ok else 'FAILED'
    print(f'{status:<7} {result.name}: {result.detail} [{result.seconds:.1f} s]',
          file=self.out, flush=True)

  def check(self, name, fn):
    """Runs fn() -> (detail, value); prints the line; returns value, or None if it failed."""
    t0 = time.perf_counter()
    try:
      detail, value = fn()
    except errors.Error as e:
      # Bad input, as training would report it: one line and exit 2 (errors.run).
      raise DoctorError(name, e) from e
    except Exception as e:  # pylint: disable=broad-except  # any failure is the finding
      # The stack only with --verbosity=1: by default a failed check is its line,
      # not a traceback that reads like a crash of the doctor.
      logging.debug('doctor: the %s check failed', name, exc_info=True)
      self._line(Result(name, False, _why(e), time.perf_counter() - t0))
      return None
    self._line(Result(name, True, detail, time.perf_counter() - t0))
    return value

  def skip(self, name, needs):
    self._line(Result(name, False, f'not run: needs the {needs} check', 0.0))

  def summary(self):
    failed = [r.name for r in self.results if not r.ok]
    seconds = time.perf_counter() - self.start
    if failed:
      line = (f'doctor: {len(failed)} of {len(self.results)} checks FAILED '
              f'({", ".join(failed)}) in {seconds:.1f} s')
    else:
      line = f'doctor: all {len(self.results)} checks ok in {seconds:.1f} s'
    print(line, file=self.out, flush=True)
    return not failed


def strategy_name(strategy):
  """The runtime.strategy value that names `strategy` (what 'auto' picked)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return 'tpu'
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 'multi_worker'
  if isinstance(strategy, tf.distribute.MirroredStrategy):
    return 'mirrored'
  device = strategy.extended.worker_devices[0].upper()
  return 'gpu' if 'GPU:' in device else 'cpu'


def _device(name):
  """'/device:CPU:0' -> 'CPU:0'; a cluster's '/job:worker/replica:0/task:1/device:CPU:0' -> 'task:1 CPU:0'."""
  where, _, device = name.rpartition('/device:')
  task = where.rpartition('/task:')[2] if '/task:' in where else ''
  return f'task:{task} {device}' if task and not where.startswith('/job:localhost') else device


def _devices():
  names = [_device(d.name) for d in tf.config.list_logical_devices()]
  shown = ', '.join(names[:_MAX_DEVICES_LISTED])
  return shown + (f', ... ({len(names)} in all)' if len(names) > _MAX_DEVICES_LISTED else '')


def _check_devices(config):
  strategy = distribute.make_strategy(config.runtime)
  distribute.check_batch(config.data.batch_size, strategy)
  distribute.check_batch(config.data.eval_batch_size, strategy, 'data.eval_batch_size')
  n = strategy.num_replicas_in_sync
  detail = (f'{_devices()} (strategy {config.runtime.strategy} -> {strategy_name(strategy)}, '
            f'{n} replica{"s" if n != 1 else ""})')
  return detail, strategy


def _check_corpus(config):
  # The whole corpus, read as train.py reads it: a gs:// or tfds: corpus that
  # cannot be read is one of the things the doctor is for, and its time here
  # is the time training spends on it before the first step.
  corpus = source.open_corpus(config.data)
  detail = (f'{config.data.corpus}: {len(corpus.train):,} train / {len(corpus.val):,} val '
            f'chars, vocab {corpus.vocab.size}{", streamed" if corpus.streamed else ""}')
  return detail, corpus


def _check_train(config, strategy, corpus, use_cudnn):
  # train_and_evaluate's own pieces (prompt check, datasets), so the doctor
  # cannot drift from what training feeds the step.
  train_lib.check_prompt(config, corpus.vocab)
  training = steps_lib.setup(config, strategy, corpus.vocab.size, use_cudnn=use_cudnn)
  train_ds, eval_ds, _ = train_lib.datasets(config, strategy, corpus, 0)
  loss = float(training.loops.train(iter(train_ds), STEPS))
  step = int(training.step.numpy())
  if not math.isfinite(loss):
    raise FloatingPointError(f'the loss of {STEPS} steps is {loss}')
  if step != STEPS:
    raise AssertionError(f'the step counter is {step} after {STEPS} steps')
  # One validation batch too: a run that cannot evaluate dies at train.eval_every.
  d = config.data
  val = float(training.loops.eval(iter(eval_ds), tf.constant(1)))
  val /= d.eval_batch_size * d.seq_length
  if not math.isfinite(val):
    raise FloatingPointError(f'the validation loss of one batch is {val}')
  detail = (f'{STEPS} steps, loss {loss:.3f} nats/char (ln V = '
            f'{math.log(corpus.vocab.size):.3f}), one val batch {val:.3f}; XLA '
            f'{training.jit_mode}, use_cudnn={use_cudnn!r}')
  if training.loops.fused:  # which gate kernels: the C++ op (pipeline.kernels.cell) or XLA's
    detail += f', fused LSTM gate kernels {training.loops.kernels}'
  return detail, training


def _state(training):
  """Every variable a checkpoint holds, in a fixed order, with its name."""
  named = [(v.name, v) for v in training.models.variables]
  named += [('step', training.step), ('best_val', training.best_val)]
  named += [(f'train_state_{i}', v) for i, v in enumerate(training.train_state)]
  return named


def _check_checkpoint(training, scratch):
  directory = storage.join(scratch, 'checkpoints')
  storage.makedirs(directory)
  ckpt = training.checkpoint()
  # CheckpointManager and latest_checkpoint, as pipeline.checkpoint uses them.
  manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=1)
  saved = manager.save(checkpoint_number=int(training.step.numpy()))
  found = tf.train.latest_checkpoint(directory)
  if found != saved:
    raise AssertionError(f'latest_checkpoint found {found!r}, not the saved {saved!r}')
  named = _state(training)
  before = [v.numpy() for _, v in named]
  # Change what was saved, so that equal values afterwards prove the restore.
  for v in training.models.variables:
    v.assign(v + 1.0)
  training.step.assign_add(1000)
  ckpt.restore(found).assert_existing_objects_matched()
  differ = [name for (name, v), b in zip(named, before) if not np.array_equal(v.numpy(), b)]
  if differ:
    raise AssertionError(f'restored values differ from the saved ones: {", ".join(differ[:5])}')
  storage.rmtree(directory)
  if storage.exists(directory):
    raise AssertionError(f'{directory} is still there after deleting it')
  return f'{len(named)} variables saved, restored and equal; deleted ({found})', True


def _prompt(config):
  # NFC, as train.py samples it (and as the corpus was read).
  return unicodedata.normalize('NFC', config.train.sample_prompt)


def _check_export(config, training, vocab, scratch):
  export_dir = storage.join(scratch, 'export')
  export_lib.export_models(training.models, vocab, export_dir)
  prompt = _prompt(config)
  # On the CPU: where launch.sample and most servers run the export, whatever
  # device trained it (a GPU-only op in the SavedModel fails here).
  with tf.device('/cpu:0'):
    loaded = tf.saved_model.load(export_dir)
    out = loaded.signatures['generate'](
        prompts=tf.constant([prompt]), num_chars=tf.constant(SAMPLE_CHARS),
        temperature=tf.constant(0.8), top_k=tf.constant(0),
        seed=tf.constant(config.seed, tf.int64))
  text = out['text'][0].numpy().decode('utf-8')
  del loaded
  if len(text) != SAMPLE_CHARS or not set(text) <= set(vocab.chars):
    raise AssertionError(f'generate gave {text!r}, not {SAMPLE_CHARS} characters of the '
                         'vocabulary')
  storage.rmtree(export_dir)
  if storage.exists(export_dir):
    raise AssertionError(f'{export_dir} is still there after deleting it')
  return f'saved, loaded on the CPU, generate({prompt!r}) -> {text!r}; deleted', True


def _clean_up(workdir, scratch, made_workdir):
  """Deletes the doctor's directory, and the workdir too if the doctor made it and it is empty."""
  storage.rmtree(scratch)
  if made_workdir and storage.exists(workdir) and not storage.gfile.listdir(workdir):
    storage.rmtree(workdir)


def run(config, workdir, out=None):
  """Runs every check of `config` on this machine with `workdir`; True if all passed.

  Args:
    config: a ConfigDict from configs/ (see pipeline.config).
    workdir: the run directory training will use, local or gs://; the doctor
      works in a fresh <workdir>/doctor-<id>/ and deletes it.
    out: where the lines go (default stdout).

  Raises:
    errors.Error: bad input (DoctorError naming the check), as training raises it.
  """
  out = out or sys.stdout
  config = config_lib.finalize(config)
  if config.runtime.deterministic:
    tf.config.experimental.enable_op_determinism()  # training's tf.data rewrites too
  # Credentials and bucket first: a gs:// workdir that cannot work is one line now,
  # before minutes of checks.
  storage.check_gcs_path(workdir)
  report = _Report(out)
  strategy = report.check('devices', lambda: _check_devices(config))
  corpus = report.check('corpus', lambda: _check_corpus(config))
  # True on a GPU: Keras's 'auto' would quietly take the generic kernel when a
  # layer or the installed cuDNN cannot run the fused one; True raises instead.
  use_cudnn = True if distribute.has_gpu() else 'auto'
  training = None
  if strategy is None or corpus is None:
    report.skip('train', 'devices' if strategy is None else 'corpus')
  else:
    training = report.check('train', lambda: _check_train(config, strategy, corpus, use_cudnn))
  if training is None:
    report.skip('checkpoint', 'train')
    report.skip('export', 'train')
    return report.summary()
  scratch = storage.join(workdir, f'doctor-{uuid.uuid4().hex[:12]}')
  made_workdir = not storage.exists(workdir)
  try:
    report.check('checkpoint', lambda: _check_checkpoint(training, scratch))
    report.check('export', lambda: _check_export(config, training, corpus.vocab, scratch))
  finally:
    try:
      _clean_up(workdir, scratch, made_workdir)
    except Exception as e:  # pylint: disable=broad-except  # a check has said why already
      print(f'doctor: could not delete {scratch}: {_why(e)}', file=out, flush=True)
  return report.summary()
