"""The train loop: a custom tf.distribute step, checkpoints, evaluation, samples.

`train.steps_per_loop` steps run inside one tf.function call, each through
`strategy.run` with a GradientTape; the host only wakes up at loop boundaries
to log, evaluate, checkpoint and check the loss is finite. Loop boundaries fall
on every multiple of log_every / eval_every / checkpoint_every, so the schedule
is `step % every == 0 or is_last_step` whatever steps_per_loop is.
"""

import hashlib
import math
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import checkpoint as ckpt_lib
from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import data as data_lib
from pipeline import distribute
from pipeline import errors
from pipeline import export as export_lib
from pipeline import generate as generate_lib
from pipeline import model as model_lib
from pipeline import report as report_lib
from pipeline import steps as steps_lib
from pipeline import storage

CONFIG_FILE = 'config.json'
CKPT_DIR = ckpt_lib.CKPT_DIR
BEST_DIR = ckpt_lib.BEST_DIR
EXPORT_DIR = 'export'


class TrainingError(errors.Error):
  """Training cannot continue; the message says what was kept and what to change."""


def _next_boundary(step, cfg):
  t = cfg.train
  nxt = t.num_steps
  for every in (t.log_every, t.eval_every, t.checkpoint_every):
    nxt = min(nxt, (step // every + 1) * every)
  return min(nxt, step + t.steps_per_loop)


# Keys a resumed run must share with the checkpoint it resumes: they fix the
# weight and carried-state shapes, and the mapping from step to data.
_FIXED_ON_RESUME = ('model.hidden_size', 'model.num_layers', 'data.seq_length',
                    'data.batch_size', 'data.mode', 'data.val_fraction')


def _resolve_config(config, workdir, write):
  """Writes config.json (chief only); on resume, refuses settings the checkpoint cannot take."""
  path = storage.join(workdir, CONFIG_FILE)
  resolved = config_lib.to_json(config)
  if storage.exists(path) and tf.train.latest_checkpoint(storage.join(workdir, CKPT_DIR)):
    old = storage.read_json(path)
    for key in _FIXED_ON_RESUME:
      section, name = key.split('.')
      was, now = old.get(section, {}).get(name), resolved[section][name]
      if was != now:
        raise config_lib.ConfigError(
            f'{workdir} holds a run with {key}={was!r}; this config has {now!r}. '
            f'Resume with --config.{key}={was!r}, or use a new --workdir.')
  if write:
    storage.write_json(path, resolved)


def _load_corpus(config, workdir, write):
  vocab_path = storage.join(workdir, corpus_lib.VOCAB_FILE)
  vocab = corpus_lib.Vocab.load(vocab_path) if storage.exists(vocab_path) else None
  if config.data.tfds_streaming:  # shards read while training; the text is never loaded
    from pipeline import tfds_source  # pylint: disable=g-import-not-at-top
    corpus = corpus_lib.Corpus(*tfds_source.open_streaming(
        config.data.corpus, config.data.tfds_data_dir, config.data.val_fraction,
        vocab=vocab, max_vocab=config.data.max_vocab))
  else:
    corpus = corpus_lib.load(config.data.corpus, config.data.val_fraction,
                             config.data.seq_length, vocab=vocab,
                             tfds_data_dir=config.data.tfds_data_dir,
                             decode_errors=config.data.decode_errors,
                             max_vocab=config.data.max_vocab)
  if vocab is None and write:
    # Other workers build the same vocabulary from the same text themselves.
    corpus.vocab.save(vocab_path)
  return corpus


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
  cfg_d, cfg_t = config.data, config.train
  if config.runtime.deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = distribute.make_strategy(config.runtime)
  distribute.check_batch(cfg_d.batch_size, strategy)
  distribute.check_batch(cfg_d.eval_batch_size, strategy, 'data.eval_batch_size')

  worker = distribute.worker(strategy)
  storage.makedirs(workdir)
  _resolve_config(config, workdir, write=worker.is_chief)
  corpus = _load_corpus(config, workdir, write=worker.is_chief)
  vocab = corpus.vocab
  gb, eb, t = cfg_d.batch_size, cfg_d.eval_batch_size, cfg_d.seq_length
  train_layout = data_lib.make_layout(len(corpus.train), t, gb, cfg_d.mode)
  eval_layout = data_lib.make_layout(len(corpus.val), t, eb, cfg_d.mode, 'validation')
  stream = cfg_d.mode == 'stream'
  logging.info('Corpus: %d train / %d val chars, vocab %d; %d steps per epoch.',
               len(corpus.train), len(corpus.val), vocab.size, train_layout.steps_per_epoch)

  keras.utils.set_random_seed(config.seed)
  num_layers, hidden = config.model.num_layers, config.model.hidden_size
  with strategy.scope():
    models = model_lib.build(vocab.size, hidden, num_layers, t, config.runtime.precision,
                             dropout=config.model.dropout)
    cudnn_ok, why_not = model_lib.cudnn_report(models)
    logging.info('LSTM %s the cuDNN kernel conditions%s.',
                 'meets' if cudnn_ok else 'does not meet',
                 '' if cudnn_ok else ': ' + '; '.join(why_not))
    optimizer, schedule = steps_lib.make_optimizer(cfg_t, config.runtime.precision)
    # Built inside the scope so Adam's slots are mirrored like the weights.
    optimizer.build(models.train.trainable_variables)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    best_val = tf.Variable(np.inf, dtype=tf.float32, trainable=False, name='best_val')
    train_state = tuple(steps_lib.state_variable(gb, num_layers, hidden, n) for n in 'hc')
    eval_state = tuple(steps_lib.state_variable(eb, num_layers, hidden, 'eval_' + n)
                       for n in 'hc')

  ckpt = tf.train.Checkpoint(model=models.checkpoint_weights(), optimizer=optimizer,
                             step=step_var, best_val=best_val,
                             h=train_state[0], c=train_state[1])
  checkpoints = ckpt_lib.Checkpointer(ckpt, workdir, worker, cfg_t.keep_checkpoints, step_var)
  restored = checkpoints.restore()
  if restored:
    logging.info('Resumed from %s at step %d.', restored, int(step_var.numpy()))
  start = int(step_var.numpy())
  if worker.is_chief:
    # The vocabulary travels with the checkpoints, so a checkpoint dir alone can be exported.
    for d in (CKPT_DIR, BEST_DIR):
      storage.makedirs(storage.join(workdir, d))
      storage.copy(storage.join(workdir, corpus_lib.VOCAB_FILE),
                   storage.join(workdir, d, corpus_lib.VOCAB_FILE))

  train_ds = strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_dataset(
          corpus.train, vocab.size, train_layout, ctx, seed=config.seed,
          start_step=start, num_steps=cfg_t.num_steps,
          reset_prob=cfg_d.state_reset_prob if stream else 0.0))
  eval_ds = strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_dataset(
          corpus.val, vocab.size, eval_layout, ctx, num_steps=eval_layout.steps_per_epoch,
          shuffle=False))
  jit = steps_lib.jit_mode(cfg_t.jit_compile, strategy, distribute.has_gpu())
  loops = steps_lib.build(
      strategy, models, optimizer, global_batch=gb, stream=stream,
      clip_norm=cfg_t.grad_clip_norm, train_state=train_state, eval_state=eval_state,
      step_var=step_var, mode=jit, seed=config.seed, fused=cfg_t.fused_lstm)

  chars = tf.constant(list(vocab.chars))
  codepoints = tf.constant([ord(ch) for ch in vocab.chars], tf.int32)

  def step_fn(x, h, c):
    logits, h, c = models.step([x, h, c], training=False)
    return tf.cast(logits, tf.float32), h, c

  @tf.function
  def sample_fn(prompt, seed):
    return generate_lib.generate(step_fn, chars, codepoints, num_layers, hidden,
                                 tf.reshape(prompt, [1]), cfg_t.sample_length,
                                 cfg_t.sample_temperature, 0, seed)[0]

  def evaluate():
    n = eval_layout.steps_per_epoch
    total = float(loops.eval(iter(eval_ds), tf.constant(n)))
    return total / (n * eb * t)

  def save(at_step):
    checkpoints.save(at_step)
    reporter.flush()

  def result(step, train_loss, val_loss, export_dir=None):
    return {'step': step, 'train_loss': train_loss, 'val_loss': val_loss,
            'export': export_dir, 'replicas': strategy.num_replicas_in_sync,
            'chars_per_sec': chars_per_sec, 'weights_digest': _digest(models),
            'jit_mode': jit}

  reporter = report_lib.Reporter(workdir, cfg_t.num_steps, write=worker.is_chief)
  iterator = iter(train_ds)
  step = start
  train_loss = val_loss = float('nan')
  chars_per_step = gb * t
  window_steps, window_seconds, chars_per_sec = 0, 0.0, float('nan')
  try:
    with ckpt_lib.Preemption(strategy, worker, workdir, save) as preemption:
      while step < cfg_t.num_steps:
        n = _next_boundary(step, config) - step
        if stop_at is not None:
          n = min(n, max(stop_at - step, 1))
        t0 = time.perf_counter()
        train_loss = float(_lost_worker_guard(worker, checkpoints, loops.train, iterator, n))
        window_seconds += time.perf_counter() - t0
        window_steps += n
        if not math.isfinite(train_loss):
          raise TrainingError(
              f'Loss became {train_loss} in steps {step + 1}..{step + n}. Stopped '
              f'without saving; the last good checkpoint ({checkpoints.latest}) '
              'is kept. Lower train.learning_rate or set train.grad_clip_norm.')
        step += n
        last = step == cfg_t.num_steps
        if step % cfg_t.log_every == 0 or last:
          # Throughput since the last progress line; eval and checkpoint time excluded.
          chars_per_sec = window_steps * chars_per_step / window_seconds
          reporter.train(step, train_loss, window_steps, window_steps * chars_per_step,
                         window_seconds, float(schedule(optimizer.iterations)))
          window_steps, window_seconds = 0, 0.0
        if step % cfg_t.eval_every == 0 or last:
          val_loss = _lost_worker_guard(worker, checkpoints, evaluate)
          sample = ''
          if worker.is_chief:  # sampling is local; other workers need not wait for it
            sample = cfg_t.sample_prompt + sample_fn(
                tf.constant(cfg_t.sample_prompt), tf.constant(config.seed + step, tf.int64)
            ).numpy().decode('utf-8')
          reporter.evaluate(step, val_loss, sample)
          if val_loss < float(best_val.numpy()):
            best_val.assign(val_loss)
            checkpoints.save_best(step)
        halt = stop_at is not None and step >= stop_at and not last
        if step % cfg_t.checkpoint_every == 0 or last or halt:
          checkpoints.save(step)
        if halt:
          reporter.flush()
          return result(step, train_loss, val_loss)
        preemption.check(step)
    if math.isnan(val_loss):  # nothing left to train (a finished run resumed)
      val_loss = _lost_worker_guard(worker, checkpoints, evaluate)
      logging.info('Already at step %d of %d; val loss %.4f nats/char.', step,
                   cfg_t.num_steps, val_loss)
    reporter.flush()
  finally:
    checkpoints.close()
  export_dir = None
  if cfg_t.export and worker.is_chief:
    export_dir = export_lib.export_models(
        models, vocab, storage.join(workdir, EXPORT_DIR),
        extra_assets={'config.json': storage.join(workdir, CONFIG_FILE)})
  out = result(step, train_loss, val_loss, export_dir)
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
