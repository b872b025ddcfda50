"""In-graph text generation, shared by the exported SavedModel and training-time samples.

The whole loop runs inside TensorFlow (tf.range + TensorArray), so one call
generates a batch of texts with no per-character Python round-trip, which is
what made the seed post's `predict`-per-character sampler crawl. The export
runs the same loop as XLA programs (`xla_extend`, at the end).

Randomness is stateless and seeded by the caller: the same seed gives the same
text in any process. Temperature <= 0 is greedy decoding.

A server that batches rows of different requests, and streams them chunk by
chunk, needs a row's text not to depend on its batch-mates or on where chunks
end. `prime` and `extend` split generation at the state (h, c, logits), and
`choose_rows` samples each row from its own (seed, position) by Gumbel-max
over counter-based noise, so every character is a pure function of the row's
seed, its position and its state. `generate` is prime + extend, row b seeded
by `row_seeds(seed, B)[b]`. (Until issue #14 it drew one stateless_categorical
sample for the whole batch: that op has no XLA kernel for int64 seeds, and for
B > 1 its draws depended on the intra-op thread count.) Float rounding of the
matmuls can still differ between batch shapes, XLA and not.
"""

import functools

import tensorflow as tf

from pipeline import fused_lstm


def prompt_ids(vocab_codepoints, prompts):
  """Maps string prompts to ragged ids; fails clearly on characters outside the vocabulary.

  The vocabulary is a sorted constant of code points, so lookup is a
  searchsorted, with no hash-table resource for the SavedModel to carry.
  """
  cps = tf.strings.unicode_decode(prompts, 'UTF-8')
  flat = cps.flat_values
  v = tf.shape(vocab_codepoints, out_type=tf.int32)[0]
  pos = tf.searchsorted(vocab_codepoints, flat, side='left', out_type=tf.int32)
  pos = tf.minimum(pos, v - 1)
  known = tf.equal(tf.gather(vocab_codepoints, pos), flat)
  check = tf.debugging.Assert(
      tf.reduce_all(known),
      ['Prompt contains characters outside the model vocabulary (code points):',
       tf.boolean_mask(flat, tf.logical_not(known))], summarize=20)
  with tf.control_dependencies([check]):
    return cps.with_flat_values(tf.identity(pos))


def nucleus_keep(scaled, top_p):
  """bool [B, V]: the smallest set of likeliest ids whose probability reaches top_p.

  Nucleus (top-p) sampling, Holtzman et al. 2019, on the temperature-scaled
  and top-k-cut logits `scaled`; top_p is a scalar or float32 [B] in (0, 1].
  The likeliest id is always kept; ties are ranked lower id first, as in top-k.
  """
  v = tf.shape(scaled)[-1]
  order = tf.math.top_k(scaled, k=v).indices
  probs = tf.gather(tf.nn.softmax(tf.cast(scaled, tf.float64)), order, batch_dims=1)
  before = tf.math.cumsum(probs, axis=1, exclusive=True)  # mass of the likelier ids
  top_p = tf.cast(tf.reshape(top_p, [-1, 1]), tf.float64)
  kept_sorted = tf.logical_or(before < top_p, tf.range(v)[None, :] == 0)
  return tf.gather(kept_sorted, tf.argsort(order, axis=1, stable=True), batch_dims=1)


def prime(step_fn, vocab_size, vocab_codepoints, num_layers, hidden_size, prompts):
  """Feeds each prompt through the model; returns its state and next-char logits.

  Returns:
    (h, c, logits): float32 [B, L, H], [B, L, H], [B, V]. An empty prompt
    keeps the zero state and zero (uniform) logits.
  """
  v = vocab_size
  ids = prompt_ids(vocab_codepoints, prompts)
  lengths = tf.cast(ids.row_lengths(), tf.int32)
  b = tf.shape(prompts)[0]
  padded = ids.to_tensor(default_value=0, shape=[None, None])
  h = tf.zeros([b, num_layers, hidden_size])
  c = tf.zeros([b, num_layers, hidden_size])
  logits = tf.zeros([b, v])

  # Prompts have different lengths: feed them in lockstep and let a row's
  # state and logits advance only while it still has prompt characters.
  for t in tf.range(tf.shape(padded)[1]):
    out, h2, c2 = step_fn(tf.one_hot(padded[:, t][:, None], v), h, c)  # static length 1
    live = t < lengths
    h = tf.where(live[:, None, None], h2, h)
    c = tf.where(live[:, None, None], c2, c)
    logits = tf.where(live[:, None], out[:, 0], logits)
  return h, c, logits


