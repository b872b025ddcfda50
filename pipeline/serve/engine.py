"""The loaded export: `prime` and `extend` on numpy arrays, and what /v1/model reports.

The server holds one Engine, loaded once at start-up. It uses the SavedModel
alone (pipeline.sample's loader, no model code). Exports made before the
`prime` and `extend` signatures existed still sample with launch.sample; the
server refuses them at start-up with a one-line "re-export" error.
"""

import datetime
import json
import os

import numpy as np
import tensorflow as tf

from pipeline import errors
from pipeline import sample

STREAM_SIGNATURES = ('prime', 'extend', 'decode')  # decode: extend takes top_p


class ServeError(errors.Error):
  """The server cannot start as asked; the message says what to change."""


def _first_line(e):
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0]


def load(saved_model):
  """Loads the export once; a missing, broken or too old SavedModel is a ServeError."""
  try:
    module, chars = sample.load(saved_model)
  except errors.Error as e:
    raise ServeError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  # any corrupt file; one line, exit 2
    raise ServeError(f'Cannot load the SavedModel at {saved_model!r}: {_first_line(e)}. '
                     'Point --saved_model at a complete export (launch.export writes one).'
                     ) from None
  missing = [s for s in STREAM_SIGNATURES if s not in module.signatures]
  if missing:
    raise ServeError(
        f'The SavedModel at {saved_model!r} has no {"/".join(missing)} signature (it was '
        'exported before launch.serve and top_p existed); re-export with launch.export, e.g. '
        'python -m launch.export --workdir=WORKDIR --export_dir=NEW_DIR.')
  return module, chars


def _read_config(saved_model):
  path = os.path.join(saved_model, 'assets', 'config.json')
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


class Engine:
  """One SavedModel, called from the batcher's thread only."""

  def __init__(self, saved_model):
    self.saved_model = saved_model
    module, self.chars = load(saved_model)
    self._module = module  # keeps the signatures' variables alive
    self._prime = module.signatures['prime']
    self._extend = module.signatures['extend']
    h = module.signatures['step'].structured_input_signature[1]['h'].shape
    self.num_layers, self.hidden_size = int(h[1]), int(h[2])
    self.config = _read_config(saved_model)
    # The export's time is saved_model.pb's: export writes it once, into a
    # fresh directory that then replaces the old export whole.
    stat = tf.io.gfile.stat(os.path.join(saved_model, 'saved_model.pb'))
    self.exported_at = datetime.datetime.fromtimestamp(
        stat.mtime_nsec / 1e9, datetime.timezone.utc).isoformat(timespec='seconds')
    # The first call of each signature sets up its kernels (tens of ms):
    # pay it here, not in the first request's latency.
    h, c, logits = self.prime([''])
    self.extend(h, c, logits, 1, [0.8], [0], [0], [0], [1.0])

  def prime(self, prompts):
    """Prompts (NFC, in the vocabulary) -> (h, c, logits) as numpy arrays."""
    out = self._prime(prompts=tf.constant(prompts, tf.string))
    return out['h'].numpy(), out['c'].numpy(), out['logits'].numpy()

  def extend(self, h, c, logits, num_chars, temperature, top_k, seed, position, top_p):
    """Continues every row by num_chars; returns (texts, h, c, logits)."""
    out = self._extend(
        h=tf.constant(h), c=tf.constant(c), logits=tf.constant(logits),
        num_chars=tf.constant(num_chars, tf.int32),
        temperature=tf.constant(temperature, tf.float32),
        top_k=tf.constant(top_k, tf.int32), seed=tf.constant(seed, tf.int64),
        position=tf.constant(position, tf.int64), top_p=tf.constant(top_p, tf.float32))
    texts = [t.decode('utf-8') for t in out['text'].numpy()]
    return texts, out['h'].numpy(), out['c'].numpy(), out['logits'].numpy()

  def empty_state(self):
    """Zero rows of (h, c, logits), to concatenate new rows onto."""
    state = np.zeros([0, self.num_layers, self.hidden_size], np.float32)
    return state, state.copy(), np.zeros([0, len(self.chars)], np.float32)

  def info(self):
    return {
        'saved_model': self.saved_model,
        'exported_at': self.exported_at,
        'vocab': self.chars,
        'vocab_size': len(self.chars),
        'num_layers': self.num_layers,
        'hidden_size': self.hidden_size,
        'config': self.config,
    }
