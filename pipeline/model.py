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


def _apply(lstms, dense, x, h, c):
  hs, cs = [], []
  for i, lstm in enumerate(lstms):
    h_i = keras.ops.cast(h[:, i], lstm.compute_dtype)
    c_i = keras.ops.cast(c[:, i], lstm.compute_dtype)
    x, h_o, c_o = lstm(x, initial_state=[h_i, c_i])
    # The carried state stays float32 whatever the compute precision.
    hs.append(keras.ops.cast(h_o, 'float32'))
    cs.append(keras.ops.cast(c_o, 'float32'))
  return dense(x), keras.ops.stack(hs, axis=1), keras.ops.stack(cs, axis=1)


def build(vocab_size, hidden_size, num_layers, seq_length, precision='float32'):
  """Builds the train and step models (call inside strategy.scope())."""
  policy = POLICIES[precision]
  lstms = [
      keras.layers.LSTM(hidden_size, return_sequences=True, return_state=True,
                        activation='tanh', recurrent_activation='sigmoid',
                        recurrent_dropout=0.0, unroll=False, use_bias=True,
                        dtype=policy, name=f'lstm_{i}')
      for i in range(num_layers)
  ]
  # Logits (and so the softmax and the loss) stay float32 under bfloat16.
  dense = keras.layers.Dense(vocab_size, dtype='float32', name='logits')

  def functional(t, name):
    x = keras.Input((t, vocab_size), name='inputs')
    h = keras.Input((num_layers, hidden_size), name='h')
    c = keras.Input((num_layers, hidden_size), name='c')
    return keras.Model([x, h, c], list(_apply(lstms, dense, x, h, c)), name=name)

  train = functional(seq_length, 'charlstm_train')
  step = functional(None, 'charlstm_step')
  return Models(train=train, step=step, lstms=lstms, dense=dense)


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