def generate(step_fn, vocab_chars, vocab_codepoints, num_layers, hidden_size,
             prompts, num_chars, temperature, top_k, seed, top_p=None, extend_fn=None):
  """Continues each prompt by `num_chars` characters.

  Args:
    step_fn: (one_hot (B, 1, V), h, c) -> (logits (B, 1, V), h, c).
    vocab_chars: string[V] constant, id -> character.
    vocab_codepoints: int32[V] sorted constant, id -> code point.
    num_layers, hidden_size: state shape (B, L, H).
    prompts: string[B]. An empty prompt starts from zero state with uniform
      first-character logits (greedy then picks id 0).
    num_chars: int32 scalar, >= 0.
    temperature: float32 scalar; <= 0 means greedy.
    top_k: int32 scalar; <= 0 means no top-k filtering.
    seed: int64 scalar; row b samples with `row_seeds(seed, B)[b]`.
    top_p: float32 scalar in (0, 1] (nucleus sampling), or None: no cut.
      top_p=1 gives exactly the text of None.
    extend_fn: `extend`'s contract without step_fn and vocab_chars (the
      export passes `xla_extend`); default `extend`.

  Returns:
    string[B]: the continuations only (without the prompts).
  """
  b = tf.shape(prompts)[0]
  h, c, logits = prime(step_fn, tf.shape(vocab_chars)[0], vocab_codepoints, num_layers,
                       hidden_size, prompts)
  rows = lambda x, dtype: tf.fill([b], tf.cast(x, dtype))
  top_p = None if top_p is None else rows(top_p, tf.float32)
  if extend_fn is None:
    extend_fn = functools.partial(extend, step_fn, vocab_chars)
  _, text, _, _, _ = extend_fn(h, c, logits, num_chars, rows(temperature, tf.float32),
                               rows(top_k, tf.int32), row_seeds(seed, b),
                               tf.zeros([b], tf.int64), top_p)
  return text


# murmur3's 64-bit finaliser (fmix64): a bijection whose output bits each
# depend on every input bit. uint64 multiply, xor and shift wrap modulo 2^64
# in TensorFlow (checked against Python integers).
_FMIX_1 = 0xff51afd7ed558ccd
_FMIX_2 = 0xc4ceb9fe1a85ec53
_GOLDEN = 0x9e3779b97f4a7c15  # odd; keeps (seed, position, id) = 0 away from fmix64(0) = 0


def _fmix64(k):
  shift = tf.constant(33, tf.uint64)
  k = tf.bitwise.bitwise_xor(k, tf.bitwise.right_shift(k, shift))
  k = k * tf.constant(_FMIX_1, tf.uint64)
  k = tf.bitwise.bitwise_xor(k, tf.bitwise.right_shift(k, shift))
  k = k * tf.constant(_FMIX_2, tf.uint64)
  return tf.bitwise.bitwise_xor(k, tf.bitwise.right_shift(k, shift))


