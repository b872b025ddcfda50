"""The train loop: a custom tf.distribute step, checkpoints, evaluation, samples.

`train.steps_per_loop` steps run inside one tf.function call, each through
`strategy.run` with a GradientTape (pipeline.steps); the host only wakes up at
loop boundaries to log (progress lines, TensorBoard, history.json and
loss.svg), evaluate, checkpoint and check the loss is finite.
Loop boundaries fall on every multiple of log_every / eval_every /
checkpoint_every, so the schedule is `step % every == 0 or is_last_step`
whatever steps_per_loop is.
"""

import hashlib
import math
import time
import unicodedata

import tensorflow as tf
from absl import logging

from pipeline import checkpoint as ckpt_lib
from pipeline import config as config_lib
from pipeline import data as data_lib
from pipeline import distribute
from pipeline import errors
from pipeline import export as export_lib
from pipeline import generate as generate_lib
from pipeline import source
from pipeline import steps as steps_lib
from pipeline import storage
from pipeline import workdir as workdir_lib


class TrainingError(errors.Error):
  """Training cannot continue; the message says what was kept and what to change."""


def _next_boundary(step, cfg):
  t = cfg.train
  nxt = t.num_steps
  for every in (t.log_every, t.eval_every, t.checkpoint_every):
    nxt = min(nxt, (step // every + 1) * every)
  return min(nxt, step + t.steps_per_loop)


def _open_corpus(config, workdir, write, init=None):
  """The run's corpus; a fine-tuning run's (`init`) on the merged vocabulary."""
  saved = workdir_lib.load_vocab(workdir)
  d = config.data
  if saved is None and init is not None:
    corpus = source.open_corpus(d)  # its own vocabulary first; then the merged one
    corpus = workdir_lib.on_vocab(corpus, workdir_lib.merged_vocab(init, corpus.vocab),
                                  d.max_vocab)
  elif saved is not None and config.train.init_from and d.tfds_streaming:
    # A streamed dataset decodes to its own vocabulary; a fine-tuned run's is larger.
    corpus = workdir_lib.on_vocab(source.open_corpus(d), saved, d.max_vocab)
  else:
    corpus = source.open_corpus(d, saved)
  if init is not None and set(init.vocab.chars) - set(corpus.vocab.chars):
    raise config_lib.ConfigError(
        f'{workdir} has a {workdir_lib.VOCAB_FILE} without some characters of '
        f'train.init_from={init.path!r}; it was made for another source. Use a new --workdir.')
  if saved is None and write:
    # Other workers build the same vocabulary from the same text themselves.
    corpus.vocab.save(workdir_lib.path(workdir, workdir_lib.VOCAB_FILE))
  return corpus


def _init_source(config, workdir):
  """train.init_from, opened and checked; None when not fine-tuning or when resuming
  (the run's own checkpoint wins over its source)."""
  if not config.train.init_from or tf.train.latest_checkpoint(
      workdir_lib.path(workdir, workdir_lib.CKPT_DIR)):
    return None
  init = workdir_lib.open_init(config.train.init_from)
  workdir_lib.check_init_model(init, config.model)
  return init


def check_prompt(config, vocab):
  """A sample prompt the vocabulary cannot encode would kill the run at its first
  evaluation, before that step's checkpoint, so every resume would die there too."""
  prompt = unicodedata.normalize('NFC', config.train.sample_prompt)
  missing = sorted(set(prompt) - set(vocab.chars))
  if missing:
    raise config_lib.ConfigError(
        f'train.sample_prompt={config.train.sample_prompt!r} has {len(missing)} '
        f'character(s) the corpus does not: {"".join(missing)!r}. Use a prompt made of '
        'the corpus characters (vocab.json), or --config.train.sample_prompt=\'\'.')


def datasets(config, strategy, corpus, start):
  """(train dataset from step `start`, eval dataset, eval layout), distributed."""
  d = config.data
  vocab_size, stream = corpus.vocab.size, d.mode == 'stream'
  dtype = steps_lib.input_dtype(strategy, config.train.tpu_proxy)
  train_layout = data_lib.make_layout(len(corpus.train), d.seq_length, d.batch_size, d.mode)
  # Validation scores every character of the split (the last partial batch masked).
  eval_layout = data_lib.make_layout(len(corpus.val), d.seq_length, d.eval_batch_size,
                                     d.mode, 'validation', cover_all=True)
  logging.info('Corpus: %d train / %d val chars, vocab %d; %d steps per epoch.',
               len(corpus.train), len(corpus.val), vocab_size, train_layout.steps_per_epoch)
  train_ds = strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_dataset(
          corpus.train, vocab_size, train_layout, ctx, seed=config.seed,
          start_step=start, num_steps=config.train.num_steps,
          reset_prob=d.state_reset_prob if stream else 0.0, streamed=corpus.streamed,
          input_dtype=dtype))
  eval_ds = strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_dataset(
          corpus.val, vocab_size, eval_layout, ctx, num_steps=eval_layout.steps_per_epoch,
          shuffle=False, streamed=corpus.streamed, input_dtype=dtype))
  return train_ds, eval_ds, eval_layout


