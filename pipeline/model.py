"""The seed post's model: one-hot chars -> stacked LSTM -> Dense logits.

Two Keras functional models share the same layers, as the seed's `model` and
`pred_model` do:
  train model: (one-hot (B, T, V), h (B, L, H), c (B, L, H)) -> (logits, h, c)
    with a static T, so XLA/TPU see static shapes;
  step model:  the same with T left dynamic, used one character at a time.

The LSTM keeps the cuDNN conditions (tanh/sigmoid activations,
recurrent_dropout=0, unroll=False, use_bias=True), so on a GPU Keras takes the
fused cuDNN kernel for the very same weights.
"""

import dataclasses

import keras
import tensorflow as tf

POLICIES = {'float32': 'float32', 'bfloat16': 'mixed_bfloat16', 'float16': 'mixed_float16'}


@dataclasses.dataclass
class Models:
  train: keras.Model
  step: keras.Model
  lstms: list
  dense: keras.layers.Layer
  dropout: float = 0.0  # > 0: the train model takes a 4th input, `noise` (see build)

  @property
  def variables(self):
    """The underlying tf.Variables, in a fixed order (for export)."""
    return [v.value for v in self.train.weights]

  def checkpoint_weights(self):
    """The weights as a dict a tf.train.Checkpoint can track, keyed by layer path.

    A Keras 3 model handed to tf.train.Checkpoint contributes no weights of its
    own (they were only saved through the optimizer's references), so a
    weights-only restore, as export does, would silently restore nothing.
    """
    return {v.path.replace('/', '.'): v.value for v in self.train.weights}


class NoiseDropout(keras.layers.Layer):
  """Dropout whose uniform noise is an input, so masks are a pure function of
  what the train step feeds (seed, step, rows) and a resumed run draws the
  masks an uninterrupted one would. Keras's Dropout draws from a stateful
  SeedGenerator, which breaks exact resume. Identity when not training."""

  def __init__(self, rate, **kwargs):
    super().__init__(**kwargs)
    self.rate = rate

  def call(self, x, noise, training=None):
    if not training:
      return x
    # One mask per row and unit for the whole window (variational or "locked"
    # dropout, Gal & Ghahramani 2016): as good a regulariser for LSTMs, and
    # T times less noise to draw (per-element noise ran 3x slower under XLA).
    keep = keras.ops.cast(noise >= self.rate, x.dtype) / (1.0 - self.rate)
    return x * keep[:, None, :]


def _apply(lstms, dense, x, h, c, dropouts=(), noise=None):
  hs, cs = [], []
  for i, lstm in enumerate(lstms):
    h_i = keras.ops.cast(h[:, i], lstm.compute_dtype)
    c_i = keras.ops.cast(c[:, i], lstm.compute_dtype)
    x, h_o, c_o = lstm(x, initial_state=[h_i, c_i])
    if dropouts:  # on each layer's output, not inside the recurrence (keeps cuDNN)
      x = dropouts[i](x, noise[:, i])
    # The carried state stays float32 whatever the compute precision.
    hs.append(keras.ops.cast(h_o, 'float32'))
    cs.append(keras.ops.cast(c_o, 'float32'))
  return dense(x), keras.ops.stack(hs, axis=1), keras.ops.stack(cs, axis=1)


def build(vocab_size, hidden_size, num_layers, seq_length, precision='float32', dropout=0.0,
          use_cudnn='auto'):
  """Builds the train and step models (call inside strategy.scope()).

  use_cudnn: Keras's LSTM switch. 'auto' takes the cuDNN kernel whenever a GPU
  is visible; True fails loudly where it cannot (launch.doctor's GPU check);
  False never emits the cuDNN op (exports, which must run on any CPU).

  dropout: rate applied to every LSTM layer's output sequence in training
  (between layers and before the logits), as in Zaremba et al. 2014's
  regularised LSTM, with one mask per row and unit for the whole window. The
  train model then takes a 4th input, `noise`: uniform [0, 1) noise of shape
  (B, layers, H) (`dropout_noise`); the step model runs without dropout.
  """
  policy = POLICIES[precision]
  lstms = [
      keras.layers.LSTM(hidden_size, return_sequences=True, return_state=True,
                        activation='tanh', recurrent_activation='sigmoid',
                        recurrent_dropout=0.0, unroll=False, use_bias=True,
                        use_cudnn=use_cudnn, dtype=policy, name=f'lstm_{i}')
      for i in range(num_layers)
  ]
  # Logits (and so the softmax and the loss) stay float32 under bfloat16.
  dense = keras.layers.Dense(vocab_size, dtype='float32', name='logits')

  dropouts = [NoiseDropout(dropout, name=f'dropout_{i}')
              for i in range(num_layers)] if dropout > 0 else []

  def functional(t, name, drop):
    x = keras.Input((t, vocab_size), name='inputs')
    h = keras.Input((num_layers, hidden_size), name='h')
    c = keras.Input((num_layers, hidden_size), name='c')
    noise = [keras.Input((num_layers, hidden_size), name='noise')] if drop else []
    outputs = _apply(lstms, dense, x, h, c, drop, noise[0] if noise else None)
    return keras.Model([x, h, c] + noise, list(outputs), name=name)

  train = functional(seq_length, 'charlstm_train', dropouts)
  step = functional(None, 'charlstm_step', ())
  return Models(train=train, step=step, lstms=lstms, dense=dense, dropout=dropout)


def dropout_noise(models, batch, seed, training):
  """The train model's `noise` input for a batch ([] without dropout).

  Training: uniform noise drawn statelessly from (seed, step, first row), so
  a resumed run repeats it. Evaluation: zeros (NoiseDropout ignores it).
  """
  if not models.dropout:
    return []
  shape = [tf.shape(batch['targets'])[0], len(models.lstms), models.lstms[0].units]
  if not training:
    return [tf.zeros(shape)]
  key = tf.random.experimental.stateless_fold_in(
      tf.stack([tf.cast(seed, tf.int32), batch['step'][0]]), batch['rows'][0])
  return [tf.random.stateless_uniform(shape, seed=key)]


def zero_state(batch, num_layers, hidden_size):
  z = tf.zeros([batch, num_layers, hidden_size], tf.float32)
  return z, z


def cudnn_report(models):
  """Says whether the LSTM layers meet the cuDNN kernel's conditions, and why not."""
  reasons = []
  for lstm in models.lstms:
    cell = lstm.cell
    if cell.activation is not keras.activations.tanh:
      reasons.append(f'{lstm.name}: activation is not tanh')
    if cell.recurrent_activation is not keras.activations.sigmoid:
      reasons.append(f'{lstm.name}: recurrent_activation is not sigmoid')
    if cell.recurrent_dropout:
      reasons.append(f'{lstm.name}: recurrent_dropout > 0')
    if lstm.unroll:
      reasons.append(f'{lstm.name}: unroll=True')
    if not cell.use_bias:
      reasons.append(f'{lstm.name}: use_bias=False')
  return not reasons, reasons