def row_uniform(seed, position, vocab_size):
  """Counter-based uniforms in (0, 1), float64 [B, V]: a hash of (seed, position, id).

  Args:
    seed: int64 [B], any value (bit-cast, so negative seeds are distinct).
    position: int64 [B], the index of the character being chosen.
    vocab_size: V.
  """
  golden = tf.constant(_GOLDEN, tf.uint64)
  s = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)
  p = tf.bitcast(tf.cast(position, tf.int64), tf.uint64)
  row = _fmix64(tf.bitwise.bitwise_xor(_fmix64(s + golden), p))
  ids = tf.cast(tf.range(vocab_size), tf.uint64) + tf.constant(1, tf.uint64)
  bits = _fmix64(row[:, None] + ids[None, :] * golden)
  # The top 53 bits, centred in their cell: never exactly 0 or 1, so the
  # Gumbel noise below is always finite.
  top = tf.cast(tf.bitwise.right_shift(bits, tf.constant(11, tf.uint64)), tf.float64)
  return (top + 0.5) * (2.0 ** -53)


def row_seeds(seed, batch):
  """int64 [batch]: one sampler seed per row, a hash of (seed, row).

  Distinct rows of one call never share a seed (fmix64 is a bijection), and
  a row's seed does not depend on the batch size.
  """
  s = _fmix64(tf.bitcast(tf.cast(seed, tf.int64), tf.uint64) + tf.constant(_GOLDEN, tf.uint64))
  rows = tf.cast(tf.range(batch), tf.uint64) + tf.constant(1, tf.uint64)
  return tf.bitcast(_fmix64(s + rows * tf.constant(_GOLDEN, tf.uint64)), tf.int64)


def any_cut(logits, top_k, top_p=None):
  """Whether some row's top_k or top_p cuts its choices (choose_rows' cut_any)."""
  v = tf.shape(logits)[-1]
  cut = tf.logical_and(top_k > 0, top_k < v)
  if top_p is not None:
    cut = tf.logical_or(cut, tf.logical_not(top_p >= 1.0))  # NaN cuts, as nucleus_keep does
  return tf.reduce_any(cut)


def gumbel_noise(seed, position, vocab_size):
  """float64 [B, V]: the Gumbel noise choose_rows adds, from `row_uniform`."""
  return -tf.math.log(-tf.math.log(row_uniform(seed, position, vocab_size)))


def choose_rows(logits, temperature, top_k, seed, position, top_p=None, cut_any=None,
                gumbel=None):
  """Picks next ids (B,) from float32 logits (B, V), each row with its own settings.

  Gumbel-max: argmax(logits / T + Gumbel noise) samples softmax(logits / T),
  and with counter-based noise (`row_uniform`) a row's choice depends only on
  its own logits, seed and position. Temperature <= 0 is greedy, top_k <= 0
  keeps every id, ties go to the lower id in greedy and in the top-k cut, so
  top_k=1 is exactly greedy; top_p=1 (or None) keeps every id, so it draws
  exactly what no nucleus draws.

  Args:
    logits: float32 [B, V].
    temperature: float32 [B].
    top_k: int32 [B].
    seed, position: int64 [B].
    top_p: float32 [B] in (0, 1] (1 keeps every id), or None.
    cut_any: None, or `any_cut(...)` as a Python bool when the caller has
      branched on it already (chunk_fn, outside its loop); None tests it here.
    gumbel: `gumbel_noise(seed, position, V)` when the caller has it.
  """
  v = tf.shape(logits)[-1]
  scaled = tf.cast(logits / tf.maximum(temperature, 1e-6)[:, None], tf.float64)

  def sorted_keep():
    # Ranked on the raw logits (dividing by a tiny temperature could tie
    # distinct values); tf.math.top_k lists equal values lower index first.
    order = tf.math.top_k(logits, k=v).indices
    rank = tf.argsort(order, axis=1, stable=True)
    k = tf.where(top_k <= 0, v, tf.minimum(top_k, v))
    keep = rank < k[:, None]
    if top_p is not None:  # the nucleus of what top-k kept
      kept = tf.where(keep, scaled, tf.constant(-float('inf'), tf.float64))
      keep = tf.logical_and(keep, tf.logical_or(top_p[:, None] >= 1.0,
                                                nucleus_keep(kept, top_p)))
    return keep

  # The common case (no row cuts) skips both sorts of V per row, the costliest
  # part of a step at batch 64.
  if cut_any is None:
    keep = tf.cond(any_cut(logits, top_k, top_p), sorted_keep,
                   lambda: tf.ones_like(logits, tf.bool))
  else:
    keep = sorted_keep() if cut_any else None
  if gumbel is None:
    gumbel = gumbel_noise(seed, position, v)
  sampled = scaled + gumbel
  if keep is not None:
    sampled = tf.where(keep, sampled, tf.constant(-float('inf'), tf.float64))
  # Greedy rows (temperature <= 0) take the argmax of their logits, the first
  # of equal values (the id top_k ranks first): one argmax for both kinds of
  # row, not two and a select per char.
  score = tf.where(temperature[:, None] > 0, sampled, tf.cast(logits, tf.float64))
  return tf.argmax(score, axis=1, output_type=tf.int32)


