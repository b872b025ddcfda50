"""tf.data pipelines: one-hot windows for training and validation.

Every batch is a pure function of (step, global row), so the input position
never needs checkpointing: a resumed run rebuilds the pipeline at the restored
step and sees exactly the batches an uninterrupted run would have seen. This
also makes sharding exact: each input pipeline computes only the rows of the
replicas it feeds, and every row of the global batch is fed once.

Two modes:
  shuffle: window w covers ids[w*T : w*T+T+1]; each epoch visits all windows
    in an order drawn statelessly with index_shuffle(seed, epoch).
  stream: the text is cut into B contiguous streams (char-rnn); row b of step
    k+1 continues row b of step k, so the train loop carries (h, c).

Each element is a dict, every shape fully static (a TPU compiles for one):
  inputs  uint8   (b, T, V) one-hot characters (bfloat16 for TPUs): one byte
          per vocabulary entry on the way to the device; the step casts it,
  targets int32   (b, T) next-character ids,
  rows    int32   (b,) global row ids (which slice of carried state to use),
  reset   float32 (b,) 1 where the row starts from zero state,
  step    int32   (b,) the global step (seeds dropout noise),
  weights float32 (b, T) validation layouts only (cover_all): 1 for the targets
          the pass scores; the last, partial windows and padding rows weigh 0.

Memory: only a batch is ever one-hot, and the ids are not copied to build the
pipeline. `_ids_tensor` hands the numpy array to TensorFlow through DLPack,
which shares the buffer (in TF 2.21, measured, tf.constant(ids) allocates two
copies of it, and TF's CPU allocator keeps one of them after the tensor is
gone), and tf.data's default graph rewrites are off: a rewrite serialises the
pipeline, copying the captured ids into a graph constant. One rewrite cannot be
turned off: with op determinism on (runtime.deterministic, the default) TF
applies `make_deterministic` whenever an iterator is made, so each iterator
holds one copy of its split. Reading the ids through a tf.Variable would avoid
that copy, but a variable read makes that rewrite run the whole pipeline
sequentially without prefetching, so the copy is kept (see BUILD.md, Memory).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from pipeline import errors


class DataError(errors.Error):
  """The data cannot be batched as configured; the message says how to fix it."""


# Tensors that TensorFlow takes over from numpy must be aligned like its own
# allocations (64 bytes); a misaligned DLPack import aborts the process.
_ALIGN = 64


def _ids_tensor(ids):
  """The ids as a CPU tensor that shares their memory when possible.

  Arrays from pipeline.corpus are page-aligned; any other array (a slice that
  starts mid-page, such as the validation split) is first copied once into
  aligned numpy memory. Falls back to tf.constant (a copy) if DLPack fails.
  """
  ids = np.ascontiguousarray(ids)
  if not ids.size:
    return tf.constant(ids)
  if ids.ctypes.data % _ALIGN or not ids.flags.writeable:
    buf = np.empty(ids.nbytes + _ALIGN, np.uint8)
    start = -buf.ctypes.data % _ALIGN
    aligned = buf[start:start + ids.nbytes].view(ids.dtype)
    aligned[:] = ids
    ids = aligned
  try:
    return tf.experimental.dlpack.from_dlpack(ids.__dlpack__())
  except (AttributeError, BufferError, TypeError, ValueError, tf.errors.OpError):
    return tf.constant(ids)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each (step, row) window starts, for one split and mode."""
  mode: str  # 'shuffle' or 'stream'
  length: int  # ids in the split
  seq_length: int
  global_batch: int
  steps_per_epoch: int
  num_windows: int = 0  # shuffle mode
  stream_length: int = 0  # stream mode
  cover_all: bool = False  # every target of the split once; batches carry 'weights'

  @property
  def num_targets(self):
    """Characters a pass over the layout scores (with cover_all: all but the first)."""
    if self.cover_all:
      return self.length - 1
    return self.steps_per_epoch * self.global_batch * self.seq_length


