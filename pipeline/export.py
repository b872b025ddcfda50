"""Export: a self-contained SavedModel that carries its vocabulary.

Signatures (all with explicit input signatures, so `saved_model_cli` and TF
Serving can call them):
  step(ids int32[B], h float32[B,L,H], c float32[B,L,H]) -> logits, probs, h, c
  generate(prompts string[B], num_chars int32, temperature float32,
           top_k int32, seed int64) -> text string[B]
  decode(prompts, num_chars, temperature, top_k, top_p float32, seed) -> text:
           generate with nucleus sampling; top_p=1 gives generate's text
  serving_default(prompts string[B]) -> text string[B]
  vocab() -> chars string[V]
  prime(prompts string[B]) -> h, c, logits float32[B,V]
  extend(h, c, logits, num_chars int32, temperature float32[B], top_k int32[B],
         seed int64[B], position int64[B], top_p float32[B])
         -> ids int32[B,n], text string[B], h, c, logits
`prime` and `extend` let a server stream and batch rows of different requests
(pipeline/serve): the state is carried between calls, and every row samples
from its own seed and position (generate.choose_rows), so a row's text does
not depend on its batch-mates or on chunk sizes.

`generate`, `decode` and `serving_default` sample the same way, row b with
seed generate.row_seeds(seed, B)[b], and run their loop as XLA programs of up
to 256 chars (generate.xla_extend): 5-6x the chars/s of the plain
TensorFlow loop at batch 1 (issue #14). So their text for a given seed is not
the one exports before issue #14 gave: the old batch-wide
stateless_categorical draw has no XLA kernel (and for B > 1 it depended on the
intra-op thread count), and XLA's matmuls round differently anyway. Greedy
text is unchanged up to float rounding; top_p=1 still gives exactly the text
of `generate`. XLA compiles once per process and batch size (about 1 s on a
2-core CPU); `step`, `prime` and `extend` stay plain TensorFlow ops, so the
server's first streamed event does not wait for a compile per batch shape.
The vocabulary is embedded as constants (no lookup-table resource) and also
shipped as `assets/vocab.json`.

Every export is a float32 graph with no cuDNN op, whatever precision and
device the model was trained with (`portable_copy`), so it runs on any CPU.
"""

import functools
import os
import tempfile

import tensorflow as tf
from absl import logging

from pipeline import errors
from pipeline import corpus
from pipeline import fused_lstm
from pipeline import generate as generate_lib
from pipeline import model as model_lib
from pipeline import storage
from pipeline import workdir as workdir_lib

SERVING_NUM_CHARS = 200  # serving_default continuation length
SERVING_TEMPERATURE = 0.8


