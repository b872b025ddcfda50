"""The cases of the speed table (see pipeline.bench.speed): each builds one way to
train or sample the same model and returns a `Case` whose run(work) does
`work` units (train steps, chars, matmuls) and returns the seconds taken.

The baselines are written as their users would write them: Keras's compile
and fit for (b), the seed post's code for (c) and (e). charlstm's cases use
the library as pipeline.train and the exported SavedModel do: (a) and (d) are
set up by `steps.setup`, the one set-up pipeline.train uses.
"""

import copy
import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import data as data_lib
from pipeline import distribute
from pipeline import export as export_lib
from pipeline import fused_lstm
from pipeline import model as model_lib
from pipeline import steps as steps_lib

SAMPLE_PROMPTS = 64  # case h
MATMUL_SIZE = 2048  # peak: (n x n) @ (n x n), big enough for oneDNN's best kernel


def flops_per_char(vocab, hidden, layers):
  """Matmul FLOPs (2 per multiply-add) to train on one char: forward + backward.

  Per LSTM layer with input width D: forward x W_x and h W_h, 8H(D + H);
  backward the weight gradients, 8H(D + H), dh W_h^T, 8H^2, and the input
  gradient dz W_x^T, 8HD, except in the first layer (its inputs are data).
  The Dense layer: 2HV forward, 4HV backward. Elementwise gate math, the
  softmax and Adam are left out (under 2% of the total at H >= 128).
  """
  total, d = 0, vocab
  for layer in range(layers):
    total += 8 * hidden * (d + hidden) * 2 + 8 * hidden * hidden
    if layer:
      total += 8 * hidden * d
    d = hidden
  return total + 6 * hidden * vocab


@dataclasses.dataclass
class Case:
  """One row of the table: `run(work)` does `work` units and returns the seconds it took."""
  key: str
  label: str
  section: str  # 'train', 'input', 'peak' or 'sample'
  run: object
  chars_per_unit: float  # chars (FLOPs for 'peak') per unit of work
  work: int = 1
  rates: list = dataclasses.field(default_factory=list)

  def measure(self):
    self.rates.append(self.work * self.chars_per_unit / self.run(self.work))


def _timed(fn):
  """A run() that times fn(work) by the wall clock."""
  def run(work):
    t0 = time.perf_counter()
    fn(work)
    return time.perf_counter() - t0
  return run


class _FitClock(keras.callbacks.Callback):
  """Times fit from the end of its first batch (the start of the second) to the end.

  Uses on_train_batch_begin and on_train_end only: overriding
  on_train_batch_end would stop Keras dispatching callbacks asynchronously,
  changing what fit does.
  """

  def on_train_begin(self, logs=None):
    self.start = None

  def on_train_batch_begin(self, batch, logs=None):
    if batch == 1:
      self.start = time.perf_counter()

  def on_train_end(self, logs=None):
    self.seconds = time.perf_counter() - self.start


def _fit_run(model, data):
  """run(steps) for model.fit: steps + 1 batches, timed over the last `steps`."""
  clock = _FitClock()

  def run(steps):
    model.fit(data, steps_per_epoch=steps + 1, epochs=1, verbose=0, shuffle=False,
              callbacks=[clock])
    return clock.seconds
  return run


class Setup:
  """The config, corpus and strategy one model size's cases share."""

  def __init__(self, config, corpus, strategy):
    self.config, self.corpus, self.strategy = config, corpus, strategy
    self.vocab = corpus.vocab.size
    c = config
    self.b, self.t = c.data.batch_size, c.data.seq_length
    self.hidden, self.layers = c.model.hidden_size, c.model.num_layers
    self.layout = data_lib.make_layout(len(corpus.train), self.t, self.b, 'shuffle')

  def dataset(self, ctx=None):
    return data_lib.make_dataset(self.corpus.train, self.vocab, self.layout, ctx,
                                 seed=self.config.seed)

  def models(self):
    keras.utils.set_random_seed(self.config.seed)  # every case starts from the same weights
    return model_lib.build(self.vocab, self.hidden, self.layers, self.t,
                           self.config.runtime.precision)