def _sampler(config, models, vocab):
  """A tf.function (prompt, seed) -> the training-time sample's continuation."""
  t, m = config.train, config.model
  chars = tf.constant(list(vocab.chars))
  codepoints = tf.constant([ord(ch) for ch in vocab.chars], tf.int32)

  def step_fn(x, h, c):
    logits, h, c = models.step([x, h, c], training=False)
    return tf.cast(logits, tf.float32), h, c

  @tf.function
  def sample_fn(prompt, seed):
    return generate_lib.generate(step_fn, chars, codepoints, m.num_layers, m.hidden_size,
                                 tf.reshape(prompt, [1]), t.sample_length,
                                 t.sample_temperature, 0, seed)[0]
  return sample_fn


# Reporting: progress lines, TensorBoard summaries, the loss history and its plot.

def bits(nats):
  return nats / math.log(2.0)


def _loss_scalars(loss):
  tf.summary.scalar('loss_nats', loss)
  tf.summary.scalar('bits_per_char', bits(loss))


def fmt_duration(seconds):
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class _Reporter:
  """Collects metrics; writes summaries, history.json and loss.svg in the workdir."""

  def __init__(self, workdir, num_steps, write=True):
    self.workdir = workdir
    self.num_steps = num_steps
    self.write = write
    self.history = {'train': [], 'val': []}
    path = storage.join(workdir, workdir_lib.HISTORY_FILE)
    if storage.exists(path):
      self.history = storage.read_json(path)
    if write:
      self.train_writer = tf.summary.create_file_writer(storage.join(workdir, workdir_lib.TB_DIR, 'train'))
      self.eval_writer = tf.summary.create_file_writer(storage.join(workdir, workdir_lib.TB_DIR, 'eval'))

  def train(self, step, loss, steps, chars, seconds, lr):
    """Logs a progress line and train scalars for `steps` steps ending at `step`."""
    cps = chars / max(seconds, 1e-9)
    eta = (self.num_steps - step) * seconds / max(steps, 1)
    logging.info('step %d/%d  loss %.4f nats (%.3f bpc)  %.0f chars/s  lr %.2e  ETA %s',
                 step, self.num_steps, loss, bits(loss), cps, lr, fmt_duration(eta))
    self.history['train'].append([step, loss])
    if self.write:
      with self.train_writer.as_default(step=step):
        _loss_scalars(loss)
        tf.summary.scalar('chars_per_sec', cps)
        tf.summary.scalar('learning_rate', lr)

  def evaluate(self, step, loss, sample):
    logging.info('eval step %d  val loss %.4f nats (%.3f bpc)', step, loss, bits(loss))
    print(f'----- sample at step {step} -----\n{sample}\n-----', flush=True)
    self.history['val'].append([step, loss])
    if self.write:
      with self.eval_writer.as_default(step=step):
        _loss_scalars(loss)
        tf.summary.text('sample', sample)
      self.flush()

  def flush(self):
    if not self.write:
      return
    self.train_writer.flush()
    self.eval_writer.flush()
    storage.write_json(storage.join(self.workdir, workdir_lib.HISTORY_FILE), self.history)
    self.plot()

  def plot(self):
    """Draws train and validation loss like the seed's aux.plot, as loss.svg."""
    storage.write_bytes_atomic(storage.join(self.workdir, workdir_lib.PLOT_FILE),
                               workdir_lib.loss_svg(self.history).encode('utf-8'))