class CharLSTMModule(tf.Module):
  """The exported module; holds the step model, its variables and the vocabulary."""

  def __init__(self, models, vocab, vocab_asset_path):
    super().__init__(name='charlstm')
    self._step_model = models.step
    # Not a tracked attribute: the layers are saved through the step model.
    self._one_step = lambda: fused_lstm.swap_in(models.lstms)
    # saved_model_cli / TF Serving restore variables by the objects tracked on
    # the module; the Keras wrappers alone leave them "Could not find variable".
    self.model_variables = models.variables
    self._num_layers = len(models.lstms)
    self._hidden = models.lstms[0].units
    self._v = vocab.size
    self._chars = tf.constant(list(vocab.chars), tf.string)
    self._codepoints = tf.constant([ord(ch) for ch in vocab.chars], tf.int32)
    # generate's loop as XLA chunks: one tf.function, so its compiled programs
    # are reused across calls (a partial: untracked, and autograph converts
    # the named function rather than re-parsing a lambda's source line).
    chunk = generate_lib.chunk_fn(generate_lib.weights_step(models.lstms, models.dense))
    self._xla_extend = functools.partial(generate_lib.xla_extend, chunk, self._chars)
    self.vocab_asset = tf.saved_model.Asset(vocab_asset_path)
    l, hd = self._num_layers, self._hidden
    state = tf.TensorSpec([None, l, hd], tf.float32)
    self.step = tf.function(self._step, input_signature=[
        tf.TensorSpec([None], tf.int32, name='ids'), state, state])
    self.generate = tf.function(self._generate, input_signature=[
        tf.TensorSpec([None], tf.string, name='prompts'),
        tf.TensorSpec([], tf.int32, name='num_chars'),
        tf.TensorSpec([], tf.float32, name='temperature'),
        tf.TensorSpec([], tf.int32, name='top_k'),
        tf.TensorSpec([], tf.int64, name='seed')])
    self.decode = tf.function(self._decode, input_signature=[
        tf.TensorSpec([None], tf.string, name='prompts'),
        tf.TensorSpec([], tf.int32, name='num_chars'),
        tf.TensorSpec([], tf.float32, name='temperature'),
        tf.TensorSpec([], tf.int32, name='top_k'),
        tf.TensorSpec([], tf.float32, name='top_p'),
        tf.TensorSpec([], tf.int64, name='seed')])
    self.serve = tf.function(self._serve, input_signature=[
        tf.TensorSpec([None], tf.string, name='prompts')])
    self.vocab = tf.function(self._vocab, input_signature=[])
    self.prime = tf.function(self._prime, input_signature=[
        tf.TensorSpec([None], tf.string, name='prompts')])
    rows = lambda dtype, name: tf.TensorSpec([None], dtype, name=name)
    self.extend = tf.function(self._extend, input_signature=[
        state, state, tf.TensorSpec([None, self._v], tf.float32, name='logits'),
        tf.TensorSpec([], tf.int32, name='num_chars'), rows(tf.float32, 'temperature'),
        rows(tf.int32, 'top_k'), rows(tf.int64, 'seed'), rows(tf.int64, 'position'),
        rows(tf.float32, 'top_p')])

  def _step_fn(self, one_hot, h, c):
    # One char per call: the LSTM layers run their cell once, without the
    # while loop Keras builds for a sequence of unknown length (1.5x faster
    # sampling at H=256; same weights and math).
    with self._one_step():
      logits, h, c = self._step_model([one_hot, h, c], training=False)
    return tf.cast(logits, tf.float32), h, c

  def _step(self, ids, h, c):
    logits, h, c = self._step_fn(tf.one_hot(ids[:, None], self._v), h, c)
    logits = logits[:, 0]
    return {'logits': logits, 'probs': tf.nn.softmax(logits), 'h': h, 'c': c}

  def _generate(self, prompts, num_chars, temperature, top_k, seed):
    tf.debugging.assert_non_negative(num_chars, 'num_chars must be >= 0')
    text = generate_lib.generate(
        self._step_fn, self._chars, self._codepoints, self._num_layers,
        self._hidden, prompts, num_chars, temperature, top_k, seed,
        extend_fn=self._xla_extend)
    return {'text': text}

  def _decode(self, prompts, num_chars, temperature, top_k, top_p, seed):
    tf.debugging.assert_non_negative(num_chars, 'num_chars must be >= 0')
    tf.debugging.assert_positive(top_p, 'top_p must be in (0, 1]')
    text = generate_lib.generate(
        self._step_fn, self._chars, self._codepoints, self._num_layers,
        self._hidden, prompts, num_chars, temperature, top_k, seed, top_p,
        extend_fn=self._xla_extend)
    return {'text': text}

  def _serve(self, prompts):
    # A fresh seed per request, different in every process and replica: a
    # generator saved in the model restores the same state at every load, so
    # every process replayed one sequence of texts. NonDeterministicInts (OS
    # entropy) still runs in a process that enabled op determinism, where
    # Timestamp and unseeded random ops fail; as a raw op it also traces in a
    # training process with determinism on, where the Python
    # Generator.from_non_deterministic_state refuses. Reproducible text is
    # what `generate`'s seed is for.
    seed = tf.raw_ops.NonDeterministicInts(shape=tf.constant([], tf.int32), dtype=tf.int64)
    return self._generate(prompts, tf.constant(SERVING_NUM_CHARS),
                          tf.constant(SERVING_TEMPERATURE), tf.constant(0), seed)

  def _vocab(self):
    return {'chars': self._chars}

  def _prime(self, prompts):
    h, c, logits = generate_lib.prime(self._step_fn, self._v, self._codepoints,
                                      self._num_layers, self._hidden, prompts)
    return {'h': h, 'c': c, 'logits': logits}

  def _extend(self, h, c, logits, num_chars, temperature, top_k, seed, position, top_p):
    tf.debugging.assert_non_negative(num_chars, 'num_chars must be >= 0')
    ids, text, h, c, logits = generate_lib.extend(
        self._step_fn, self._chars, h, c, logits, num_chars, temperature, top_k, seed,
        position, top_p)
    return {'ids': ids, 'text': text, 'h': h, 'c': c, 'logits': logits}


