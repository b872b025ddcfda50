"""A fused LSTM recurrence for the train step: the Keras layer's math, a faster gradient.

Keras runs an LSTM layer as a while loop over the cell and lets TensorFlow
differentiate that loop. On a CPU the loop's gradient is slow: every time step
adds its own small weight-gradient matmul (h_{t-1}^T dz_t: K = batch rows) into
the whole (H, 4H) gradient, T times per step, and at H=512 that 4 MB
accumulator no longer fits in cache. `lstm_sequence` computes the same thing
the way cuDNN does:

  forward:  the input projection x_t W_x + b for all T at once (one matmul of
            T*B rows), then the recurrence h_{t-1} W_h one step at a time;
  backward: only dh/dc run through the loop backwards (dz_t W_h^T per step);
            the weight gradients are one matmul each over all T*B rows, after
            the loop;
  and each step's gate math (sigmoids, tanhs, products) is one small XLA
  kernel, whatever train.jit_compile says: it is part of this op, as cuDNN's
  kernels are part of Keras's GPU LSTM.

The matmuls, and so the FLOPs, are the ones the Keras layer does. The values
agree with Keras's to float32 rounding (tests/fused_lstm_test.py).

`swap_in(models.lstms)` makes the Keras LSTM layers use it while the train
step (or the exported sampler) is traced: the Keras functional graph stays the one definition of
the model (layer order, dropout, casts, the carried state); only the
recurrence inside each layer is replaced. It applies to float32 LSTM layers
without dropout inside the recurrence, which is what pipeline.model builds;
other layers keep Keras's loop (on a GPU Keras's cuDNN kernel is faster still,
so pipeline.steps does not swap there).
"""

import contextlib
import functools

import keras
import tensorflow as tf


def _gates(z):
  """Keras's gate layout: z = [i | f | g | o], sigmoid except tanh for g."""
  i, f, g, o = tf.split(z, 4, axis=1)
  return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)


# The per-step elementwise math as XLA kernels: one fused pass over a (B, 4H)
# block that stays in cache, instead of ~10 (forward) and ~20 (backward)
# TensorFlow ops, each with its own dispatch. The matmuls stay outside, in
# TensorFlow's (oneDNN's) multi-threaded kernels, which beat XLA's on CPU at
# H >= 512. (XLA over the whole sequence measured slower at H=512; vectorising
# the gate derivatives over all T at once was slower too: passes over (T, B, 4H)
# arrays that do not fit in cache.)
def _cell(z, c):
  i, f, g, o = _gates(z)
  c = f * c + i * g
  return o * tf.tanh(c), c


_cell_forward = tf.function(_cell, jit_compile=True)


@tf.function(jit_compile=True)
def _cell_backward(z, c, c_prev, dh, dc_next):
  """(dL/dz_t, dL/dc_{t-1} through the cell) from dL/dh_t (all paths) and dL/dc_t via c_{t+1}."""
  i, f, g, o = _gates(z)
  tanh_c = tf.tanh(c)
  dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
  dz = tf.concat([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                  dc * i * (1.0 - g * g), dh * tanh_c * o * (1.0 - o)], 1)
  return dz, dc * f


