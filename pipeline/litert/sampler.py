"""The reference sampler for a LiteRT export: model.tflite + vocab.json, numpy on the host.

This is what a phone app does with the export, in Python: keep (h, c) on the
host, feed one character id per call to the interpreter, and pick the next id
from the logits. It imports only numpy, ai_edge_litert and the standard
library (no TensorFlow, no training code).

Conventions are pipeline.generate's:
  - an empty prompt starts from the zero state with uniform (zero) logits, so
    greedy decoding picks id 0 first;
  - temperature <= 0 is greedy; top_k <= 0 keeps every id;
  - ties go to the lower id, in greedy and in the top-k cut (top_k=1 is greedy).
Greedy text equals the SavedModel's `generate` at temperature 0. Sampled text
(temperature > 0) comes from numpy's generator seeded with `seed`: the same
seed gives the same text here, but not the SavedModel's text (its stateless
TensorFlow sampler draws other random numbers from the same distribution).

The model's batch is fixed at conversion (launch.export --litert_batch, 1 by
default); prompts run in groups of that many rows, fed in lockstep, a row's
state advancing only while it still has prompt characters (as `prime` does).
"""

import json
import os
import time
import unicodedata

import numpy as np

from pipeline import errors

MODEL_FILE = 'model.tflite'
VOCAB_FILE = 'vocab.json'
INSTALL_HINT = ('ai-edge-litert is not installed; LiteRT export and sampling need it: '
                '`pip install -e .[litert]`')


class LiteRTError(errors.Error):
  """A LiteRT export or sampling cannot run as asked; the message says what to change."""


def interpreter_class():
  """ai_edge_litert's Interpreter, or a one-line error saying how to install it."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise LiteRTError(INSTALL_HINT) from None
  return Interpreter


class Model:
  """A loaded model.tflite: one step at a time, the (h, c) state handed in and out.

  Args:
    model: the model's bytes (the flatbuffer), or a path to model.tflite.
    num_threads: interpreter threads; None = the interpreter's default.
  """

  def __init__(self, model, num_threads=None):
    interpreter_cls = interpreter_class()
    kwargs = {'model_content': model} if isinstance(model, bytes) else {'model_path': model}
    if num_threads:
      kwargs['num_threads'] = num_threads
    self.interpreter = interpreter_cls(**kwargs)
    self.interpreter.allocate_tensors()
    runner = self.interpreter.get_signature_runner()
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    if set(inputs) != {'ids', 'h', 'c'} or set(outputs) != {'logits', 'h', 'c'}:
      raise LiteRTError(f'{model if isinstance(model, str) else "the model"} is not a charlstm '
                        f'step (inputs {sorted(inputs)}, outputs {sorted(outputs)}; expected '
                        'ids, h, c -> logits, h, c).')
    # Tensor indices from the signature: set_tensor / invoke / get_tensor per
    # step, without the signature runner's per-call dict building.
    self._in = {k: d['index'] for k, d in inputs.items()}
    self._out = {k: d['index'] for k, d in outputs.items()}
    self.batch, self.num_layers, self.hidden = (int(n) for n in inputs['h']['shape'])
    self.vocab_size = int(outputs['logits']['shape'][-1])

  def zero_state(self):
    shape = (self.batch, self.num_layers, self.hidden)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

  def step(self, ids, h, c):
    """ids int32 [B], h, c float32 [B, L, H] -> (logits [B, V], h, c), all numpy copies."""
    it = self.interpreter
    it.set_tensor(self._in['ids'], np.asarray(ids, np.int32))
    it.set_tensor(self._in['h'], h)
    it.set_tensor(self._in['c'], c)
    it.invoke()
    return (it.get_tensor(self._out['logits']), it.get_tensor(self._out['h']),
            it.get_tensor(self._out['c']))


def load_vocab(path):
  with open(path, encoding='utf-8') as f:
    return tuple(json.load(f)['chars'])


def load(model_dir, num_threads=None):
  """(Model, vocabulary chars) from a directory written by `launch.export --format=litert`."""
  interpreter_class()  # a missing ai-edge-litert first: the files are no use without it
  model_path = os.path.join(model_dir, MODEL_FILE)
  vocab_path = os.path.join(model_dir, VOCAB_FILE)
  for p in (model_path, vocab_path):
    if not os.path.isfile(p):
      raise LiteRTError(f'No {os.path.basename(p)} in {model_dir!r}: pass a directory written by '
                        '`python -m launch.export --format=litert` (model.tflite, vocab.json).')
  model = Model(model_path, num_threads)
  chars = load_vocab(vocab_path)
  if len(chars) != model.vocab_size:
    raise LiteRTError(f'{vocab_path} has {len(chars)} characters but {model_path} predicts '
                      f'{model.vocab_size}: the two files are from different exports.')
  return model, chars


def prompt_ids(prompts, chars):
  """NFC-normalised prompts as id lists; an unknown character is an error that names it."""
  index = {ch: i for i, ch in enumerate(chars)}
  out = []
  for p in prompts:
    p = unicodedata.normalize('NFC', p)
    bad = sorted(set(p) - set(index))
    if bad:
      raise LiteRTError(f'Prompt {p!r} has characters the model never saw: {"".join(bad)!r}. '
                        f'Remove them (the vocabulary has {len(chars)} characters).')
    out.append([index[ch] for ch in p])
  return out


def choose(logits, temperature, top_k, rng):
  """The next id from one row of float32 logits [V], by generate.choose_rows' conventions."""
  if temperature <= 0:
    return int(np.argmax(logits))  # the first maximum: ties go to the lower id
  scaled = logits.astype(np.float64) / max(temperature, 1e-6)
  if 0 < top_k < len(logits):
    # A stable sort of -logits lists equal values lower id first, so the cut
    # at k keeps the lower ids of a tie (as tf.math.top_k does).
    cut = np.argsort(-logits, kind='stable')[top_k:]
    scaled[cut] = -np.inf
  p = np.exp(scaled - scaled.max())
  return int(rng.choice(len(p), p=p / p.sum()))


