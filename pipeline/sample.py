"""The sampler job: generate text from an exported SavedModel.

This module depends on TensorFlow and the SavedModel only; it never imports
the pipeline's model code, so an export can be sampled on a machine (or in a
server) that has no copy of the training code.

Prompt characters outside the model's vocabulary are an error (not silently
dropped): the message lists them, because a dropped character changes what
the model is conditioned on without the user knowing.

TensorFlow is imported inside `load` and `sample` only: launch.sample checks
its flags (`check_request`) before TensorFlow's ~3.5 s import, so a mistyped
flag is refused at once.
"""

import os
import unicodedata

from pipeline import errors


class SampleError(errors.Error):
  """Sampling cannot run as asked; the message says what to change."""


def load(saved_model):
  """Loads a charlstm SavedModel; returns (module, vocab chars)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipeline import storage  # pylint: disable=g-import-not-at-top  # imports TensorFlow
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


def check_decoding(top_p, stop, flag='--'):
  """Refuses a top_p outside (0, 1] and empty stop strings; returns stop as a tuple."""
  if not 0.0 < top_p <= 1.0:
    raise SampleError(f'{flag}top_p must be in (0, 1] (1 keeps every character), got {top_p}.')
  stop = tuple(stop or ())
  if any(not s for s in stop):
    raise SampleError(f'{flag}stop strings must not be empty (an empty string would stop '
                      'every text at once).')
  return tuple(unicodedata.normalize('NFC', s) for s in stop)


class StopFilter:
  """Cuts a text that arrives in pieces at its first stop string, which is not returned.

  `feed` returns what can be shown now: text that may still be the start of
  a stop string is held back until the next piece decides it.
  """

  def __init__(self, stop):
    self.stop = tuple(stop)
    self.held = ''
    self.stopped = False

  def feed(self, piece):
    if self.stopped:
      return ''
    text = self.held + piece
    # The stop string that is complete first ends the text, as it would while
    # generating: a longer one that started earlier is not complete yet.
    found = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stop) if i >= 0]
    if found:
      self.stopped, self.held = True, ''
      return text[:min(found)[1]]
    hold = max([n for s in self.stop for n in range(1, len(s))
                if text.endswith(s[:n])], default=0)
    self.held = text[len(text) - hold:] if hold else ''
    return text[:len(text) - hold]

  def finish(self):
    """What is held back once no more text comes."""
    rest, self.held = ('' if self.stopped else self.held), ''
    return rest


def check_request(length, num_samples=1, top_p=1.0, stop=()):
  """Refuses a negative length, no samples, a bad top_p or empty stop strings; returns stop."""
  if length < 0:
    raise SampleError(f'--length must be >= 0, got {length}.')
  if num_samples < 1:
    raise SampleError(f'--num_samples must be >= 1, got {num_samples}.')
  return check_decoding(top_p, stop)


def read_prompt_file(path):
  """The non-blank lines of a text file (local or gs://; pipeline.text's rules), one prompt each."""
  from pipeline import storage  # pylint: disable=g-import-not-at-top  # imports TensorFlow
  from pipeline import text as text_lib  # pylint: disable=g-import-not-at-top
  if not storage.exists(path):
    raise SampleError(f'--prompt_file={path!r} does not exist. Pass a UTF-8 text file with '
                      'one prompt per line, or give prompts with --prompt.')
  try:
    text = text_lib.read_text(path)
  except text_lib.CorpusError as e:
    raise SampleError(text_lib.flag_message(str(e), '--prompt_file', 'Pass UTF-8 text only.')) from None
  return [line.rstrip('\r') for line in text.split('\n') if line.strip()]


def sample(saved_model, prompts, length, temperature=0.8, top_k=0, seed=0,
           num_samples=1, top_p=1.0, stop=()):
  """Generates `num_samples` continuations of each prompt in one batched call.

  top_p < 1 samples from the nucleus (the export's `decode`); each text ends
  before its first stop string. top_p=1 and no stop strings give `generate`'s
  text, the same as before either existed.

  Returns:
    A list of (prompt, continuation) pairs, prompt-major.
  """
  stop = check_request(length, num_samples, top_p, stop)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  module, chars = load(saved_model)
  prompts = check_prompts(prompts or [''], chars)
  batch = [p for p in prompts for _ in range(num_samples)]
  args = dict(prompts=tf.constant(batch, tf.string), num_chars=tf.constant(length, tf.int32),
              temperature=tf.constant(temperature, tf.float32),
              top_k=tf.constant(top_k, tf.int32), seed=tf.constant(seed, tf.int64))
  if top_p < 1.0:
    if not hasattr(module, 'decode'):
      raise SampleError(f'The SavedModel at {saved_model!r} predates top_p; re-export it '
                        '(python -m launch.export --workdir=WORKDIR), or drop --top_p.')
    out = module.decode(top_p=tf.constant(top_p, tf.float32), **args)
  else:  # exports made before top_p existed sample this way too
    out = module.generate(**args)
  texts = [t.decode('utf-8') for t in out['text'].numpy()]
  if stop:
    texts = [_cut(t, stop) for t in texts]
  return list(zip(batch, texts))


def _cut(text, stop):
  f = StopFilter(stop)
  return f.feed(text) + f.finish()
