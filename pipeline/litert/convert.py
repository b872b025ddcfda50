"""Converts trained weights to a LiteRT model.tflite: the one-character step, builtin ops only.

  python -m launch.export --workdir=/tmp/run1 --format=litert     # -> /tmp/run1/litert/

The graph is written here, from the weights, as one LSTM step per layer in
plain ops, the math of fused_lstm's one-char path (and so of the SavedModel's
`step` signature):

  z_0 = W_x[ids] + h_0 W_h + b          (layer 0: a one-hot input is a row gather)
  z_l = h_{l-1}' W_x + h_l W_h + b      (layers above: the new h of the layer below)
  i, f, g, o = split(z, 4)              (Keras's gate order)
  c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c')
  logits = h_top' W_d + b_d

as a float32 tf.function with fixed shapes: ids int32 [B], h and c float32
[B, L, H] in; logits [B, V], h, c out (B = --litert_batch, 1 by default). The
converter may use builtin ops only (TFLITE_BUILTINS, no SELECT_TF_OPS), so a
Flex op fails the conversion; the written flatbuffer's operator codes are read
back and checked too (`op_names`), and one step of the converted model is run
against the TensorFlow function before anything is written.

The weights come from a training workdir (`workdir.open_run`, any checkpoint,
rebuilt in float32) or from a SavedModel export (its variables and
assets/vocab.json, read as fine-tuning reads them).
"""

import os
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import storage
from pipeline import workdir as workdir_lib
from pipeline.litert import sampler

DEFAULT_DIR = 'litert'  # <workdir>/litert; <export>-litert for an export
_CUSTOM = 'CUSTOM'  # the operator code of custom ops, Flex (TF) ops among them


class Weights:
  """The model as numpy arrays: per LSTM layer (kernel, recurrent_kernel, bias); the dense."""

  def __init__(self, named, vocab, source):
    self.layers = []
    while f'lstm_{len(self.layers)}/lstm_cell/kernel' in named:
      pre = f'lstm_{len(self.layers)}/lstm_cell/'
      self.layers.append(tuple(np.asarray(named[pre + w], np.float32)
                               for w in ('kernel', 'recurrent_kernel', 'bias')))
    self.dense = (np.asarray(named[workdir_lib.OUTPUT_KERNEL], np.float32),
                  np.asarray(named[workdir_lib.OUTPUT_BIAS], np.float32))
    self.vocab = vocab
    self.source = source  # what the weights were read from, for messages

  @property
  def hidden(self):
    return self.layers[0][1].shape[0]


def _not_a_model(path, why):
  return sampler.LiteRTError(
      f'--workdir={path!r} is not a charlstm training workdir or SavedModel export ({why}). '
      'Pass the --workdir that launch.train wrote (config.json, checkpoints/) or its export/.')


def read_weights(path, checkpoint='latest'):
  """Weights of a workdir's checkpoint ('latest', 'best', a prefix) or of an export dir."""
  path = path.rstrip('/')
  if storage.exists(storage.join(path, 'saved_model.pb')):
    if checkpoint != 'latest':
      raise sampler.LiteRTError(
          f'{path} is a SavedModel export, which holds one set of weights; --checkpoint='
          f'{checkpoint} applies to a training workdir. Drop it, or pass the workdir.')
    try:
      src = workdir_lib.open_init(path)
    except workdir_lib.RunError as e:  # its message speaks of train.init_from: say why only
      raise _not_a_model(path, str(e).split('(', 1)[-1].split(')')[0]) from None
    except (tf.errors.OpError, ValueError) as e:  # a SavedModel without readable variables
      raise _not_a_model(path, storage.first_line(e)) from None
    return Weights(src.weights, src.vocab, f'export {path}')
  if not storage.exists(storage.join(path, workdir_lib.CONFIG_FILE)):
    raise _not_a_model(path, f'no {workdir_lib.CONFIG_FILE}, no saved_model.pb')
  run = workdir_lib.open_run(path, checkpoint, precision='float32')
  named = {w.path: w.numpy() for w in run.models.train.weights}
  return Weights(named, run.vocab, run.checkpoint)


