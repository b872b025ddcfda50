"""The train loop: a custom tf.distribute step, checkpoints, evaluation, samples.

`train.steps_per_loop` steps run inside one tf.function call, each through
`strategy.run` with a GradientTape; the host only wakes up at loop boundaries
to log, evaluate, checkpoint and check the loss is finite. Loop boundaries fall
on every multiple of log_every / eval_every / checkpoint_every, so the schedule
is `step % every == 0 or is_last_step` whatever steps_per_loop is.
"""

import math
import signal
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import errors
from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import data as data_lib
from pipeline import distribute
from pipeline import export as export_lib
from pipeline import generate as generate_lib
from pipeline import model as model_lib
from pipeline import report as report_lib
from pipeline import storage

CONFIG_FILE = 'config.json'
CKPT_DIR = 'checkpoints'
BEST_DIR = 'best'
EXPORT_DIR = 'export'


class TrainingError(errors.Error):
  """Training cannot continue; the message says what was kept and what to change."""


class Interrupted(TrainingError):
  """SIGINT/SIGTERM stopped the run after a checkpoint; the same command resumes."""
  exit_code = 75  # EX_TEMPFAIL: try again


class _PreReducedAdam(keras.optimizers.Adam):
  """Adam that trusts the train step to have all-reduced (and clipped) the gradients.

  Keras 3 clips per replica *before* its own all-reduce, which would clip
  replica-local gradients under MirroredStrategy; the step therefore reduces,
  then clips the global gradient, and this class skips the second reduction.
  """

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)


def make_optimizer(train_cfg):
  """Adam with linear warm-up and an optional cosine decay to 10%."""
  lr = train_cfg.learning_rate
  decay_steps = max(train_cfg.num_steps - train_cfg.warmup_steps, 1)
  alpha = 0.1 if train_cfg.lr_schedule == 'cosine' else 1.0
  if train_cfg.warmup_steps > 0:
    sched = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, alpha=alpha, warmup_target=lr,
        warmup_steps=train_cfg.warmup_steps)
  else:
    sched = keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=alpha)
  return _PreReducedAdam(learning_rate=sched), sched