def generate(model, chars, prompts, length, temperature=0.0, top_k=0, seed=0):
  """Continues each prompt by `length` characters; returns the continuations only."""
  if length < 0:
    raise LiteRTError(f'--length must be >= 0, got {length}.')
  ids = prompt_ids(prompts, chars)
  rng = np.random.default_rng(seed)
  texts = []
  for start in range(0, len(ids), model.batch):
    group = ids[start:start + model.batch]
    rows = len(group)
    h, c = model.zero_state()
    logits = np.zeros((model.batch, model.vocab_size), np.float32)
    # Feed the prompts in lockstep; a row keeps its state once its prompt ends.
    for t in range(max([len(g) for g in group] + [0])):
      step = np.array([g[t] if t < len(g) else 0 for g in group] + [0] * (model.batch - rows),
                      np.int32)
      out, h2, c2 = model.step(step, h, c)
      live = np.array([t < len(g) for g in group] + [False] * (model.batch - rows))
      h = np.where(live[:, None, None], h2, h)
      c = np.where(live[:, None, None], c2, c)
      logits = np.where(live[:, None], out, logits)
    picked = [[] for _ in range(rows)]
    for _ in range(length):
      step = np.zeros(model.batch, np.int32)
      for r in range(rows):
        step[r] = choose(logits[r], temperature, top_k, rng)
        picked[r].append(chars[step[r]])
      logits, h, c = model.step(step, h, c)
    texts += [''.join(p) for p in picked]
  return texts


def sample(model_dir, prompts, length, temperature=0.0, top_k=0, seed=0, num_threads=None):
  """Loads an export and generates; returns (continuations, chars generated per second)."""
  model, chars = load(model_dir, num_threads)
  prompts = list(prompts) or ['']
  start = time.perf_counter()
  texts = generate(model, chars, prompts, length, temperature, top_k, seed)
  seconds = time.perf_counter() - start
  return texts, (length * len(prompts) / seconds if seconds > 0 else 0.0)