def step_function(weights, batch=1):
  """A tf.Module whose `step` is the one-char step with fixed shapes; weights are constants."""
  layers = [tuple(tf.constant(w) for w in layer) for layer in weights.layers]
  w_d, b_d = (tf.constant(w) for w in weights.dense)
  num_layers, hidden = len(layers), weights.hidden
  state = tf.TensorSpec([batch, num_layers, hidden], tf.float32)

  @tf.function(input_signature=[tf.TensorSpec([batch], tf.int32, name='ids'), state, state])
  def step(ids, h, c):
    x, hs, cs = None, [], []
    for i, (w_x, w_h, b) in enumerate(layers):
      xz = tf.gather(w_x, ids) if i == 0 else tf.matmul(x, w_x)
      z = xz + tf.matmul(h[:, i], w_h) + b
      gi, gf, gg, go = tf.split(z, 4, axis=1)
      c_i = tf.sigmoid(gf) * c[:, i] + tf.sigmoid(gi) * tf.tanh(gg)
      x = tf.sigmoid(go) * tf.tanh(c_i)
      hs.append(x)
      cs.append(c_i)
    return {'logits': tf.matmul(x, w_d) + b_d, 'h': tf.stack(hs, axis=1),
            'c': tf.stack(cs, axis=1)}

  module = tf.Module()
  module.step = step  # the converter reads the signature (names) from a trackable
  return module


def to_tflite(module):
  """Converts `module.step` with builtin ops only (a Flex op fails here), float32."""
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.step.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  converter.optimizations = []
  return converter.convert()


def op_names(model_bytes):
  """The flatbuffer's operator codes: builtin names, or CUSTOM:<code> for a custom/Flex op."""
  sampler.interpreter_class()  # the schema below ships with ai-edge-litert
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
  model = schema.Model.GetRootAs(model_bytes, 0)
  out = []
  for i in range(model.OperatorCodesLength()):
    code = model.OperatorCodes(i)
    # Builtin codes past 127 live in BuiltinCode; DeprecatedBuiltinCode caps at 127.
    op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    name = names.get(op, f'BUILTIN_{op}')
    if name == _CUSTOM:
      custom = code.CustomCode()
      name = f'{_CUSTOM}:{custom.decode() if custom else ""}'
    out.append(name)
  return out


def check_builtin(model_bytes):
  """Raises if any operator is a custom or Flex op; returns the op names."""
  names = op_names(model_bytes)
  bad = [n for n in names if n.startswith(_CUSTOM) or 'Flex' in n]
  if bad:
    raise sampler.LiteRTError(f'The converted model has non-builtin ops {bad}; a LiteRT '
                              'runtime without the Flex delegate cannot run it.')
  return names


def check_against_tf(model_bytes, module, weights, batch):
  """One step from a random state: the interpreter's outputs match TensorFlow's to 1e-4."""
  rng = np.random.default_rng(0)
  model = sampler.Model(model_bytes)
  shape = (batch, len(weights.layers), weights.hidden)
  ids = rng.integers(0, weights.vocab.size, batch).astype(np.int32)
  h, c = (rng.standard_normal(shape).astype(np.float32) * 0.5 for _ in range(2))
  got = dict(zip(('logits', 'h', 'c'), model.step(ids, h, c)))
  want = module.step(ids=tf.constant(ids), h=tf.constant(h), c=tf.constant(c))
  for k, v in want.items():
    err = float(np.max(np.abs(got[k] - v.numpy())))
    if not err < 1e-4:
      raise sampler.LiteRTError(f'The converted model\'s {k} differ from TensorFlow\'s by {err}.')


def export_litert(path, checkpoint='latest', export_dir=None, batch=1):
  """Writes <export_dir>/model.tflite and vocab.json, replacing any old directory atomically.

  Args:
    path: a training workdir, or a SavedModel export directory.
    checkpoint: for a workdir, 'latest', 'best' or a checkpoint prefix.
    export_dir: default <workdir>/litert, or <export>-litert for an export.
    batch: the model's fixed batch size (rows per call).

  Returns:
    (export_dir, what the weights were read from, model.tflite size in bytes).
  """
  if batch < 1:
    raise sampler.LiteRTError(f'--litert_batch must be >= 1, got {batch}.')
  sampler.interpreter_class()  # fail before the slow part if ai-edge-litert is missing
  weights = read_weights(path, checkpoint)
  path = path.rstrip('/')
  if export_dir is None:
    export_dir = (f'{path}-{DEFAULT_DIR}' if weights.source.startswith('export ')
                  else storage.join(path, DEFAULT_DIR))
  module = step_function(weights, batch)
  model_bytes = to_tflite(module)
  check_builtin(model_bytes)
  check_against_tf(model_bytes, module, weights, batch)
  tmp_local = tempfile.mkdtemp(prefix='charlstm-litert-')
  try:
    with storage.new_dir(export_dir) as tmp_dir:
      vocab_path = os.path.join(tmp_local, sampler.VOCAB_FILE)
      weights.vocab.save(vocab_path)
      storage.write_bytes_atomic(storage.join(tmp_dir, sampler.MODEL_FILE), model_bytes)
      storage.copy(vocab_path, storage.join(tmp_dir, sampler.VOCAB_FILE))
  finally:
    storage.rmtree(tmp_local)
  logging.info('Wrote LiteRT model (%d bytes) to %s', len(model_bytes), export_dir)
  return export_dir, weights.source, len(model_bytes)