def _cover_all_layout(num_ids, t, global_batch, mode, split_name):
  """Validation: every character but the first is a target exactly once.

  shuffle: windows w = ids[w*T : w*T + T + 1] in order, zero state each; the
  last batch is padded with empty rows. stream: B streams of L = ceil((n-1)/B)
  targets each (the last one shorter), state carried; the last window of each
  stream is partial. Targets past a window's end weigh 0 in 'weights'.
  """
  targets = num_ids - 1
  if targets < 1:
    raise DataError(f'The {split_name} split ({num_ids} chars) has no character to predict.')
  if mode == 'shuffle':
    windows = -(-targets // t)
    return Layout(mode, num_ids, t, global_batch, -(-windows // global_batch),
                  num_windows=windows, cover_all=True)
  per_stream = -(-targets // global_batch)
  return Layout(mode, num_ids, t, global_batch, -(-per_stream // t),
                stream_length=per_stream, cover_all=True)


def make_layout(num_ids, seq_length, global_batch, mode, split_name='train', cover_all=False):
  """Computes the window layout and checks the split is long enough.

  cover_all: the layout validation uses (in training and launch.evaluate),
  which scores every character of the split instead of whole batches only.
  """
  t = seq_length
  if cover_all:
    return _cover_all_layout(num_ids, t, global_batch, mode, split_name)
  if mode == 'shuffle':
    windows = (num_ids - 1) // t
    steps = windows // global_batch
    if steps < 1:
      raise DataError(
          f'The {split_name} split ({num_ids} chars) holds {windows} windows of '
          f'{t} + 1 chars, fewer than one batch of {global_batch}. Lower the '
          'batch size or seq_length, or use a longer corpus.')
    return Layout(mode, num_ids, t, global_batch, steps, num_windows=windows)
  stream = num_ids // global_batch
  steps = (stream - 1) // t
  if steps < 1:
    raise DataError(
        f'The {split_name} split ({num_ids} chars) cut into {global_batch} '
        f'streams gives {stream} chars per stream, fewer than seq_length + 1 = '
        f'{t + 1}. Lower the batch size or seq_length, or use a longer corpus.')
  return Layout(mode, num_ids, t, global_batch, steps, stream_length=stream)


def _starts_and_reset(layout, step, rows, seed, reset_prob, shuffle):
  """Window starts (int64) and reset flags for global `rows` at `step`."""
  step = tf.cast(step, tf.int64)
  rows = tf.cast(rows, tf.int64)
  t = layout.seq_length
  if layout.mode == 'shuffle':
    k = step * layout.global_batch + rows
    epoch = k // layout.num_windows
    pos = k % layout.num_windows
    if shuffle:
      # The public index_shuffle wrapper mis-pads batched [n, 2] seeds in TF
      # 2.21; the raw op takes one [3] seed per element. Its third word must
      # not be 0: an all-zero key (seed 0, epoch 0) leaves most windows in place.
      seeds = tf.stack([tf.fill(tf.shape(k), tf.cast(seed, tf.int64)), epoch,
                        tf.fill(tf.shape(k), tf.constant(0x5EED, tf.int64))], 1)
      pos = tf.raw_ops.RandomIndexShuffle(
          index=pos, seed=seeds,
          max_index=tf.fill(tf.shape(k), tf.cast(layout.num_windows - 1, tf.int64)))
    return pos * t, tf.ones(tf.shape(rows), tf.float32)
  b = step % layout.steps_per_epoch
  starts = rows * layout.stream_length + b * t
  epoch_start = tf.cast(tf.equal(b, 0), tf.float32)
  if reset_prob > 0:
    # Drawn for the whole global batch and then gathered, so a row's reset does
    # not depend on how rows are sharded across replicas and workers.
    u = tf.random.stateless_uniform([layout.global_batch],
                                    seed=tf.stack([tf.cast(seed, tf.int64) + 1, step]))
    random_reset = tf.cast(tf.gather(u, rows) < reset_prob, tf.float32)
  else:
    random_reset = tf.zeros(tf.shape(rows), tf.float32)
  return starts, tf.maximum(random_reset, epoch_start)


def _cover_weights(layout, step, rows, positions):
  """float32 (b, T): 1 where the target at positions[:, 1:] belongs to this row's window."""
  last = tf.cast(layout.length - 1, tf.int64)  # the last id of the split
  if layout.mode == 'stream':
    # Row r's stream predicts ids r*L + 1 .. (r+1)*L.
    last = tf.minimum(last, (tf.cast(rows, tf.int64) + 1) * layout.stream_length)[:, None]
  else:
    window = tf.cast(step, tf.int64) * layout.global_batch + tf.cast(rows, tf.int64)
    last = tf.where(window < layout.num_windows, last, -1)[:, None]  # padding rows
  return tf.cast(positions[:, 1:] <= last, tf.float32)


def _element(window, vocab_size, step, rows, reset, input_dtype):
  """One per-replica batch (see the module docstring) from int32 windows of T + 1 ids."""
  return {
      'inputs': tf.one_hot(window[:, :-1], vocab_size, dtype=input_dtype),
      'targets': window[:, 1:],
      'rows': tf.cast(rows, tf.int32),
      'reset': reset,
      'step': tf.fill(tf.shape(rows), tf.cast(step, tf.int32)),
  }


def make_dataset(ids, vocab_size, layout, input_context=None, *, seed=0,
                 start_step=0, num_steps=None, reset_prob=0.0, shuffle=True,
                 streamed=False, input_dtype=tf.uint8):
  """Builds the dataset for one input pipeline.

  Args:
    ids: 1-D uint8/uint16 numpy ids of the split, or (streamed) a
      source.StreamedSplit.
    vocab_size: V, the one-hot depth.
    layout: from make_layout for this split.
    input_context: tf.distribute.InputContext, or None for a single pipeline
      feeding a single replica.
    seed: data seed.
    start_step: first global step to produce (resume).
    num_steps: last step (exclusive); None repeats forever.
    reset_prob: stream mode, chance of zeroing a row's state per window.
    shuffle: shuffle mode only; False visits windows in text order (eval).
    streamed: ids is read from TFDS shards (corpus.Corpus.streamed).
    input_dtype: of the one-hot inputs; uint8, or bfloat16 for TPUs
      (steps.input_dtype). Either way 0 and 1 are exact.

  Returns:
    A tf.data.Dataset of per-replica batches (see module docstring).
  """
  if input_context is None:
    input_context = tf.distribute.InputContext()
  replicas = input_context.num_replicas_in_sync
  pipelines = input_context.num_input_pipelines
  if layout.global_batch % replicas:
    raise DataError(
        f'Global batch {layout.global_batch} does not divide across '
        f'{replicas} replicas. Use a multiple of {replicas}, e.g. '
        f'--config.data.batch_size={max(replicas, layout.global_batch // replicas * replicas)}.')
  per_replica = layout.global_batch // replicas
  local = replicas // pipelines
  first_replica = input_context.input_pipeline_id * local

  t = layout.seq_length
  if streamed:
    return _streamed_dataset(ids, vocab_size, layout, first_replica, local, per_replica,
                             seed=seed, start_step=start_step, num_steps=num_steps,
                             reset_prob=reset_prob, input_dtype=input_dtype)
  ids_t = _ids_tensor(ids)  # captured by to_batch: shared with numpy, not copied

  def to_batch(flat):
    # flat = element * per_replica + i, counted from step 0 (the range starts
    # at start_step); element e is step e // local for local replica e % local.
    element = flat // per_replica
    step = element[0] // local
    replica = first_replica + element[0] % local
    rows = replica * per_replica + tf.range(per_replica, dtype=tf.int64)
    starts, reset = _starts_and_reset(layout, step, rows, seed, reset_prob, shuffle)
    positions = starts[:, None] + tf.range(t + 1, dtype=tf.int64)
    if layout.cover_all:  # partial windows: gather in range, weigh what is past the end 0
      weights = _cover_weights(layout, step, rows, positions)
      positions = tf.minimum(positions, layout.length - 1)
    window = tf.gather(ids_t, positions)
    element = _element(tf.cast(window, tf.int32), vocab_size, step, rows, reset, input_dtype)
    if layout.cover_all:
      element['weights'] = weights
    return element

  if num_steps is None:
    flat = tf.data.Dataset.range(start_step * local * per_replica, np.iinfo(np.int64).max)
  else:
    flat = tf.data.Dataset.range(start_step * local * per_replica,
                                 num_steps * local * per_replica)
  ds = flat.batch(per_replica, drop_remainder=True)
  ds = ds.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  # tf.data's default rewrites (fusions, injected prefetch, ...) serialise the
  # pipeline, which copies the captured ids into a graph constant: one more copy
  # of the split in memory, for rewrites that this range -> batch -> parallel
  # map -> prefetch pipeline does not need. (make_deterministic still runs
  # under op determinism; see the module docstring.)
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  return ds.with_options(options)


def _row_windows(chars, t):
  """Windows of t + 1 ids at 0, t, 2t, ... of the id vectors `chars` (a dataset)."""
  chunks = chars.rebatch(t)  # [t], [t], ..., [1]

  def pair(state, chunk):
    prev, ready = state
    # Window k is chunk k and the first id of chunk k + 1 (the last target).
    # Static [t + 1]: the concat alone has an unknown length, which a TPU rejects.
    window = tf.ensure_shape(tf.concat([prev, chunk[:1]], 0), [t + 1])
    chunk = tf.pad(chunk, [[0, t - tf.shape(chunk)[0]]])
    return (tf.ensure_shape(chunk, [t]), True), (window, ready)

  windows = chunks.scan((tf.zeros([t], tf.int32), False), pair)
  return windows.filter(lambda w, ready: ready).map(lambda w, ready: w)


def _streamed_dataset(source, vocab_size, layout, first_replica, local, per_replica, *,
                      seed, start_step, num_steps, reset_prob, input_dtype):
  """Stream mode read from TFDS shards (data.tfds_streaming): the same batches as
  make_dataset on the loaded ids, without the text in memory.

  Row r is stream r, one sequential reader over the split's chars
  [r * L, r * L + steps_per_epoch * T + 1); the rows this pipeline feeds are
  interleaved one window at a time, so consecutive `per_replica` windows form
  one replica's batch. Resuming at start_step opens each reader where its
  stream is at that step, so nothing before it is decoded.
  """
  t, length, spe = layout.seq_length, layout.stream_length, layout.steps_per_epoch
  k0 = start_step % spe
  n = layout.length
  if layout.cover_all and start_step:
    raise DataError('A whole-split (validation) layout is read from its first step.')

  def row(r):
    base = r * length
    end = base + spe * t + 1
    if layout.cover_all:  # validation: one pass, the stream's tail padded to whole windows
      lo, hi = tf.minimum(base, n - 1), tf.minimum(end, n)
      pad = tf.data.Dataset.from_tensors(tf.zeros([end - base - (hi - lo)], tf.int32))
      return _row_windows(source.chars(lo, hi).concatenate(pad), t)
    rest = _row_windows(source.chars(base + k0 * t, end), t)
    return rest.concatenate(_row_windows(source.chars(base, end), t).repeat())

  rows = tf.data.Dataset.range(first_replica * per_replica,
                               (first_replica + local) * per_replica)
  ds = rows.interleave(row, cycle_length=local * per_replica, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  if num_steps is not None:
    ds = ds.take((num_steps - start_step) * local)

  def to_batch(j, window):
    step = start_step + j // local
    replica = first_replica + j % local
    rows = replica * per_replica + tf.range(per_replica, dtype=tf.int64)
    starts, reset = _starts_and_reset(layout, step, rows, seed, reset_prob, False)
    element = _element(window, vocab_size, step, rows, reset, input_dtype)
    if layout.cover_all:
      positions = starts[:, None] + tf.range(t + 1, dtype=tf.int64)
      element['weights'] = _cover_weights(layout, step, rows, positions)
    return element

  ds = ds.enumerate().map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)
