"""Checkpoints per worker role, and preemption: save at an agreed step, then exit 75.

The chief (worker 0, or the only process) writes `<workdir>/checkpoints` and
`<workdir>/best`. Under MultiWorkerMirroredStrategy every worker must take part
in a save, so the others write to `<workdir>/workertemp_<i>/`, which is
deleted when they finish. Every worker restores from the chief's directory, so
workdirs must be on storage all hosts share (a gs:// bucket on a cluster).

Preemption: on one host, SIGINT/SIGTERM set a flag checked at loop
boundaries. With several workers, TensorFlow's PreemptionCheckpointHandler
watches SIGTERM on every worker and agrees on a run count through the
coordination service, so all workers save the same step before exiting.
"""

import os
import signal

import tensorflow as tf

from pipeline import errors
from pipeline import storage
from pipeline import workdir as workdir_lib

CKPT_DIR = workdir_lib.CKPT_DIR
BEST_DIR = workdir_lib.BEST_DIR


class Interrupted(errors.Error):
  """The run stopped after saving a checkpoint; the same command resumes it."""
  exit_code = errors.EXIT_PREEMPTED


class WorkerLost(errors.Error):
  """Another worker of the cluster stopped responding."""
  exit_code = errors.EXIT_FAILED


class Checkpointer:
  """The periodic and best-by-validation checkpoint managers of one worker."""

  def __init__(self, ckpt, workdir, worker, keep, step_counter):
    self.workdir = workdir
    self.worker = worker
    self.chief_dir = storage.join(workdir, CKPT_DIR)
    if worker.is_chief:
      self.temp = None
      root = workdir
    else:
      self.temp = storage.join(workdir, f'workertemp_{worker.index}')
      root = self.temp
    self.ckpt = ckpt
    self.manager = tf.train.CheckpointManager(
        ckpt, storage.join(root, CKPT_DIR), max_to_keep=keep, step_counter=step_counter)
    self.best = tf.train.CheckpointManager(
        ckpt, storage.join(root, BEST_DIR), max_to_keep=1, step_counter=step_counter)

  def restore(self):
    """Restores the chief's latest checkpoint on every worker; returns its path or None."""
    path = tf.train.latest_checkpoint(self.chief_dir)
    if path:
      self.ckpt.restore(path).assert_existing_objects_matched()
    return path

  def copy_vocab(self):
    """Puts vocab.json beside the checkpoints, so a checkpoint dir alone can be exported."""
    vocab = storage.join(self.workdir, workdir_lib.VOCAB_FILE)
    for d in (CKPT_DIR, BEST_DIR):
      storage.makedirs(storage.join(self.workdir, d))
      storage.copy(vocab, storage.join(self.workdir, d, workdir_lib.VOCAB_FILE))

  @property
  def latest(self):
    return tf.train.latest_checkpoint(self.chief_dir)

  def save(self, step):
    self.manager.save(checkpoint_number=step)

  def save_best(self, step):
    self.best.save(checkpoint_number=step)

  def close(self):
    """Deletes a non-chief worker's temporary checkpoints."""
    if self.temp:
      storage.rmtree(self.temp)


class Preemption:
  """Checks for SIGINT/SIGTERM at loop boundaries; saves, then raises Interrupted.

  Use as a context manager around the train loop and call `check(step)` after
  every loop.
  """

  def __init__(self, strategy, worker, workdir, save_fn):
    self._save_fn = save_fn
    self._step = 0
    self._signum = None
    self._handler = None
    self._multi = worker.count > 1
    self._strategy = strategy
    self._workdir = workdir

  def __enter__(self):
    self._old = {}
    if self._multi:
      # The handler owns SIGTERM; Ctrl-C on a worker is forwarded to it as SIGTERM.
      self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
          self._strategy.cluster_resolver, tf.train.Checkpoint(),
          checkpoint_dir=storage.join(self._workdir, 'preemption'),
          termination_config=tf.distribute.experimental.TerminationConfig(
              exit_fn=self._exit, save_fn=lambda *a, **k: self._save_fn(self._step)))
      self._old[signal.SIGINT] = signal.signal(
          signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    else:
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._flag)
    return self

  def _flag(self, signum, frame):
    del frame
    if self._signum is not None:  # a second Ctrl-C stops at once
      raise KeyboardInterrupt
    self._signum = signum
    # One unbuffered write, not logging: the handler runs between two bytecodes
    # of the main thread, which may be inside logging's own write to stderr
    # ("reentrant call inside BufferedWriter": a traceback in the output).
    os.write(2, f'Signal {signum}: saving a checkpoint at the end of this loop.\n'.encode())

  def _exit(self):
    raise Interrupted(
        f'Preempted: every worker saved a checkpoint at step {self._step}. Run the '
        'same command (or launch.cluster --restarts) to resume.')

  def check(self, step):
    """Saves and raises Interrupted if a stop was requested (on any worker)."""
    self._step = step
    if self._handler is not None:
      self._handler.save_checkpoint_if_preempted()
    elif self._signum is not None:
      self._save_fn(step)
      raise Interrupted(f'Interrupted by signal {self._signum} at step {step}; '
                        'checkpoint saved. Run the same command to resume.')

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    if self._handler is not None:
      # The handler leaves its SIGTERM hook behind; restore the default.
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