def charlstm_case(s, key, label, *, steps_per_loop, jit, fused, precision=None, kernels=None):
  """Case a, a16 or d: pipeline.steps' train loop, set up by steps.setup as pipeline.train does.

  The case's config is the size's with these train settings (and precision,
  if given); shuffle mode (every window from zero state, as in b and c), and
  the weights of `config.seed`. kernels: train.cell_kernels, if given.
  """
  config = config_lib.override(copy.deepcopy(s.config), **{
      'train.steps_per_loop': steps_per_loop, 'train.jit_compile': jit,
      'train.fused_lstm': fused, 'data.mode': 'shuffle',
      'runtime.precision': precision or s.config.runtime.precision,
      'train.cell_kernels': kernels or s.config.train.cell_kernels})
  training = steps_lib.setup(config, s.strategy, s.vocab)
  loops = training.loops
  iterator = iter(s.strategy.distribute_datasets_from_function(s.dataset))

  def train(steps):  # as pipeline.train does: loops of <= steps_per_loop, a loss read per loop
    done = 0
    while done < steps:
      n = min(steps_per_loop, steps - done)
      float(loops.train(iterator, n))
      done += n
  case = Case(key, label, 'train', _timed(train), s.b * s.t)
  case.models = training.models  # exported for the sampling cases
  case.xla_loop = training.jit_mode == 'loop'  # XLA compiles one program per loop length
  case.kernels = training.loops.kernels  # the fused LSTM's gate kernels: 'cc' or 'xla'
  return case


def precision_numerics(s, precision, steps, steps_per_loop=50):
  """Trains float32 and `precision` copies of case a's setup on the same batches.

  Both start from the weights of `config.seed` and read the same shuffled
  windows, so their losses differ only by the arithmetic. Returns each one's
  mean training loss over its last loop (steps - steps_per_loop + 1 .. steps)
  and the difference.

  On a CPU without bf16 (AVX512-BF16, AMX) training falls back to float32,
  which would compare float32 with itself. Here both copies then run under
  XLA (train.jit_compile) and bfloat16 is kept: XLA's CPU backend computes a
  bfloat16 matmul as a float32 one on the bfloat16-rounded operands, rounding
  the result to bfloat16, which is the arithmetic of oneDNN's bf16 kernels
  (bf16 operands, exact products, float32 sums) up to the order of the sums,
  at float32 speed. (TensorFlow's own bf16 MatMul without oneDNN is slower.)
  """
  # Asked of the one rule training uses, so the two cannot disagree (GPUs, TPUs, unknown CPUs).
  emulated = distribute.precision_for(precision, s.strategy) != precision
  losses = {}
  for p in ('float32', precision):
    config = config_lib.override(copy.deepcopy(s.config), **{
        'train.steps_per_loop': steps_per_loop, 'train.jit_compile': emulated,
        'train.fused_lstm': True, 'data.mode': 'shuffle', 'runtime.precision': p})
    training = steps_lib.setup(config, s.strategy, s.vocab, bf16_fallback=False)
    iterator = iter(s.strategy.distribute_datasets_from_function(s.dataset))
    done = 0
    while done < steps:
      n = min(steps_per_loop, steps - done)
      loss = float(training.loops.train(iterator, n))
      done += n
    trained_as = training.models.lstms[0].compute_dtype
    losses[p] = {'loss': loss, 'trained_as': trained_as + (' under XLA (no bf16 on this CPU)'
                                                           if emulated else '')}
  return {'steps': steps, 'precision': precision, 'float32_loss': losses['float32']['loss'],
          'loss': losses[precision]['loss'], 'trained_as': losses[precision]['trained_as'],
          'difference': losses[precision]['loss'] - losses['float32']['loss']}


def fit_case(s):
  """Case b: the same Keras model, data, loss and optimizer through compile + fit."""
  c, models = s.config, s.models()
  model = keras.Model(models.train.inputs, models.train.outputs[0])  # logits only
  _, schedule = steps_lib.make_optimizer(c.train, c.runtime.precision)
  clip = c.train.grad_clip_norm or None
  model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule, global_clipnorm=clip),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  zeros = tf.zeros([s.b, s.layers, s.hidden])  # shuffle mode: every window from zero state
  data = s.dataset().map(
      lambda x: ((tf.cast(x['inputs'], tf.float32), zeros, zeros), x['targets']))
  return Case('b', 'model.compile + model.fit', 'train', _fit_run(model, data), s.b * s.t)


