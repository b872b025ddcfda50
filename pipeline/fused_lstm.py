"""A fused LSTM recurrence for the train step: the Keras layer's math, a faster gradient.

Keras runs an LSTM layer as a while loop over the cell and lets TensorFlow
differentiate that loop. On a CPU the loop's gradient is slow: every time step
adds its own small weight-gradient matmul (h_{t-1}^T dz_t: K = batch rows) into
the whole (H, 4H) gradient, T times per step, and at H=512 that 4 MB
accumulator no longer fits in cache. `lstm_sequence` computes the same thing
the way cuDNN does:

  forward:  the input projection x_t W_x + b for all T at once (one matmul of
            T*B rows; a row gather for one-hot data), then the recurrence
            h_{t-1} W_h one step at a time;
  backward: only dh/dc run through the loop backwards (dz_t W_h^T per step);
            the weight gradients are one matmul each over all T*B rows, after
            the loop;
  and each step's gate math is one small kernel, whatever train.jit_compile
  says: a C++ op built for this CPU (pipeline.kernels.cell, kernels='cc') or
  an XLA kernel (kernels='xla', and inside XLA-compiled steps), part of this
  op as cuDNN's kernels are part of Keras's GPU LSTM; with kernels='cc' the
  whole loop, recurrent matmuls included, is one C++ op per pass
  (kernels/sequence.cc: per-step TensorFlow ops cost as much as the matmuls);
  and the batch rows run as `chains` independent recurrences (train.lstm_chains;
  one per CPU core by default): at B=64 one (B, H) x (H, 4H) matmul is too
  small to keep two cores busy.

The matmuls, and so the FLOPs, are the ones the Keras layer does. The values
agree with Keras's to float32 rounding (tests/fused_lstm_test.py).

bfloat16 (runtime.precision=bfloat16, Keras's mixed_bfloat16 layers) runs the
same matmuls on bfloat16 operands (AMX tiles or vdpbf16ps in kernels/sequence.cc,
oneDNN elsewhere) while the gate math and the cell state stay float32: more
precise than Keras's bfloat16 loop, which keeps c in bfloat16. The first
layer's input projection stays float32 too (lstm_sequence's input_grad).

`swap_in(models.lstms)` makes the Keras LSTM layers use it while the train
step (or the exported sampler) is traced: the Keras functional graph stays the
one definition of the model (layer order, dropout, casts, the carried state);
only the recurrence inside each layer is replaced, in float32 and bfloat16
layers without dropout inside the recurrence (what pipeline.model builds).
Other layers keep Keras's loop (on a GPU cuDNN is faster still: no swap).
"""

import contextlib
import functools
import os

import keras
import tensorflow as tf
from keras.src.backend import AutocastScope

from pipeline.kernels import cell as cell_kernels


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
def lstm_cell(z, c):
  """Keras's LSTM cell on pre-activations z = [i | f | g | o]: (h, c)."""
  i, f, g, o = _gates(z)
  c = f * c + i * g
  return o * tf.tanh(c), c


@tf.function(jit_compile=True)
def _cell_forward(xz, hw, c):
  """One step from the input projection xz and h_{t-1} W_h (in the matmul dtype).

  The add and the casts live in the kernel too: each is a TensorFlow op with
  its own dispatch otherwise, T times per step. Returns h in the matmul dtype
  (the next step's matmul operand), c and z float32. A float32 h as well
  would cost bfloat16 a separate convert kernel per step; only the last
  step's is needed, and lstm_sequence recomputes it from z and c.
  """
  z = xz + tf.cast(hw, tf.float32)
  h, c = lstm_cell(z, c)
  return tf.cast(h, hw.dtype), c, z


@tf.function(jit_compile=True)
def _cell_backward(z, c, c_prev, d_out, dh_w, dc_next):
  """(dL/dz_t in the matmul dtype, dL/dc_{t-1} through the cell).

  dL/dh_t is d_out (from the outputs) plus dh_w (dz_{t+1} W_h^T, in the matmul
  dtype); dc_next is dL/dc_t via c_{t+1}.
  """
  dh = d_out + tf.cast(dh_w, tf.float32)
  i, f, g, o = _gates(z)
  tanh_c = tf.tanh(c)
  dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
  dz = tf.concat([tf.cast(p, dh_w.dtype) for p in (
      dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
      dc * i * (1.0 - g * g), dh * tanh_c * o * (1.0 - o))], 1)
  return dz, dc * f