def lstm_sequence(x, h0, c0, kernel, recurrent_kernel, bias, input_grad=True):
  """Runs an LSTM over x with Keras's gate layout (i, f, g, o); a fused gradient.

  Args:
    x: float32 (B, T, D) inputs.
    h0, c0: float32 (B, H) initial state.
    kernel: (D, 4H); recurrent_kernel: (H, 4H); bias: (4H,).
    input_grad: False skips dL/dx (the first layer's inputs are data).

  Returns:
    (outputs (B, T, H), h_T (B, H), c_T (B, H)).
  """

  @tf.custom_gradient
  def run(x, h0, c0, w_x, w_h, b):
    d, hid = x.shape[-1], w_h.shape[0]
    t_len = tf.shape(x)[1]
    x_rows = tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, d])  # time-major rows
    xz = tf.reshape(tf.matmul(x_rows, w_x) + b, [t_len, -1, 4 * hid])
    xz = tf.TensorArray(tf.float32, size=t_len).unstack(xz)

    def step(t, h, c, zs, hs, cs):
      z = xz.read(t) + tf.matmul(h, w_h)
      h, c = _cell_forward(z, c)
      return t + 1, h, c, zs.write(t, z), hs.write(t, h), cs.write(t, c)

    # z and c are kept for the backward pass (gates are recomputed from z there).
    arrays = [tf.TensorArray(tf.float32, size=t_len, clear_after_read=False)
              for _ in range(3)]
    _, h_t, c_t, zs, hs, cs = tf.while_loop(
        lambda t, *_: t < t_len, step, [tf.constant(0), h0, c0, *arrays])
    h_all = hs.stack()  # (T, B, H)

    def grad(d_outputs, d_h_t, d_c_t):
      d_out = tf.TensorArray(tf.float32, size=t_len).unstack(
          tf.transpose(d_outputs, [1, 0, 2]))
      w_h_t = tf.transpose(w_h)

      def back(t, dh_next, dc_next, c, dzs):
        c_prev = tf.cond(t > 0, lambda: cs.read(tf.maximum(t - 1, 0)), lambda: c0)
        dz, dc = _cell_backward(zs.read(t), c, c_prev, d_out.read(t) + dh_next, dc_next)
        return t - 1, tf.matmul(dz, w_h_t), dc, c_prev, dzs.write(t, dz)

      _, dh0, dc0, _, dzs = tf.while_loop(
          lambda t, *_: t >= 0, back,
          [t_len - 1, tf.zeros_like(h0) if d_h_t is None else d_h_t,
           tf.zeros_like(c0) if d_c_t is None else d_c_t, c_t,
           tf.TensorArray(tf.float32, size=t_len)])
      # The weight gradients: one matmul each over all T * B rows.
      dz_rows = tf.reshape(dzs.stack(), [-1, 4 * hid])
      h_prev = tf.reshape(tf.concat([h0[None], h_all[:-1]], 0), [-1, hid])
      d_w_h = tf.matmul(h_prev, dz_rows, transpose_a=True)
      d_w_x = tf.matmul(x_rows, dz_rows, transpose_a=True)
      d_b = tf.reduce_sum(dz_rows, 0)
      dx = None
      if input_grad:
        dx = tf.transpose(tf.reshape(tf.matmul(dz_rows, w_x, transpose_b=True),
                                     [t_len, -1, d]), [1, 0, 2])
      return dx, dh0, dc0, d_w_x, d_w_h, d_b

    return (tf.transpose(h_all, [1, 0, 2]), h_t, c_t), grad

  return run(x, h0, c0, kernel, recurrent_kernel, bias)


def supported(lstm):
  """Whether `lstm` (a keras.layers.LSTM) computes exactly what lstm_sequence does."""
  cell = lstm.cell
  return (lstm.compute_dtype == 'float32' and cell.use_bias and not cell.dropout
          and not cell.recurrent_dropout and not lstm.go_backwards and not lstm.stateful
          and not lstm.unroll and lstm.return_sequences
          and cell.activation is keras.activations.tanh
          and cell.recurrent_activation is keras.activations.sigmoid)


def _inner_loop(lstm, input_grad, sequences, initial_state, mask, training=False):
  """Stands in for keras.layers.LSTM.inner_loop: (last output, outputs, [h, c])."""
  del training  # no dropout inside the recurrence (see `supported`)
  if mask is not None:
    raise ValueError('fused_lstm does not take masks; the train step has none.')
  cell = lstm.cell
  h, c = initial_state
  if sequences.shape[1] == 1:
    # One char (sampling): no loop, and plain TensorFlow ops, so that a
    # SavedModel holds no XLA kernel (TF Serving builds may lack XLA).
    z = (tf.matmul(sequences[:, 0], cell.kernel.value)
         + tf.matmul(h, cell.recurrent_kernel.value) + cell.bias.value)
    h, c = _cell(z, c)
    return h, h[:, None], [h, c]
  outputs, h, c = lstm_sequence(sequences, h, c, cell.kernel.value,
                                cell.recurrent_kernel.value, cell.bias.value,
                                input_grad=input_grad)
  return outputs[:, -1], outputs, [h, c]


@contextlib.contextmanager
def swap_in(lstms, enabled=True):
  """Within the block, the supported layers of `lstms` (in stack order) run lstm_sequence.

  Use it around the model call that a tf.function traces; the traced graph
  keeps the fused op after the block ends. The first layer skips the input
  gradient (its inputs are one-hot data). A call with one time step (the
  sampler's step model) runs the cell once, without a loop.
  """
  swapped = [lstm for lstm in lstms if enabled and supported(lstm)]
  for lstm in swapped:
    # object.__setattr__: a plain instance attribute, not a Keras-tracked one.
    object.__setattr__(lstm, 'inner_loop', functools.partial(
        _inner_loop, lstm, lstm is not lstms[0]))
  try:
    yield len(swapped)
  finally:
    for lstm in swapped:
      object.__delattr__(lstm, 'inner_loop')