def _state_variable(batch, cfg, name):
  # Global (all rows) and identical on every replica: each replica reads its
  # rows by id and the step scatters all replicas' new rows back, so the
  # carried state checkpoints exactly and resumes on any replica layout.
  return tf.Variable(
      tf.zeros([batch, cfg.model.num_layers, cfg.model.hidden_size]), trainable=False,
      name=name, synchronization=tf.VariableSynchronization.ON_WRITE,
      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def _carry_in(state_vars, batch):
  keep = (1.0 - batch['reset'])[:, None, None]
  return tuple(tf.gather(v, batch['rows']) * keep for v in state_vars)


def _carry_out(state_vars, batch, new_states):
  ctx = tf.distribute.get_replica_context()
  rows = ctx.all_gather(batch['rows'], axis=0)[:, None]
  for var, new in zip(state_vars, new_states):
    var.assign(tf.tensor_scatter_nd_update(var, rows, ctx.all_gather(new, axis=0)))


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


def _resolve_config(config, workdir):
  """Writes config.json; on resume, refuses settings the checkpoint cannot take."""
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
  storage.write_json(path, resolved)


def _load_corpus(config, workdir):
  vocab_path = storage.join(workdir, corpus_lib.VOCAB_FILE)
  vocab = corpus_lib.Vocab.load(vocab_path) if storage.exists(vocab_path) else None
  corpus = corpus_lib.load(config.data.corpus, config.data.val_fraction,
                           config.data.seq_length, vocab=vocab)
  if vocab is None:
    corpus.vocab.save(vocab_path)
  return corpus


class _StopFlag:
  """Turns SIGINT/SIGTERM into a checkpoint at the next loop boundary."""

  def __init__(self):
    self.signum = None

  def __enter__(self):
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('Signal %d: saving a checkpoint at the end of this loop.', signum)

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


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
    step, 'export' (path or None), 'replicas' and 'chars_per_sec' (train
    throughput over the last progress interval).
  """
  config = config_lib.finalize(config)
  cfg_d, cfg_t = config.data, config.train
  if config.runtime.deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = distribute.make_strategy(config.runtime)
  distribute.check_batch(cfg_d.batch_size, strategy)
  distribute.check_batch(cfg_d.eval_batch_size, strategy, 'data.eval_batch_size')

  storage.makedirs(workdir)
  _resolve_config(config, workdir)
  corpus = _load_corpus(config, workdir)
  vocab = corpus.vocab
  gb, eb, t = cfg_d.batch_size, cfg_d.eval_batch_size, cfg_d.seq_length
  train_layout = data_lib.make_layout(len(corpus.train), t, gb, cfg_d.mode)
  eval_layout = data_lib.make_layout(len(corpus.val), t, eb, cfg_d.mode, 'validation')
  stream = cfg_d.mode == 'stream'
  logging.info('Corpus: %d train / %d val chars, vocab %d; %d steps per epoch.',
               len(corpus.train), len(corpus.val), vocab.size, train_layout.steps_per_epoch)

  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    models = model_lib.build(vocab.size, config.model.hidden_size,
                             config.model.num_layers, t, config.runtime.precision)
    cudnn_ok, why_not = model_lib.cudnn_report(models)
    logging.info('LSTM %s the cuDNN kernel conditions%s.',
                 'meets' if cudnn_ok else 'does not meet',
                 '' if cudnn_ok else ': ' + '; '.join(why_not))
    optimizer, schedule = make_optimizer(cfg_t)
    # Built inside the scope so Adam's slots are mirrored like the weights.
    optimizer.build(models.train.trainable_variables)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    best_val = tf.Variable(np.inf, dtype=tf.float32, trainable=False, name='best_val')
    train_state = (_state_variable(gb, config, 'h'), _state_variable(gb, config, 'c'))
    eval_state = (_state_variable(eb, config, 'eval_h'), _state_variable(eb, config, 'eval_c'))

  ckpt = tf.train.Checkpoint(model=models.checkpoint_weights(), optimizer=optimizer, step=step_var,
                             best_val=best_val, h=train_state[0], c=train_state[1])
  manager = tf.train.CheckpointManager(ckpt, storage.join(workdir, CKPT_DIR),
                                       max_to_keep=cfg_t.keep_checkpoints,
                                       step_counter=step_var)
  best_manager = tf.train.CheckpointManager(ckpt, storage.join(workdir, BEST_DIR),
                                            max_to_keep=1, step_counter=step_var)
  if manager.latest_checkpoint:
    ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info('Resumed from %s at step %d.', manager.latest_checkpoint,
                 int(step_var.numpy()))
  start = int(step_var.numpy())
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

  variables = models.train.trainable_variables
  num_layers, hidden = config.model.num_layers, config.model.hidden_size

  def forward_backward(inputs, targets, h, c):
    with tf.GradientTape() as tape:
      logits, h2, c2 = models.train([inputs, h, c], training=True)
      per_char = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
      loss = tf.nn.compute_average_loss(tf.reduce_mean(per_char, axis=1),
                                        global_batch_size=gb)
    return tape.gradient(loss, variables), loss, h2, c2

  if cfg_t.jit_compile:
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def replica_step(batch):
    pb = tf.shape(batch['targets'])[0]
    if stream:
      h, c = _carry_in(train_state, batch)
    else:
      h, c = model_lib.zero_state(pb, num_layers, hidden)
    grads, loss, h2, c2 = forward_backward(batch['inputs'], batch['targets'], h, c)
    ctx = tf.distribute.get_replica_context()
    grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    if cfg_t.grad_clip_norm > 0:
      grads, _ = tf.clip_by_global_norm(grads, cfg_t.grad_clip_norm)
    optimizer.apply_gradients(zip(grads, variables))
    if stream:
      _carry_out(train_state, batch, (h2, c2))
    return loss

  @tf.function
  def train_loop(iterator, n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      loss = strategy.run(replica_step, args=(next(iterator),))
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
      step_var.assign_add(1)
    return total / tf.cast(n, tf.float32)

  def replica_eval(batch):
    if stream:
      h, c = _carry_in(eval_state, batch)
    else:
      h, c = model_lib.zero_state(tf.shape(batch['targets'])[0], num_layers, hidden)
    logits, h2, c2 = models.train([batch['inputs'], h, c], training=False)
    if stream:
      _carry_out(eval_state, batch, (h2, c2))
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        batch['targets'], tf.cast(logits, tf.float32)))

  @tf.function
  def eval_loop(iterator, n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      total += strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(replica_eval, args=(next(iterator),)),
                               axis=None)
    return total

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
    total = float(eval_loop(iter(eval_ds), tf.constant(n)))
    return total / (n * eb * t)

  reporter = report_lib.Reporter(workdir, cfg_t.num_steps)
  iterator = iter(train_ds)
  step = start
  train_loss = val_loss = float('nan')
  chars_per_step = gb * t
  window_steps, window_seconds, chars_per_sec = 0, 0.0, float('nan')
  with _StopFlag() as stop:
    while step < cfg_t.num_steps:
      n = _next_boundary(step, config) - step
      if stop_at is not None:
        n = min(n, max(stop_at - step, 1))
      t0 = time.perf_counter()
      train_loss = float(train_loop(iterator, tf.constant(n)))
      window_seconds += time.perf_counter() - t0
      window_steps += n
      if not math.isfinite(train_loss):
        raise TrainingError(
            f'Loss became {train_loss} in steps {step + 1}..{step + n}. Stopped '
            f'without saving; the last good checkpoint ({manager.latest_checkpoint}) '
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
        val_loss = evaluate()
        sample = cfg_t.sample_prompt + sample_fn(
            tf.constant(cfg_t.sample_prompt), tf.constant(config.seed + step, tf.int64)
        ).numpy().decode('utf-8')
        reporter.evaluate(step, val_loss, sample)
        if val_loss < float(best_val.numpy()):
          best_val.assign(val_loss)
          best_manager.save(checkpoint_number=step)
      halt = stop.signum or (stop_at is not None and step >= stop_at and not last)
      if step % cfg_t.checkpoint_every == 0 or last or halt:
        manager.save(checkpoint_number=step)
      if halt and not stop.signum:
        reporter.flush()
        return {'step': step, 'train_loss': train_loss, 'val_loss': val_loss,
                'export': None, 'replicas': strategy.num_replicas_in_sync,
                'chars_per_sec': chars_per_sec}
      if stop.signum:
        reporter.flush()
        raise Interrupted(f'Interrupted by signal {stop.signum} at step {step}; '
                          'checkpoint saved. Run the same command to resume.')
  if math.isnan(val_loss):  # nothing left to train (a finished run resumed)
    val_loss = evaluate()
    logging.info('Already at step %d of %d; val loss %.4f nats/char.', step,
                 cfg_t.num_steps, val_loss)
  reporter.flush()
  export_dir = None
  if cfg_t.export:
    export_dir = export_lib.export_models(
        models, vocab, storage.join(workdir, EXPORT_DIR),
        extra_assets={'config.json': storage.join(workdir, CONFIG_FILE)})
  return {'step': step, 'train_loss': train_loss, 'val_loss': val_loss,
          'export': export_dir, 'replicas': strategy.num_replicas_in_sync,
          'chars_per_sec': chars_per_sec}