def _seed_models(vocab_size, hidden, layers=1):
  """The post's model and pred_model, in Keras 3 spelling (`layers` stacked LSTMs).

  pred_model takes [x, h_1, c_1, h_2, c_2, ...] and returns [probs, h_1, c_1, ...].
  """
  inputs = keras.Input(shape=(None, vocab_size))
  lstms = [keras.layers.LSTM(hidden, return_sequences=True, return_state=True)
           for _ in range(layers)]
  dense = keras.layers.Dense(vocab_size, activation='softmax')
  x = inputs
  for lstm in lstms:
    x, _, _ = lstm(x)
  model = keras.Model(inputs, dense(x))
  states_in = [keras.Input(shape=(hidden,)) for _ in range(2 * layers)]
  x, states = inputs, []
  for i, lstm in enumerate(lstms):
    x, h, c = lstm(x, initial_state=states_in[2 * i:2 * i + 2])
    states += [h, c]
  pred_model = keras.Model([inputs] + states_in, [dense(x)] + states)
  return model, pred_model


def seed_fit_case(s):
  """Case c: the post's fit on a generator of single one-hot windows."""
  keras.utils.set_random_seed(s.config.seed)
  model, _ = _seed_models(s.vocab, s.hidden, s.layers)
  model.compile(loss='categorical_crossentropy',
                optimizer=keras.optimizers.Adam(s.config.train.learning_rate))
  ids, t = s.corpus.train, s.t
  eye = np.eye(s.vocab, dtype=np.float32)

  def data_feed():  # the post's generator: consecutive windows, batch size 1
    p = 0
    while True:
      window = ids[p:p + t + 1].astype(np.int64)
      yield eye[window[:-1]][None], eye[window[1:]][None]
      p = (p + t) % (len(ids) - t - 1)
  return Case('c', 'seed post: fit on a generator, batch 1', 'train',
              _fit_run(model, data_feed()), t)


def input_case(s):
  """The input pipeline alone: batches pulled inside a tf.function, as the train loop does."""
  ds = s.dataset()
  iterator = iter(ds)

  @tf.function
  def pull(n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      batch = next(iterator)
      total += (tf.cast(batch['inputs'][0, 0, 0], tf.float32) +
                tf.cast(batch['targets'][0, 0], tf.float32))
    return total
  case = Case('input', 'tf.data pipeline alone', 'input',
              _timed(lambda n: pull(tf.constant(n)).numpy()), s.b * s.t)
  # What crosses to the device per character: the one-hot inputs, and the whole batch.
  spec = ds.element_spec
  size = lambda k: spec[k].shape.num_elements() * spec[k].dtype.size
  case.input_bytes_per_char = size('inputs') / (s.b * s.t)
  case.bytes_per_char = sum(size(k) for k in spec) / (s.b * s.t)
  return case


def peak_case(size=MATMUL_SIZE):
  """float32 matmul throughput: one (size x size) product per unit of work.

  Each measurement times TensorFlow's MatMul kernel (oneDNN where TensorFlow
  enables it, Eigen elsewhere) and XLA's dot, and keeps the faster: without
  oneDNN, XLA's dot is the faster one here (AVX2 CPUs), and a train loop
  compiled by XLA must not be measured against the slower kernel's peak.
  """
  a = tf.random.stateless_normal([size, size], seed=[1, 2])
  b = tf.random.stateless_normal([size, size], seed=[3, 4])
  products = [tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)), jit_compile=jit)
              for jit in (False, True)]
  for product in products:
    product().numpy()  # tracing and compiling are not timed

  def run(n):
    seconds = []
    for product in products:
      t0 = time.perf_counter()
      for _ in range(n):
        product().numpy()
      seconds.append(time.perf_counter() - t0)
    return min(seconds)
  return Case('peak', f'float32 matmul {size}x{size}, best of TF and XLA', 'peak', run,
              2 * size ** 3)


