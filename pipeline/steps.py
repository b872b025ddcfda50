"""The compiled parts of training: optimizer, carried state, train and eval loops.

Each replica runs `replica_step` through `strategy.run`; `train.steps_per_loop`
of them run inside one tf.function call, so the host wakes up once per loop.

XLA (`train.jit_compile`, `train.tpu_proxy`), chosen per device by `jit_mode`:
  'replica' the TPU proxy (train.tpu_proxy, one CPU replica): each step's
          whole replica function (forward, backward, all-reduce, clipping,
          Adam, carried state) is one XLA program over Keras's LSTM, fed one
          batch per step from the distributed iterator: what TPUStrategy
          compiles and runs. It proves static shapes and XLA-compatible ops.
  'loop'  one replica on CPU: the whole loop is one XLA cluster; the host
          stacks the loop's batches (IteratorGetNext has no XLA kernel). A CPU
          speed mode: it compiles the fused CPU LSTM, not what a TPU runs.
  'step'  several replicas: XLA over forward/backward only (XLA over Keras's
          apply_gradients fails under MirroredStrategy in TF 2.21).
  'off'   GPUs: cuDNN's fused LSTM is not XLA-compatible, and cuDNN wins; TPUs
          compile the whole replica function anyway.

Inputs arrive one-hot in `input_dtype` (one byte per vocabulary entry, two
on a TPU) and are cast inside the step, on the device.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import distribute
from pipeline import fused_lstm
from pipeline import model as model_lib
from pipeline.kernels import cell as cell_kernels


class _PreReducedAdam(keras.optimizers.Adam):
  """Adam that trusts the train step to have all-reduced (and clipped) the gradients.

  Keras 3 clips per replica *before* its own all-reduce, which would clip
  replica-local gradients under MirroredStrategy; the step therefore reduces,
  then clips the global gradient, and this class skips the second reduction.
  """

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)

  def update_step(self, gradient, variable, learning_rate):
    """Keras's Adam update as TensorFlow's fused ResourceApplyAdam: one kernel per variable.

    The same arithmetic (m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2),
    w -= m alpha / (sqrt(v) + eps), alpha = lr sqrt(1 - b2^t) / (1 - b1^t)),
    where Keras's graph is ~15 small ops per variable: 8 ms of a 211 ms step at
    H=512 on 2 cores (profiled bench case a). It is the op tf.keras 2's Adam
    ran (on var.handle, as here), with CPU, GPU and XLA (TPU) kernels;
    amsgrad, and variables without a handle, keep Keras's ops.
    """
    if self.amsgrad or not hasattr(variable, 'handle'):
      return super().update_step(gradient, variable, learning_rate)
    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    m = self._momentums[self._get_variable_index(variable)]
    v = self._velocities[self._get_variable_index(variable)]
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=m.value.handle, v=v.value.handle,
        beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
        beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
        lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
        beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
        grad=tf.cast(gradient, dtype))


def make_optimizer(train_cfg, precision='float32'):
  """Adam with linear warm-up and optional cosine decay to 10%; loss-scaled for float16.

  train.weight_decay > 0 makes it AdamW (decoupled decay, w -= lr * wd * w
  each step, Loshchilov & Hutter) on the kernels only: biases keep their
  values, as in nanoGPT. It adds no optimizer slots, so checkpoints keep
  their layout.
  """
  lr = train_cfg.learning_rate
  decay_steps = max(train_cfg.num_steps - train_cfg.warmup_steps, 1)
  alpha = 0.1 if train_cfg.lr_schedule == 'cosine' else 1.0
  if train_cfg.warmup_steps > 0:
    sched = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, alpha=alpha, warmup_target=lr,
        warmup_steps=train_cfg.warmup_steps)
  else:
    sched = keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=alpha)
  # The class's snake-cased default name, '__pre_reduced_adam', is no valid root name
  # scope in a nested XLA function (the TPU proxy's replica step).
  opt = _PreReducedAdam(learning_rate=sched, name='adam',
                        weight_decay=train_cfg.weight_decay or None)
  if train_cfg.weight_decay:
    opt.exclude_from_weight_decay(var_names=['bias'])
  if precision == 'float16':
    opt = keras.optimizers.LossScaleOptimizer(opt)
  return opt, sched


def input_dtype(strategy, tpu_proxy=False):
  """uint8 one-hot inputs; bfloat16 for TPUs (and their proxy), which the TPU takes natively."""
  if tpu_proxy or isinstance(strategy, tf.distribute.TPUStrategy):
    return tf.bfloat16
  return tf.uint8


def onednn_enabled():
  """Whether TensorFlow runs its CPU matmuls through oneDNN in this process.

  TensorFlow turns oneDNN on by default only on CPUs with AVX512-VNNI, BF16 or
  AMX (TF_ENABLE_ONEDNN_OPTS overrides); elsewhere (AVX2 CPUs such as AMD
  EPYC Milan) its MatMul is Eigen's, built without FMA, and XLA's dot is the
  faster one (see pipeline.bench.cases.peak_case).
  """
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):  # a TensorFlow without the check: assume the default
    return True


def auto_jit(jit_compile, strategy, has_gpu):
  """train.jit_compile with None (auto) resolved: XLA for one CPU replica without oneDNN.

  Measured with launch.bench (BUILD.md): on an AVX2 CPU without oneDNN, XLA
  over the whole loop trained at 1.7-2.0x the uncompiled loop (H=256, 512);
  with oneDNN (Intel, AVX512) the two ran within 4%, and the uncompiled loop
  keeps oneDNN's matmuls. Several replicas and accelerators stay uncompiled.
  """
  if jit_compile is not None:
    return bool(jit_compile)
  return (not has_gpu and strategy.num_replicas_in_sync == 1 and not isinstance(
      strategy, tf.distribute.TPUStrategy) and not onednn_enabled())


def jit_mode(jit_compile, strategy, has_gpu, tpu_proxy=False):
  """Picks 'off', 'replica', 'step' or 'loop' for this device and says why."""
  if tpu_proxy:
    if has_gpu or strategy.num_replicas_in_sync != 1 or isinstance(
        strategy, tf.distribute.TPUStrategy):
      raise distribute.StrategyError(
          'train.tpu_proxy compiles the TPU step on one CPU replica, but this run has '
          f'{strategy.num_replicas_in_sync} replica(s){" and a GPU" if has_gpu else ""}. '
          'Drop train.tpu_proxy, or set --config.runtime.strategy=cpu.')
    logging.info('XLA: the TPU proxy, one compiled replica step per batch, Keras LSTM.')
    return 'replica'
  if jit_compile is None:
    jit_compile = auto_jit(jit_compile, strategy, has_gpu)
    if jit_compile:
      logging.info('XLA on (train.jit_compile unset): TensorFlow runs without oneDNN on this '
                   "CPU, where XLA's loop is the faster; --config.train.jit_compile=false "
                   'turns it off.')
  if not jit_compile:
    return 'off'
  if has_gpu:
    logging.warning('train.jit_compile ignored on GPU: the cuDNN LSTM kernel is not '
                    'XLA-compatible, and cuDNN is the faster choice.')
    return 'off'
  if isinstance(strategy, tf.distribute.TPUStrategy):
    logging.info('TPUStrategy compiles the whole replica function with XLA already.')
    return 'off'
  if strategy.num_replicas_in_sync == 1:
    logging.info('XLA: compiling the whole steps_per_loop loop.')
    return 'loop'
  logging.info('XLA: compiling forward/backward only (%d replicas: XLA over '
               'apply_gradients fails under MirroredStrategy).', strategy.num_replicas_in_sync)
  return 'step'


def state_variable(batch, num_layers, hidden, name):
  """A carried-state variable holding all rows of the global batch.

  Identical on every replica: each replica reads its rows by id and the step
  scatters all replicas' new rows back, so the carried state checkpoints
  exactly and resumes on any replica layout.
  """
  return tf.Variable(
      tf.zeros([batch, num_layers, hidden]), trainable=False, name=name,
      synchronization=tf.VariableSynchronization.ON_WRITE,
      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def _carry_in(state_vars, batch):
  keep = (1.0 - batch['reset'])[:, None, None]
  return tuple(tf.gather(v, batch['rows']) * keep for v in state_vars)


def _carry_out(state_vars, batch, new_states):
  # Every global row is computed by exactly one replica per step, so summing
  # replicas' zero-padded rows is an exact all-gather. (ReplicaContext.all_gather
  # fails under MultiWorkerMirroredStrategy in TF 2.21: "destinations can not
  # be empty".)
  ctx = tf.distribute.get_replica_context()
  rows = batch['rows'][:, None]
  for var, new in zip(state_vars, new_states):
    mine = tf.scatter_nd(rows, new, tf.shape(var, out_type=tf.int32))
    var.assign(ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine))


@dataclasses.dataclass
class Loops:
  train: object  # (iterator, n) -> mean train loss over the n steps (nats/char)
  eval: object  # (iterator, n) -> summed validation loss (nats) over the weighted targets
  step: object = None  # one replica's step (batch) -> loss; XLA-compiled in 'replica' mode
  fused: bool = False  # whether the train step runs the LSTMs as pipeline.fused_lstm
  kernels: str = 'xla'  # fused_lstm's gate kernels: 'cc' (pipeline.kernels.cell) or 'xla'


def build(strategy, models, optimizer, *, global_batch, stream, clip_norm,
          train_state, eval_state, step_var, mode='off', seed=0, fused=True, chains=1,
          kernels='auto'):
  """Builds the train and eval loop functions for `strategy`.

  fused: run the LSTM layers' recurrence in the train step as
  pipeline.fused_lstm (same math, a faster gradient) on CPUs; GPUs keep
  Keras's cuDNN kernel and TPUs Keras's loop. chains: its independent
  recurrences per layer (fused_lstm.chains_for; 0 picks one per CPU core).
  kernels: its gate kernels (train.cell_kernels: 'auto', 'cc' or 'xla'); an
  XLA-compiled step ('step' or 'loop' mode) compiles the XLA ones into itself.
  """
  variables = models.train.trainable_variables
  num_layers = len(models.lstms)
  hidden = models.lstms[0].units
  scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
  fused = fused and mode != 'replica' and not tf.config.list_logical_devices(
      'GPU') and not isinstance(strategy, tf.distribute.TPUStrategy)
  if kernels == 'cc' and fused and mode != 'off':
    raise cell_kernels.BuildError(
        f'train.cell_kernels=cc runs outside XLA, but this step is XLA-compiled ({mode!r} '
        'mode). Set --config.train.jit_compile=false, or train.cell_kernels=auto.')
  kernels = cell_kernels.resolve(kernels) if fused and mode == 'off' else 'xla'
  if fused:
    # 'cc' runs each layer's whole recurrence as one C++ op per pass
    # (kernels/sequence.cc) in float32, and in bfloat16 where the CPU has
    # vdpbf16ps without AMX; else bfloat16 keeps oneDNN's matmuls per step,
    # with the C++ gate kernels (kernels/cell.cc) between them.
    dtype = tf.as_dtype(models.lstms[0].compute_dtype)
    whole = kernels == 'cc' and dtype in cell_kernels.sequence_dtypes() and (
        dtype == tf.float32 or hidden % 2 == 0)
    logging.info('fused_lstm: %s.', 'XLA gate kernels' if kernels == 'xla' else
                 'C++ recurrence op' if whole else 'C++ gate kernels')

  def forward_backward(inputs, targets, h, c, noise):
    with tf.GradientTape() as tape, fused_lstm.swap_in(models.lstms, fused, chains,
                                                                     kernels):
      logits, h2, c2 = models.train([inputs, h, c] + noise, training=True)
      per_char = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
      # Scaled by the global batch: summing replicas' gradients gives the mean.
      loss = tf.nn.compute_average_loss(tf.reduce_mean(per_char, axis=1),
                                        global_batch_size=global_batch)
      target = optimizer.scale_loss(loss) if scaled else loss
    return tape.gradient(target, variables), loss, h2, c2

  if mode == 'step':
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def replica_step(batch):
    if stream:
      h, c = _carry_in(train_state, batch)
    else:
      h, c = model_lib.zero_state(tf.shape(batch['targets'])[0], num_layers, hidden)
    noise = model_lib.dropout_noise(models, batch, seed, training=True)
    inputs = tf.cast(batch['inputs'], tf.float32)  # on the device: the feed stays narrow
    grads, loss, h2, c2 = forward_backward(inputs, batch['targets'], h, c, noise)
    grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
    if clip_norm > 0:
      # Norm clipping commutes with loss scaling: clip the scaled grads at scale * norm.
      limit = clip_norm * (tf.cast(optimizer.dynamic_scale, tf.float32) if scaled else 1.0)
      grads, _ = tf.clip_by_global_norm(grads, limit)
    optimizer.apply_gradients(zip(grads, variables))
    if stream:
      _carry_out(train_state, batch, (h2, c2))
    return loss

  # The TPU proxy: XLA over each whole replica step, as TPUStrategy compiles it.
  run_step = tf.function(replica_step, jit_compile=True) if mode == 'replica' else replica_step

  @tf.function
  def train_loop(iterator, n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      loss = strategy.run(run_step, args=(next(iterator),))
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
      step_var.assign_add(1)
    return total / tf.cast(n, tf.float32)

  @tf.function(jit_compile=True)
  def xla_replica_loop(stacked):
    n = stacked['targets'].shape[0]
    total = tf.constant(0.0)
    for i in tf.range(n):
      total += replica_step({k: v[i] for k, v in stacked.items()})
    return total / n

  @tf.function
  def xla_train_loop(iterator, n):
    # n is a Python int: one XLA program per distinct loop length (a handful).
    batches = [next(iterator) for _ in range(n)]
    stacked = {k: tf.stack([b[k] for b in batches]) for k in batches[0]}
    loss = strategy.run(xla_replica_loop, args=(stacked,))
    step_var.assign_add(n)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

  def replica_eval(batch):
    if stream:
      h, c = _carry_in(eval_state, batch)
    else:
      h, c = model_lib.zero_state(tf.shape(batch['targets'])[0], num_layers, hidden)
    noise = model_lib.dropout_noise(models, batch, seed, training=False)
    logits, h2, c2 = models.train([tf.cast(batch['inputs'], tf.float32), h, c] + noise,
                                  training=False)
    if stream:
      _carry_out(eval_state, batch, (h2, c2))
    per_char = tf.nn.sparse_softmax_cross_entropy_with_logits(
        batch['targets'], tf.cast(logits, tf.float32))
    if 'weights' in batch:  # a whole-split layout: partial windows and padding weigh 0
      per_char *= batch['weights']
    return tf.reduce_sum(per_char)

  @tf.function
  def eval_loop(iterator, n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      total += strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(replica_eval, args=(next(iterator),)),
                               axis=None)
    return total

  if mode == 'loop':
    return Loops(train=lambda it, n: xla_train_loop(it, int(n)), eval=eval_loop,
                 step=replica_step, fused=fused, kernels=kernels)
  return Loops(train=lambda it, n: train_loop(it, tf.constant(n)), eval=eval_loop,
               step=run_step, fused=fused, kernels=kernels)


@dataclasses.dataclass
class Training:
  """Everything a train loop drives, made by `setup`."""
  models: model_lib.Models
  optimizer: object
  schedule: object  # the learning-rate schedule (for logging)
  step: tf.Variable  # int64 global step; the loops advance it
  best_val: tf.Variable  # best validation loss so far (the best/ checkpoint's)
  train_state: tuple  # carried (h, c) of every training row
  eval_state: tuple  # carried (h, c) of every validation stream
  loops: Loops
  jit_mode: str  # 'off', 'replica', 'step' or 'loop' (see jit_mode)

  def checkpoint(self):
    """What a checkpoint holds: weights, optimizer, step, best loss, carried state."""
    return tf.train.Checkpoint(
        model=self.models.checkpoint_weights(), optimizer=self.optimizer, step=self.step,
        best_val=self.best_val, h=self.train_state[0], c=self.train_state[1])


def setup(config, strategy, vocab_size, use_cudnn='auto', bf16_fallback=True):
  """Builds the models, optimizer, carried state and compiled loops of `config`.

  use_cudnn: as for model.build (launch.doctor passes True on a GPU).
  bf16_fallback: as distribute.precision_for's fallback.

  Variables are made in `strategy.scope()`, so weights, Adam's slots and the
  carried state are mirrored (or placed on the TPU) as the strategy wants.
  Weights start from `config.seed`, so every caller starts from the same ones.
  """
  d, m, t, r = config.data, config.model, config.train, config.runtime
  keras.utils.set_random_seed(config.seed)
  precision = distribute.precision_for(r.precision, strategy, bf16_fallback)
  with strategy.scope():
    models = model_lib.build(vocab_size, m.hidden_size, m.num_layers, d.seq_length,
                             precision, dropout=m.dropout, use_cudnn=use_cudnn)
    cudnn_ok, why_not = model_lib.cudnn_report(models)
    logging.info('LSTM %s the cuDNN kernel conditions%s.',
                 'meets' if cudnn_ok else 'does not meet',
                 '' if cudnn_ok else ': ' + '; '.join(why_not))
    optimizer, schedule = make_optimizer(t, precision)
    # Built inside the scope so Adam's slots are mirrored like the weights.
    optimizer.build(models.train.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    best_val = tf.Variable(np.inf, dtype=tf.float32, trainable=False, name='best_val')
    train_state = tuple(state_variable(d.batch_size, m.num_layers, m.hidden_size, n)
                        for n in 'hc')
    eval_state = tuple(state_variable(d.eval_batch_size, m.num_layers, m.hidden_size,
                                      'eval_' + n) for n in 'hc')
  mode = jit_mode(t.jit_compile, strategy, distribute.has_gpu(), t.tpu_proxy)
  loops = build(strategy, models, optimizer, global_batch=d.batch_size,
                stream=d.mode == 'stream', clip_norm=t.grad_clip_norm,
                train_state=train_state, eval_state=eval_state, step_var=step, mode=mode,
                seed=config.seed, fused=t.fused_lstm, chains=t.lstm_chains,
                kernels=t.cell_kernels)
  return Training(models, optimizer, schedule, step, best_val, train_state, eval_state,
                  loops, mode)