class _Loop:
  """The host side of one training run: timing, evaluation, checkpoints, reports."""

  def __init__(self, config, strategy, worker, training, checkpoints, reporter, eval_ds,
               eval_layout, sample_fn):
    self.config, self.strategy, self.worker = config, strategy, worker
    self.training, self.checkpoints, self.reporter = training, checkpoints, reporter
    self.eval_ds, self.eval_layout, self.sample_fn = eval_ds, eval_layout, sample_fn
    self.window_steps, self.window_seconds = 0, 0.0
    self.chars_per_sec = float('nan')

  def guard(self, fn, *args):
    return _lost_worker_guard(self.worker, self.checkpoints, fn, *args)

  def train(self, iterator, step, n):
    """Runs n steps; returns their mean loss, or raises TrainingError if not finite."""
    t0 = time.perf_counter()
    loss = float(self.guard(self.training.loops.train, iterator, n))
    self.window_seconds += time.perf_counter() - t0
    self.window_steps += n
    if not math.isfinite(loss):
      raise TrainingError(
          f'Loss became {loss} in steps {step + 1}..{step + n}. Stopped '
          f'without saving; the last good checkpoint ({self.checkpoints.latest}) '
          'is kept. Lower train.learning_rate or set train.grad_clip_norm.')
    return loss

  def log(self, step, loss):
    # Throughput since the last progress line; eval and checkpoint time excluded.
    chars = self.window_steps * self.config.data.batch_size * self.config.data.seq_length
    self.chars_per_sec = chars / self.window_seconds
    tr = self.training
    self.reporter.train(step, loss, self.window_steps, chars, self.window_seconds,
                        float(tr.schedule(tr.optimizer.iterations)))
    self.window_steps, self.window_seconds = 0, 0.0

  def evaluate(self):
    n = self.eval_layout.steps_per_epoch
    total = float(self.guard(self.training.loops.eval, iter(self.eval_ds), tf.constant(n)))
    return total / self.eval_layout.num_targets

  def evaluate_and_sample(self, step):
    val_loss = self.evaluate()
    t = self.config.train
    sample = ''
    if self.worker.is_chief:  # sampling is local; other workers need not wait for it
      prompt = unicodedata.normalize('NFC', t.sample_prompt)  # as the corpus was read
      sample = prompt + self.sample_fn(
          tf.constant(prompt), tf.constant(self.config.seed + step, tf.int64)
      ).numpy().decode('utf-8')
    self.reporter.evaluate(step, val_loss, sample)
    if val_loss < float(self.training.best_val.numpy()):
      self.training.best_val.assign(val_loss)
      self.checkpoints.save_best(step)
    return val_loss

  def save(self, step):
    self.checkpoints.save(step)
    self.reporter.flush()

  def result(self, step, train_loss, val_loss, export_dir=None):
    return {'step': step, 'train_loss': train_loss, 'val_loss': val_loss,
            'export': export_dir, 'replicas': self.strategy.num_replicas_in_sync,
            'chars_per_sec': self.chars_per_sec,
            'weights_digest': _digest(self.training.models),
            'jit_mode': self.training.jit_mode}