def extend(step_fn, vocab_chars, h, c, logits, num_chars, temperature, top_k, seed, position,
           top_p=None):
  """Continues a batch from its state by `num_chars` characters, row by row.

  Args:
    step_fn: as for `generate`.
    vocab_chars: string[V] constant.
    h, c, logits: the state from `prime` or a previous `extend`.
    num_chars: int32 scalar, >= 0.
    temperature, top_k, seed: per row, as for `choose_rows`.
    position: int64 [B], each row's count of characters generated so far
      (0 after `prime`); the next chunk starts there.

  Returns:
    (ids int32 [B, num_chars], text string [B], h, c, logits): the chunk and
    the state to continue from. Chunks of any sizes give the same text as one
    call.
  """
  v = tf.shape(vocab_chars)[0]
  b = tf.shape(h)[0]
  position = tf.cast(position, tf.int64)
  chosen = tf.TensorArray(tf.int32, size=num_chars + 1, element_shape=[None])
  chosen = chosen.write(0, tf.zeros([b], tf.int32))  # a dummy row, as in generate
  for i in tf.range(num_chars):
    nxt = choose_rows(logits, temperature, top_k, seed, position + tf.cast(i, tf.int64), top_p)
    chosen = chosen.write(i + 1, nxt)
    out, h, c = step_fn(tf.one_hot(nxt[:, None], v), h, c)
    logits = out[:, 0]
  ids = tf.reshape(tf.transpose(chosen.stack()[1:]), [b, num_chars])
  return ids, tf.strings.reduce_join(tf.gather(vocab_chars, ids), axis=1), h, c, logits


# The export's decode loop as XLA programs: chunks of up to CHUNK characters.
# `extend`'s TensorFlow while loop runs ~35 ops per character, and at batch 1
# their dispatch, not the arithmetic, set the speed (55-140 us per char at
# H=256). In one XLA program per chunk the step, choose_rows and the loop
# compile together, and the recurrent matvec runs about as fast as memory
# allows ([1, H] x [H, 4H]: 19 us at H=256 in XLA, 33 us in oneDNN outside).
# A chunk has a static size, so XLA compiles once per batch shape, not per
# length; it runs n <= CHUNK steps, so any length works and the state after
# a chunk is exact. String work (prompts, reduce_join) stays outside XLA.
# The step is written from the layer weights, not by calling the Keras step
# model: layer 0's input projection becomes a row gather instead of a one-hot
# matmul, and the Keras call measured 15-25% slower per step inside XLA
# (tests/generate_test.py checks the two agree).

CHUNK = 256  # chars per XLA call: per-call dispatch is then < 1% of a chunk
# Step matrices above this many bytes (a 2 MiB per-core L2) are multiplied
# transposed. Exported generate, H=512 (4 MiB): 1 prompt 12.8k -> 18.0k chars/s,
# 64 prompts 83.9k -> 88.1k. H=256 (1 MiB, in L2) transposed lost: 82.7k ->
# 74.9k and 269.9k -> 221.8k, so it keeps the (H, 4H) layout.
TRANSPOSE_BYTES = 2 ** 21