def matmul_case(s, jit=False):
  """Case m: the matmuls of one of a's train steps and nothing else: a's ceiling.

  The same shapes, float32, chain split and loop as the fused LSTM (the
  recurrences still run one step after another, each chain its own matmul
  per step), without the gate math, the loss, the optimizer or the data: a
  slice (forward) or a concat (backward) stands in for each step's gates, as
  the cheapest op that makes step t+1 wait for step t. Its FLOPs are
  flops_per_char's, so its share of the peak is the most that (a) could reach
  with every other op free. jit: compile it with XLA, as (a) is where its
  loop runs under XLA (without oneDNN TensorFlow's MatMul runs these shapes at
  under half XLA's rate, so an uncompiled m would set the ceiling too low).
  """
  b, t, hid, v = s.b, s.t, s.hidden, s.vocab
  k = fused_lstm.chains_for(b, s.config.train.lstm_chains)
  rand = lambda *shape: tf.random.stateless_normal(shape, seed=[5, len(shape)]) * 0.05
  x_rows, h0 = rand(t * b, v), tf.zeros([b // k, hid])
  h_rows, dz_rows = rand(t * b, hid), rand(t * b, 4 * hid)  # all T*B rows' h and dL/dz
  weights = [(rand(d, 4 * hid), rand(hid, 4 * hid)) for d in [v] + [hid] * (s.layers - 1)]
  w_out = rand(hid, v)

  @tf.function(jit_compile=jit)
  def step():
    kept, inputs = [], x_rows  # kept: one element of each product, so none is pruned
    for layer, (w_x, w_h) in enumerate(weights):
      xz = tf.matmul(inputs, w_x)
      _, hs = tf.while_loop(lambda i, _: i < t, lambda i, hs: (
          i + 1, [tf.matmul(h, w_h)[:, :hid] for h in hs]), [0, [h0] * k])
      w_h_t = tf.transpose(w_h)
      _, dzs = tf.while_loop(lambda i, _: i < t, lambda i, dzs: (i + 1, [
          tf.concat([tf.matmul(dz, w_h_t), dz[:, hid:]], 1) for dz in dzs]),
                             [0, [xz[:b // k]] * k])
      kept += [xz] + hs + dzs  # every chain's, or grappler prunes the unused ones
      with tf.control_dependencies(dzs):  # as in the op: after the backward loop
        kept += [tf.matmul(h_rows, dz_rows, transpose_a=True),
                 tf.matmul(inputs, dz_rows, transpose_a=True)]
        if layer:
          kept.append(tf.matmul(dz_rows, w_x, transpose_b=True))
      inputs = h_rows
    logits = tf.matmul(inputs, w_out)
    kept += [logits, tf.matmul(inputs, logits, transpose_a=True),
             tf.matmul(logits, w_out, transpose_b=True)]
    return tf.add_n([p[0, 0] for p in kept])

  def run(steps):
    t0 = time.perf_counter()
    for _ in range(steps):
      step().numpy()
    return time.perf_counter() - t0
  case = Case('m', "a's matmuls only: no gates, loss, optimizer" + (', XLA' if jit else ''),
              'train', run, b * t)
  case.step = step  # its graph is the test's evidence of which matmuls it runs
  return case


def sampling_cases(s, models, export_dir):
  """Cases e-h on the same model size; f-h on a SavedModel exported from `models`."""
  keras.utils.set_random_seed(s.config.seed)
  _, pred_model = _seed_models(s.vocab, s.hidden, s.layers)
  v, hidden, layers = s.vocab, s.hidden, s.layers
  rng = np.random.default_rng(0)
  eye = np.eye(v, dtype=np.float32)

  def seed_test(n):  # the post's test(): one predict per character
    x = eye[[rng.integers(v)]][None]
    states = [np.zeros((1, hidden), np.float32)] * (2 * layers)
    for _ in range(n):
      prob, *states = pred_model.predict([x] + states, verbose=0)
      p = prob[-1][0].astype(np.float64)
      x = eye[[rng.choice(v, p=p / p.sum())]][None]

  export_lib.export_models(models, s.corpus.vocab, export_dir)
  loaded = tf.saved_model.load(export_dir)
  step = loaded.signatures['step']

  def step_loop(n):  # a user's sampler over the `step` signature
    ids = tf.constant([int(rng.integers(v))], tf.int32)
    h = c = tf.zeros([1, layers, hidden])
    for _ in range(n):
      out = step(ids=ids, h=h, c=c)
      h, c = out['h'], out['c']
      p = out['probs'].numpy()[0].astype(np.float64)
      ids = tf.constant([rng.choice(v, p=p / p.sum())], tf.int32)

  def generate(prompts):
    def run(n):
      loaded.generate(prompts=tf.constant(prompts), num_chars=tf.constant(n),
                      temperature=tf.constant(0.8), top_k=tf.constant(0),
                      seed=tf.constant(1, tf.int64))['text'].numpy()
    return run
  first = s.corpus.vocab.chars[-1]  # any in-vocabulary one-char prompt
  return [
      Case('e', 'seed post: Model.predict per char', 'sample', _timed(seed_test), 1),
      Case('f', 'Python loop over SavedModel `step`', 'sample', _timed(step_loop), 1),
      Case('g', 'SavedModel `generate`, 1 prompt', 'sample', _timed(generate([first])), 1),
      Case('h', f'SavedModel `generate`, {SAMPLE_PROMPTS} prompts', 'sample',
           _timed(generate([first] * SAMPLE_PROMPTS)), SAMPLE_PROMPTS),
  ]