def train_and_evaluate(config, workdir, stop_at=None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: a ConfigDict from `configs/` (see pipeline.config).
    workdir: run directory, local or gs://.
    stop_at: optional step at which to checkpoint and return early, as an
      interruption would; running again resumes from there. The schedule and
      data order still follow train.num_steps.

  Returns:
    dict with 'step', 'train_loss' and 'val_loss' (nats/char) of the last
    step, 'export' (path or None), 'replicas', 'chars_per_sec' (train
    throughput over the last progress interval), 'weights_digest' and
    'jit_mode' (see pipeline.steps).
  """
  config = config_lib.finalize(config)
  cfg_t = config.train
  if config.runtime.deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = distribute.make_strategy(config.runtime)
  distribute.check_batch(config.data.batch_size, strategy)
  distribute.check_batch(config.data.eval_batch_size, strategy, 'data.eval_batch_size')
  distribute.check_chains(config.data.batch_size, cfg_t.lstm_chains, strategy)

  worker = distribute.worker(strategy)
  init = _init_source(config, workdir)  # before anything is written: bad input leaves no trace
  storage.makedirs(workdir)
  workdir_lib.write_config(config, workdir, write=worker.is_chief)
  corpus = _open_corpus(config, workdir, worker.is_chief, init)
  check_prompt(config, corpus.vocab)
  training = steps_lib.setup(config, strategy, corpus.vocab.size)
  checkpoints = ckpt_lib.Checkpointer(training.checkpoint(), workdir, worker,
                                      cfg_t.keep_checkpoints, training.step)
  restored = checkpoints.restore()
  start = int(training.step.numpy())
  if restored:
    logging.info('Resumed from %s at step %d.', restored, start)
  elif init is not None:
    # Fresh optimizer, step 0 and schedule; only the weights come from the source.
    workdir_lib.apply_init(init, training.models, corpus.vocab)
    record = init.record(corpus.vocab)
    if worker.is_chief:
      storage.write_json(workdir_lib.path(workdir, workdir_lib.INIT_FILE), record)
    logging.info('Fine-tuning from %s (%s, step %s); %d new character(s): %r.',
                 init.checkpoint, init.kind, init.step, len(record['new_chars']),
                 record['new_chars'])
  if worker.is_chief:
    checkpoints.copy_vocab()
  train_ds, eval_ds, eval_layout = datasets(config, strategy, corpus, start)
  reporter = _Reporter(workdir, cfg_t.num_steps, write=worker.is_chief)
  loop = _Loop(config, strategy, worker, training, checkpoints, reporter, eval_ds,
               eval_layout, _sampler(config, training.models, corpus.vocab))
  iterator = iter(train_ds)
  step = start
  train_loss = val_loss = float('nan')
  try:
    with ckpt_lib.Preemption(strategy, worker, workdir, loop.save) as preemption:
      while step < cfg_t.num_steps:
        n = _next_boundary(step, config) - step
        if stop_at is not None:
          n = min(n, max(stop_at - step, 1))
        train_loss = loop.train(iterator, step, n)
        step += n
        last = step == cfg_t.num_steps
        if step % cfg_t.log_every == 0 or last:
          loop.log(step, train_loss)
        if step % cfg_t.eval_every == 0 or last:
          val_loss = loop.evaluate_and_sample(step)
        halt = stop_at is not None and step >= stop_at and not last
        if step % cfg_t.checkpoint_every == 0 or last or halt:
          checkpoints.save(step)
        if halt:
          reporter.flush()
          return loop.result(step, train_loss, val_loss)
        preemption.check(step)
    if math.isnan(val_loss):  # nothing left to train (a finished run resumed)
      val_loss = loop.evaluate()
      logging.info('Already at step %d of %d; val loss %.4f nats/char.', step,
                   cfg_t.num_steps, val_loss)
    reporter.flush()
  finally:
    checkpoints.close()
  export_dir = None
  if cfg_t.export and worker.is_chief:
    export_dir = export_lib.export_models(
        training.models, corpus.vocab, workdir_lib.path(workdir, workdir_lib.EXPORT_DIR),
        extra_assets={workdir_lib.CONFIG_FILE: workdir_lib.path(workdir,
                                                                workdir_lib.CONFIG_FILE)})
  out = loop.result(step, train_loss, val_loss, export_dir)
  logging.info('Finished at step %d; weights digest %s', step, out['weights_digest'])
  return out


def _digest(models):
  """SHA-256 of all weights: equal digests mean bit-identical models."""
  h = hashlib.sha256()
  for v in models.variables:
    h.update(v.numpy().tobytes())
  return h.hexdigest()[:16]


_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                tf.errors.InternalError)


def _lost_worker_guard(worker, checkpoints, fn, *args):
  """Runs fn; on a cluster, turns a dead peer's collective errors into WorkerLost."""
  try:
    return fn(*args)
  except _PEER_ERRORS as e:
    if worker.count == 1:
      raise
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    telling = [l for l in lines if any(w in l.lower() for w in (
        'peer', 'heartbeat', 'task', 'connection', 'unavailable', 'deadline'))]
    first = (telling or lines or [''])[0][:200]
    raise ckpt_lib.WorkerLost(
        f'Lost contact with the cluster ({type(e).__name__}: {first}). Relaunch all '
        f'workers to resume from the last checkpoint ({checkpoints.latest}).') from None