def _cell_kernels(kernels):
  """(forward, backward) gate kernels: 'xla' above, or 'cc' (pipeline.kernels.cell)."""
  if kernels == 'xla':
    return _cell_forward, _cell_backward
  if kernels != 'cc':
    raise ValueError(f"kernels must be 'cc' or 'xla', got {kernels!r}")
  ops = cell_kernels.load()
  return ops.charlstm_cell_forward, ops.charlstm_cell_backward


def chains_for(batch, chains=0):
  """How many independent recurrences to split a batch of `batch` rows into.

  A (B, H) x (H, 4H) matmul at B=64 is too small for oneDNN to keep two cores
  busy (one chain ran at 100-106 GFLOP/s at H=256 against a 230 GFLOP/s matmul
  peak here); two half-batch chains in one loop run side by side on the
  inter-op threads (1.6-1.75x at H=256). chains=0 picks one per CPU core up to
  one per 16 rows, and 1 where that count does not divide the batch; a count
  asked for must divide it (pipeline.train checks before tracing).
  """
  if chains > 0:
    if batch % chains:
      raise ValueError(f'lstm_chains={chains} does not divide the batch of {batch} rows.')
    return chains
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  chains = max(1, min(cores or 1, batch // 16))
  return chains if batch % chains == 0 else 1


def _project(x_rows, w_x, b, input_grad):
  """Each block of rows times W_x, plus b, in float32: (rows, 4H) per block.

  For the first layer (input_grad=False) one-hot rows (the data) project by
  a gather of (W_x + b)'s rows: the same values as the matmul (one 1 and
  zeros), and at H=512 the K=V matmul took ~10 ms per chain per step, the
  gather a pass over its output. Inputs that are not exactly one-hot take
  the matmul. (The C++ recurrence, _whole_sequence, reads the table itself.)
  """
  def matmul(rows):
    return tf.cast(tf.matmul(tf.cast(rows, w_x.dtype), w_x), tf.float32) + b
  if input_grad:
    return [matmul(r) for r in x_rows]
  ids, one_hot = one_hot_ids(x_rows)
  table = w_x + b
  return [tf.cond(one_hot, lambda i=i: tf.gather(table, i), lambda r=r: matmul(r))
          for r, i in zip(x_rows, ids)]


def one_hot_ids(x_rows):
  """(ids int32 per block of rows, whether every row is exactly one-hot)."""
  ids = [tf.argmax(rows, 1, output_type=tf.int32) for rows in x_rows]
  one_hot = tf.reduce_all([
      tf.reduce_all(tf.equal(rows, tf.one_hot(i, rows.shape[-1], dtype=rows.dtype)))
      for rows, i in zip(x_rows, ids)])
  return ids, one_hot


def _left(h, x):
  """[h, x, 1] along the last axis: the weight gradients' left operand (see _weight_grads)."""
  ones = tf.ones(tf.concat([tf.shape(x)[:-1], [1]], 0), h.dtype)
  return tf.concat([h, tf.cast(x, h.dtype), ones], -1)


def _weight_grads(lefts, dz_rows, input_grad, w_x, d_w_x=None):
  """(d_w_x, d_w_h, d_b, dx rows or None): one [h, x, 1]^T dz matmul per block of rows.

  Blocks are chains (per-step path) or the whole batch (the C++ recurrence),
  their products summed in float32; lefts: each block's [h_{t-1}, x_t, 1]
  rows (`_left`; the C++ op writes them), in dz_rows's order. d_b rides as
  the column of ones (a reduce_sum over the rows took 5-11 ms per chain at
  H=512), d_w_x with d_w_h (its own M = V + 1 matmul ran at 80 GFLOP/s
  beside d_w_h's and slowed it; BUILD.md). Given d_w_x (the C++ backward's
  sums by id), lefts are [h_{t-1}, 1].
  """
  d = w_x.shape[0] if d_w_x is None else 0
  products = [tf.matmul(tf.reshape(left, [-1, left.shape[-1]]), dz, transpose_a=True)
              for left, dz in zip(lefts, dz_rows)]
  grads = tf.add_n([tf.cast(p, tf.float32) for p in products])
  hid = grads.shape[0] - d - 1
  dx = [tf.matmul(dz, w_x, transpose_b=True) for dz in dz_rows] if input_grad else None
  return (grads[hid:hid + d] if d_w_x is None else d_w_x), grads[:hid], grads[hid + d], dx


def lstm_sequence(x, h0, c0, kernel, recurrent_kernel, bias, input_grad=True, chains=1,
                  kernels='xla'):
  """Runs an LSTM over x with Keras's gate layout (i, f, g, o); a fused gradient.

  Args:
    x: (B, T, D) inputs, float32 or bfloat16. Their dtype is the matmuls'
      dtype: bfloat16 runs the matmuls, forward and backward, in bfloat16
      (AMX or AVX512-BF16, float32 accumulation), but for
      the first layer's input projection (input_grad=False); the gate
      math and the cell state c stay float32, so bfloat16 rounds the matmul
      operands and results (TensorFlow has no bfloat16 -> float32 CPU matmul;
      each chain's weight gradient is summed over the chains in float32).
    h0, c0: (B, H) initial state.
    kernel: (D, 4H); recurrent_kernel: (H, 4H); bias: (4H,): the float32
      variables' values (`_inner_loop` reads them past Keras's autocast); each
      is rounded to the matmul dtype here, where a matmul needs it, and only
      there.
    input_grad: False skips dL/dx: the first layer, whose inputs are data
      (one-hot chars). Its input projection x W_x then runs in float32 whatever
      x's dtype: one-hot rows are exact in any dtype, so this keeps W_x (and
      the bias) unrounded, which bfloat16 training needs to follow float32
      (300 steps at H=512: +0.034 nats with W_x and b rounded to bfloat16,
      +0.009 without; BUILD.md), for ~4% of the step's FLOPs.
    chains: the batch rows run as this many independent recurrences (equal
      row blocks, each its own matmul per step) in the same loop, so that the
      inter-op threads run them at once; it must divide B. The math per row
      is unchanged.
    kernels: the per-step gate kernels, 'xla' or 'cc' (the C++ op of
      pipeline.kernels.cell; not inside an XLA-compiled function, which
      cannot compile it). The same math either way.

  Returns:
    (outputs (B, T, H) in x's dtype, h_T (B, H) float32, c_T (B, H) float32).
  """
  if kernels == 'cc' and x.dtype in cell_kernels.sequence_dtypes() and (
      x.dtype == tf.float32 or recurrent_kernel.shape[0] % 2 == 0):  # bfloat16 pairs k
    return _whole_sequence(x, h0, c0, kernel, recurrent_kernel, bias, input_grad, chains)
  return _per_step(x, h0, c0, kernel, recurrent_kernel, bias, input_grad, chains, kernels)


def _per_step(x, h0, c0, kernel, recurrent_kernel, bias, input_grad, chains, kernels):
  """lstm_sequence as a tf.while_loop: per step, one matmul and one gate kernel per chain."""
  md = x.dtype  # the matmuls' dtype
  f32 = tf.float32
  k = chains
  cell_forward, cell_backward = _cell_kernels(kernels)

  @tf.custom_gradient
  def run(x, h0, c0, w_x, w_h, b):
    d, hid = x.shape[-1], w_h.shape[0]
    t_len = tf.shape(x)[1]
    xd = md if input_grad else f32  # the input projection's dtype (see input_grad)
    w_x_m, w_h_m = tf.cast(w_x, xd), tf.cast(w_h, md)
    h_init, c_init = tf.cast(h0, f32), tf.cast(c0, f32)
    # Chain j owns rows [j B/k, (j+1) B/k); each keeps its own arrays, and its
    # input projection is its own matmul, so no pass over (T, B, 4H) splits one.
    x_rows = [tf.reshape(p, [-1, d]) for p in tf.split(tf.transpose(x, [1, 0, 2]), k, axis=1)]
    projected = _project(x_rows, w_x_m, tf.cast(b, f32), input_grad)
    # Read per step as xz[j][t]: a slice along the first axis aliases the
    # array (TensorFlow's StridedSlice fast path), where TensorArray.unstack
    # copied every step's block up front (7 ms per chain per step, H=256).
    xz = [tf.reshape(p, [t_len, -1, 4 * hid]) for p in projected]
    h0_m = tf.cast(h0, md)

    def step(t, hs_m, cs, arrays):
      out_hm, out_c, out = [], [], []
      for j in range(k):
        h_m, c, z = cell_forward(xz[j][t], tf.matmul(hs_m[j], w_h_m), cs[j])
        zs, hs, cs_a = arrays[j]
        out_hm.append(h_m), out_c.append(c)
        out.append((zs.write(t, z), hs.write(t, h_m), cs_a.write(t, c)))
      return t + 1, out_hm, out_c, out

    # z and c are kept for the backward pass (gates are recomputed from z there).
    def new_arrays():
      return tuple(tf.TensorArray(dt, size=t_len, clear_after_read=False) for dt in (f32, md, f32))
    _, _, c_last, arrays = tf.while_loop(
        lambda t, *_: t < t_len, step,
        [tf.constant(0), tf.split(h0_m, k), tf.split(c_init, k),
         [new_arrays() for _ in range(k)]])
    c_t = tf.concat(c_last, 0)
    # h_T in float32, from the last step's output gate and c_T (T >= 1 here).
    o_last = _gates(tf.concat([zs.read(t_len - 1) for zs, _, _ in arrays], 0))[3]
    h_t = o_last * tf.tanh(c_t)
    h_stacks = [hs.stack() for _, hs, _ in arrays]  # each (T, B/k, H), matmul dtype
    h_all = tf.concat(h_stacks, 1)

    def grad(d_outputs, d_h_t, d_c_t):
      d_out = tf.split(tf.cast(tf.transpose(d_outputs, [1, 0, 2]), f32), k, axis=1)
      w_h_t = tf.transpose(w_h_m)
      c_init_parts = tf.split(c_init, k)

      def back(t, dh_ws, dc_nexts, c_s, dzs):
        out = ([], [], [], [])
        for j in range(k):
          zs, _, cs = arrays[j]
          c_prev = tf.cond(t > 0, lambda: cs.read(tf.maximum(t - 1, 0)),
                           lambda: c_init_parts[j])  # pylint: disable=cell-var-from-loop
          dz, dc = cell_backward(zs.read(t), c_s[j], c_prev, d_out[j][t],
                                  dh_ws[j], dc_nexts[j])
          for lst, v in zip(out, (tf.matmul(dz, w_h_t), dc, c_prev, dzs[j].write(t, dz))):
            lst.append(v)
        return (t - 1,) + out

      dh_last = tf.zeros_like(h0_m) if d_h_t is None else tf.cast(d_h_t, md)
      dc_last = tf.zeros_like(c_init) if d_c_t is None else tf.cast(d_c_t, f32)
      _, dh0, dc0, _, dzs = tf.while_loop(
          lambda t, *_: t >= 0, back,
          [t_len - 1, tf.split(dh_last, k), tf.split(dc_last, k), c_last,
           [tf.TensorArray(md, size=t_len) for _ in range(k)]])
      dh0, dc0 = tf.concat(dh0, 0), tf.concat(dc0, 0)
      # The weight gradients: one matmul per chain over its T * B/k rows.
      dz_rows = [tf.reshape(a.stack(), [-1, 4 * hid]) for a in dzs]
      lefts = [_left(tf.reshape(tf.concat([h[None], hs[:-1]], 0), [-1, hid]), x)
               for h, hs, x in zip(tf.split(h0_m, k), h_stacks, x_rows)]

      d_w_x, d_w_h, d_b, dx = _weight_grads(lefts, dz_rows, input_grad, w_x_m)
      if dx is not None:
        dx = tf.transpose(tf.concat([tf.reshape(p, [t_len, -1, d]) for p in dx], 1), [1, 0, 2])
      return (dx, tf.cast(dh0, h0.dtype), tf.cast(dc0, c0.dtype), tf.cast(d_w_x, w_x.dtype),
              tf.cast(d_w_h, w_h.dtype), tf.cast(d_b, b.dtype))

    return (tf.transpose(h_all, [1, 0, 2]), h_t, c_t), grad

  return run(x, h0, c0, kernel, recurrent_kernel, bias)


def _whole_sequence(x, h0, c0, kernel, recurrent_kernel, bias, input_grad, chains):
  """lstm_sequence with kernels='cc': the recurrence is one C++ op per pass.

  pipeline/kernels/sequence.cc runs the time loop, the recurrent matmuls and
  the gate math of every chain (one thread each), forward and backward; for
  the first layer it also reads W_x + b and sums d_W_x by input id. Left here:
  other layers' input projections and one weight-gradient matmul over all
  B T rows. bfloat16 products take bfloat16 h, dz and W_h and sum in float32.
  """
  ops = cell_kernels.load()
  md, f32 = x.dtype, tf.float32

  @tf.custom_gradient
  def run(x, h0, c0, w_x, w_h, b):
    # Batch-major throughout, as the layers around take and give it: the op
    # strides over (B, T, *) rows, so nothing is transposed.
    d, hid = x.shape[-1], w_h.shape[0]
    batch, t_len = tf.shape(x)[0], tf.shape(x)[1]
    w_x_m, w_h_m = tf.cast(w_x, md if input_grad else f32), tf.cast(w_h, md)
    x_rows = tf.reshape(x, [-1, d])
    h0_m, c_init = tf.cast(h0, md), tf.cast(c0, f32)

    def forward(xz, ids=()):
      # The op also writes the weight gradients' left operand [h_{t-1}, x_t, 1];
      # the first layer's, [h_{t-1}, 1]: its backward sums d_w_x by input id,
      # so that matmul narrows by V columns (H=512: 46.0 -> 40.2 ms alone).
      return ops.charlstm_sequence_forward(xz, w_h_m, h0_m, c_init,
                                           [x if input_grad else x[:, :, :0]], list(ids),
                                           chains=chains)

    def projected():
      return forward(tf.reshape(_project([x_rows], w_x_m, tf.cast(b, f32), True)[0],
                                [batch, t_len, 4 * hid]))
    if input_grad:
      hs, cs, zs, (left,) = projected()
    else:  # one-hot rows: the op reads row ids[b, t] of W_x + b (_project's gather) itself
      (ids,), one_hot = one_hot_ids([x_rows])
      ids = tf.reshape(ids, [batch, t_len])
      hs, cs, zs, (left,) = tf.cond(one_hot, lambda: forward(w_x_m + tf.cast(b, f32), [ids]),
                                    projected)
    # h_T in float32 (hs holds it rounded to bfloat16 there).
    h_t = hs[:, -1] if md == f32 else tf.sigmoid(zs[:, -1, 3 * hid:]) * tf.tanh(cs[:, -1])

    def grad(d_outputs, d_h_t, d_c_t):
      dh_last = tf.zeros_like(c_init) if d_h_t is None else tf.cast(d_h_t, f32)
      dc_last = tf.zeros_like(c_init) if d_c_t is None else tf.cast(d_c_t, f32)
      dzs, dh0, dc0, by_id = ops.charlstm_sequence_backward(
          zs, cs, tf.cast(d_outputs, f32), c_init, dh_last, dc_last, w_h_m,
          [] if input_grad else [ids], vocab=0 if input_grad else d, chains=chains)
      dz_rows = tf.reshape(dzs, [-1, 4 * hid])
      # Inputs that are not exactly one-hot (which _project multiplied) take the matmul.
      d_w_x = None if input_grad else tf.cond(
          one_hot, lambda: by_id[0],
          lambda: tf.matmul(tf.cast(x_rows, f32), tf.cast(dz_rows, f32), transpose_a=True))
      d_w_x, d_w_h, d_b, dx = _weight_grads([left], [dz_rows], input_grad, w_x_m, d_w_x)
      if dx is not None:
        dx = tf.reshape(dx[0], [batch, t_len, d])
      return (dx, tf.cast(dh0, h0.dtype), tf.cast(dc0, c0.dtype), tf.cast(d_w_x, w_x.dtype),
              tf.cast(d_w_h, w_h.dtype), tf.cast(d_b, b.dtype))

    return (hs, h_t, cs[:, -1]), grad

  return run(x, h0, c0, kernel, recurrent_kernel, bias)


def supported(lstm):
  """Whether `lstm` (a keras.layers.LSTM) computes exactly what lstm_sequence does."""
  cell = lstm.cell
  return (lstm.compute_dtype in ('float32', 'bfloat16') and cell.use_bias and not cell.dropout
          and not cell.recurrent_dropout and not lstm.go_backwards and not lstm.stateful
          and not lstm.unroll and lstm.return_sequences
          and cell.activation is keras.activations.tanh
          and cell.recurrent_activation is keras.activations.sigmoid)


def _stored_value(variable):
  """A Keras variable's float32 value, not the layer's autocast copy in its compute dtype."""
  # Keras has no public reader for this; AutocastScope(None) is the scope its
  # Layer.__call__ enters for a layer built with autocast=False.
  with AutocastScope(None):
    return variable.value


def _inner_loop(lstm, input_grad, chains, kernels, sequences, initial_state, mask, training=False):
  """Stands in for keras.layers.LSTM.inner_loop: (last output, outputs, [h, c])."""
  del training  # no dropout inside the recurrence (see `supported`)
  if mask is not None:
    raise ValueError('fused_lstm does not take masks; the train step has none.')
  cell = lstm.cell
  h, c = initial_state
  kernel, recurrent_kernel, bias = map(_stored_value, (
      cell.kernel, cell.recurrent_kernel, cell.bias))
  if sequences.shape[1] == 1:
    # One char (sampling): no loop, and plain TensorFlow ops, so that a
    # SavedModel holds no XLA kernel (TF Serving builds may lack XLA). The
    # dtypes follow lstm_sequence's (the first layer's projection in float32).
    md = sequences.dtype
    xd = md if input_grad else tf.float32
    z = (tf.cast(tf.matmul(tf.cast(sequences[:, 0], xd), tf.cast(kernel, xd)), tf.float32)
         + tf.cast(tf.matmul(tf.cast(h, md), tf.cast(recurrent_kernel, md)), tf.float32)
         + bias)
    h, c = lstm_cell(z, tf.cast(c, tf.float32))
    out = tf.cast(h, md)
    return out, out[:, None], [h, c]
  outputs, h, c = lstm_sequence(sequences, h, c, kernel, recurrent_kernel, bias,
                                input_grad=input_grad, kernels=kernels,
                                # An unknown batch size (no static shape) runs one chain.
                                chains=chains_for(sequences.shape[0], chains)
                                if sequences.shape[0] else 1)
  return outputs[:, -1], outputs, [h, c]


@contextlib.contextmanager
def swap_in(lstms, enabled=True, chains=1, kernels='xla'):
  """Within the block, the supported layers of `lstms` (in stack order) run lstm_sequence.

  chains: lstm_sequence's independent recurrences per layer (chains_for: 0
  picks one per CPU core). kernels: its gate kernels, 'xla' or 'cc'
  (cell_kernels.resolve picks; 'cc' only outside XLA-compiled functions).

  Use it around the model call that a tf.function traces; the traced graph
  keeps the fused op after the block ends. The first layer skips the input
  gradient (its inputs are one-hot data). A call with one time step (the
  sampler's step model) runs the cell once, without a loop.
  """
  swapped = [lstm for lstm in lstms if enabled and supported(lstm)]
  for lstm in swapped:
    # object.__setattr__: a plain instance attribute, not a Keras-tracked one.
    object.__setattr__(lstm, 'inner_loop', functools.partial(
        _inner_loop, lstm, lstm is not lstms[0], chains, kernels))
  try:
    yield len(swapped)
  finally:
    for lstm in swapped:
      object.__delattr__(lstm, 'inner_loop')