def portable_copy(models, vocab_size):
  """The same architecture and weights as float32 layers that never take cuDNN.

  A mixed-precision layer falls outside fused_lstm's one-char path (float32
  only), and Keras then emits CudnnRNNV3 whenever a GPU is visible: an op with
  no CPU kernel, so the export would not load on a CPU or in CPU TF Serving.
  Fresh variables also leave any TPU or distributed placement behind.
  """
  lstm = models.lstms[0]
  fresh = model_lib.build(vocab_size, lstm.units, len(models.lstms),
                          models.train.inputs[0].shape[1], precision='float32',
                          use_cudnn=False)
  trained = {w.path: w for w in models.train.weights}
  if sorted(trained) != sorted(w.path for w in fresh.train.weights):
    raise ValueError(f'Cannot copy weights {sorted(trained)} into a float32 model.')
  for w in fresh.train.weights:
    # Mixed-precision policies keep float32 variables; the cast covers others.
    w.assign(tf.cast(trained[w.path].value, tf.float32))
  return fresh


def export_models(models, vocab, export_dir, extra_assets=None):
  """Writes a SavedModel for `models` to `export_dir`, replacing any old one atomically.

  The export holds a float32, cuDNN-free copy of `models` (`portable_copy`).
  The model is written to a sibling temporary directory first, so a failure
  midway leaves the previous export untouched.
  """
  tmp_local = tempfile.mkdtemp(prefix='charlstm-vocab-')
  vocab_path = os.path.join(tmp_local, corpus.VOCAB_FILE)
  vocab.save(vocab_path)
  module = CharLSTMModule(portable_copy(models, vocab.size), vocab, vocab_path)
  try:
    with storage.new_dir(export_dir) as tmp_dir:
      tf.saved_model.save(
          module, tmp_dir,
          signatures={'serving_default': module.serve, 'step': module.step,
                      'generate': module.generate, 'vocab': module.vocab,
                      'prime': module.prime, 'extend': module.extend,
                      'decode': module.decode})
      for name, path in (extra_assets or {}).items():
        storage.copy(path, storage.join(tmp_dir, 'assets', name))
  finally:
    storage.rmtree(tmp_local)
  logging.info('Exported SavedModel to %s', export_dir)
  return export_dir


def export_checkpoint(workdir, checkpoint='latest', export_dir=None):
  """Rebuilds the model from a workdir's config and a checkpoint, and exports it.

  Args:
    workdir: a training workdir (holds config.json and vocab.json).
    checkpoint: 'latest', 'best', or a checkpoint path prefix.
    export_dir: defaults to <workdir>/export.

  Returns:
    (export_dir, checkpoint path used).
  """
  run = workdir_lib.open_run(workdir, checkpoint)
  export_dir = export_dir or workdir_lib.path(workdir, workdir_lib.EXPORT_DIR)
  export_models(run.models, run.vocab, export_dir, extra_assets={
      workdir_lib.CONFIG_FILE: workdir_lib.path(workdir, workdir_lib.CONFIG_FILE)})
  return export_dir, run.checkpoint