def weights_step(lstms, dense):
  """(ids int32 [B], h [B, L, H], c [B, L, H]) -> (logits [B, V], h, c) from the weights.

  The layers are float32 Keras LSTMs (tanh, sigmoid, bias, no recurrent
  dropout: what export.portable_copy builds) and the Dense logits layer.

  `step.read()` returns the weights as the step multiplies them, and
  `step(ids, h, c, weights)` uses them: chunk_fn reads them once per call,
  outside its loop. `step.advance(ids, h, c, weights) -> (h, c)` and
  `step.head(h, weights) -> logits` are its two halves, which chunk_fn
  places in different iterations. The (D, 4H) matrices that multiply a
  state row and are larger than TRANSPOSE_BYTES are read transposed,
  (4H, D): a step streams each of them whole, and beyond the L2 cache XLA's
  row-by-row product is the faster (see TRANSPOSE_BYTES).
  """
  cells = [lstm.cell for lstm in lstms]

  def oriented(w):  # (w, transposed?)
    big = w.shape.num_elements() * w.dtype.size > TRANSPOSE_BYTES
    return (tf.transpose(w), True) if big else (w, False)

  def read():
    # Layer 0's kernel is gathered by id, never multiplied.
    return [(oriented(cell.kernel.value) if i else (cell.kernel.value, False),
             oriented(cell.recurrent_kernel.value), cell.bias.value)
            for i, cell in enumerate(cells)], (dense.kernel.value, dense.bias.value)

  def advance(ids, h, c, weights):  # the LSTM layers only: (h, c)
    hs, cs, x = [], [], None
    for i, ((kernel, kernel_t), (recurrent, recurrent_t), bias) in enumerate(weights[0]):
      if i == 0:  # one-hot input: its product with the kernel is a row of it
        xz = tf.gather(kernel, ids)
      else:
        xz = tf.matmul(x, kernel, transpose_b=kernel_t)
      z = xz + tf.matmul(h[:, i], recurrent, transpose_b=recurrent_t) + bias
      x, c_i = fused_lstm.lstm_cell(z, c[:, i])
      hs.append(x)
      cs.append(c_i)
    return tf.stack(hs, axis=1), tf.stack(cs, axis=1)

  def head(h, weights):  # the Dense logits of the last layer's h
    dense_kernel, dense_bias = weights[1]
    return tf.matmul(h[:, -1], dense_kernel) + dense_bias

  def step(ids, h, c, weights=None):
    weights = weights or read()
    h, c = advance(ids, h, c, weights)
    return head(h, weights), h, c
  step.read, step.advance, step.head = read, advance, head
  return step


def chunk_fn(step, size=CHUNK):
  """The XLA-compiled chunk: n <= size steps of choose_rows then `step` (a weights_step).

  Returns (ids int32 [size, B], h, c, logits); ids past n are zeros.
  """

  @tf.function(jit_compile=True)
  def chunk(h, c, logits, n, temperature, top_k, seed, position, top_p):
    weights = step.read()  # once per call, not per char
    # The whole chunk's Gumbel noise, (size, B, V), before the loop: it hangs
    # on (seed, position, id) only. Per char, its hashes and float64 logs were
    # serial work between the recurrent products: H=512, one prompt, 105-117
    # -> 73-86 us per char (BUILD.md: the second core's wake-up).
    b, v = tf.shape(logits)[0], tf.shape(logits)[1]
    at = position[None, :] + tf.range(size, dtype=tf.int64)[:, None]
    noise = tf.reshape(gumbel_noise(tf.tile(seed, [size]), tf.reshape(at, [-1]), v),
                       [size, b, v])

    def loop(cut_any):
      # Each iteration starts with the head of the h it carries, so the head's
      # product and the next recurrent ones (they need h, not the chosen id)
      # share an iteration and may overlap: 1.04-1.10x carrying the logits
      # (H=512, one prompt, one process). Iteration 0 takes the logits given.
      def body(i, ids, h, c):
        now = tf.where(i > 0, step.head(h, weights), logits)
        nxt = choose_rows(now, temperature, top_k, seed, position + tf.cast(i, tf.int64),
                          top_p, cut_any, noise[i])
        h, c = step.advance(nxt, h, c, weights)
        return i + 1, ids.write(i, nxt), h, c

      # An explicit while_loop with the static bound: `for i in tf.range(n)`
      # sets maximum_iterations=n, which XLA takes as a compile-time constant,
      # so every new n (each length's last chunk) compiled again (0.6-0.7 s).
      _, ids, h_out, c_out = tf.while_loop(
          lambda i, *_: i < n, body, [0, tf.TensorArray(tf.int32, size=size), h, c],
          maximum_iterations=size)
      return ids.stack(), h_out, c_out, tf.where(n > 0, step.head(h_out, weights), logits)
    # Whether any row cuts (top_k, top_p) holds for the whole chunk: branching
    # once here, not per char, took 62.0 -> 54.9 us per char (H=512, 1 prompt).
    return tf.cond(any_cut(logits, top_k, top_p), lambda: loop(True), lambda: loop(False))
  return chunk


