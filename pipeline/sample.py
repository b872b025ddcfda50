"""The sampler job: generate text from an exported SavedModel.

This module depends on TensorFlow and the SavedModel only; it never imports
the pipeline's model code, so an export can be sampled on a machine (or in a
server) that has no copy of the training code.

Prompt characters outside the model's vocabulary are an error (not silently
dropped): the message lists them, because a dropped character changes what
the model is conditioned on without the user knowing.
"""

import os
import unicodedata

import tensorflow as tf

from pipeline import errors
from pipeline import storage


class SampleError(errors.Error):
  """Sampling cannot run as asked; the message says what to change."""


def load(saved_model):
  """Loads a charlstm SavedModel; returns (module, vocab chars)."""
  storage.check_gcs_path(saved_model)  # gs:// without credentials: one line, not a long wait
  if not tf.io.gfile.exists(os.path.join(saved_model, 'saved_model.pb')):
    raise SampleError(
        f'No SavedModel at {saved_model!r} (no saved_model.pb). Pass the export '
        'directory written by launch.train or launch.export, e.g. '
        '--saved_model=/tmp/run1/export.')
  module = tf.saved_model.load(saved_model)
  chars = [c.decode('utf-8') for c in module.vocab()['chars'].numpy()]
  return module, chars


def check_prompts(prompts, chars):
  """NFC-normalises prompts (as training text was) and rejects unknown characters."""
  known = set(chars)
  out = []
  for p in prompts:
    p = unicodedata.normalize('NFC', p)
    bad = sorted(set(p) - known)
    if bad:
      raise SampleError(
          f'Prompt {p!r} has characters the model never saw: '
          f'{"".join(bad)!r}. Remove them (the vocabulary has {len(chars)} '
          'characters; see the export\'s assets/vocab.json).')
    out.append(p)
  return out


def sample(saved_model, prompts, length, temperature=0.8, top_k=0, seed=0,
           num_samples=1):
  """Generates `num_samples` continuations of each prompt in one batched call.

  Returns:
    A list of (prompt, continuation) pairs, prompt-major.
  """
  if length < 0:
    raise SampleError(f'--length must be >= 0, got {length}.')
  if num_samples < 1:
    raise SampleError(f'--num_samples must be >= 1, got {num_samples}.')
  module, chars = load(saved_model)
  prompts = check_prompts(prompts or [''], chars)
  batch = [p for p in prompts for _ in range(num_samples)]
  out = module.generate(
      prompts=tf.constant(batch, tf.string), num_chars=tf.constant(length, tf.int32),
      temperature=tf.constant(temperature, tf.float32),
      top_k=tf.constant(top_k, tf.int32), seed=tf.constant(seed, tf.int64))
  return [(p, t.decode('utf-8')) for p, t in zip(batch, out['text'].numpy())]