SPLIT_ROWS = 32  # batches of at least this many rows run as two XLA launches side by side


def xla_extend(chunk, vocab_chars, h, c, logits, num_chars, temperature, top_k, seed, position,
               top_p=None, size=CHUNK, split_rows=SPLIT_ROWS):
  """`extend`'s contract (same arguments after `chunk`, same results), in XLA chunks.

  chunk: from `chunk_fn(step, size)`, made once so that its compiled
  programs are reused from call to call.
  split_rows: a batch of at least this many rows runs each chunk as two
  launches over its two halves, which TensorFlow's inter-op threads run at
  once: one XLA program keeps a single core busy with its [B, H] x [H, 4H]
  products (XLA's CPU loops run on the calling thread), and rows are
  independent, so each half's characters are the ones the whole batch gives.
  0 never splits.
  """
  b = tf.shape(h)[0]
  position = tf.cast(position, tf.int64)
  chunks = (num_chars + size - 1) // size
  per_row = [temperature, top_k, seed]

  def halves_chunk(h, c, logits, n, position):
    half = b // 2
    sizes = tf.stack([half, b - half])
    parts = [tf.split(x, sizes) for x in [h, c, logits, position] + per_row
             + ([] if top_p is None else [top_p])]
    outs = []
    for j in range(2):
      hj, cj, lj, pj, tj, kj, sj = (p[j] for p in parts[:7])
      outs.append(chunk(hj, cj, lj, n, tj, kj, sj, pj, None if top_p is None else parts[7][j]))
    # ensure_shape: the split by a dynamic size loses a static batch size,
    # which the chunk loop needs to keep.
    return (tf.concat([outs[0][0], outs[1][0]], 1),) + tuple(
        tf.ensure_shape(tf.concat([outs[0][i], outs[1][i]], 0), like.shape)
        for i, like in ((1, h), (2, c), (3, logits)))

  def whole_chunk(h, c, logits, n, position):
    return chunk(h, c, logits, n, temperature, top_k, seed, position, top_p)

  # Slot 0 holds a dummy chunk so that stack() works for num_chars == 0.
  out = tf.TensorArray(tf.int32, size=chunks + 1, element_shape=[size, None])
  out = out.write(0, tf.zeros([size, b], tf.int32))
  for j in tf.range(chunks):
    n = tf.minimum(size, num_chars - j * size)
    pos = position + tf.cast(j * size, tf.int64)
    if split_rows:
      ids, h, c, logits = tf.cond(b >= split_rows, lambda: halves_chunk(h, c, logits, n, pos),
                                  lambda: whole_chunk(h, c, logits, n, pos))
    else:
      ids, h, c, logits = whole_chunk(h, c, logits, n, pos)
    out = out.write(j + 1, ids)
  ids = tf.reshape(out.stack()[1:], [-1, b])[:num_chars]
  ids = tf.reshape(tf.transpose(ids), [b, num_chars])
  return ids, tf.strings.reduce_join(tf.gather(vocab_chars, ids), axis=1), h, c, logits
