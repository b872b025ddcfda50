"""Scoring: a run's validation loss (`evaluate`), and any text under an export (`score`).

`evaluate`: a stream-mode run evaluates with (h, c) carried across the
validation text; a shuffle-mode run evaluates every window from zero state.
Their logged validation losses therefore measure different things.
`evaluate` scores one checkpoint both ways on the run's own validation split,
so runs of either mode compare on the same footing (BUILD.md, "Quality").

`score`: bits per character and perplexity of texts under an exported
SavedModel, each text read from zero state with (h, c) carried through it.
Like the sampler job it needs only TensorFlow and the export (its `step`
signature, called in a tf.while loop over the characters of a padded batch
of texts), never the model code: `evaluate`'s imports of the training code
are made inside it.
"""

import dataclasses
import math
import unicodedata

import numpy as np
import tensorflow as tf

from pipeline import errors
from pipeline import sample as sample_lib
from pipeline import storage
from pipeline import text as text_lib

WAYS = ('carried', 'zero_state')
SCORE_BATCH = 64  # texts per tf.function call of `score` (sorted by length: little padding)


def evaluate(workdir, checkpoint='latest', batch_size=None):
  """Returns {'carried': nats/char, 'zero_state': nats/char, 'step': int, 'chars': int}.

  Args:
    workdir: a training workdir (local or gs://).
    checkpoint: 'latest', 'best' or a checkpoint prefix.
    batch_size: validation streams (carried) and windows per batch (zero_state);
      default the run's data.eval_batch_size, so one of the two ways repeats
      the run's own validation loss exactly.

  'carried' cuts the validation split into batch_size contiguous streams and
  carries (h, c) from window to window, as a stream-mode run's evaluation
  does; 'zero_state' starts every window of seq_length chars from zero, as a
  shuffle-mode run's does. The corpus is opened as training opened it (a
  TFDS-streamed corpus is streamed here too).

  Which characters count: every one but the first, v[1..N-1] of the split's
  ids v[0..N-1], either way ('chars' is N-1), as in training's validation:
  the last, partial windows and batch are included and masked. With
  batch_size=1, 'carried' is one stream over the split, so `score` of the
  split's text gives the same figure.
  """
  # pylint: disable=g-import-not-at-top  # training code, kept out of `score`'s imports
  from pipeline import data as data_lib
  from pipeline import model as model_lib
  from pipeline import source
  from pipeline import workdir as workdir_lib
  run = workdir_lib.open_run(workdir, checkpoint, precision='float32')
  cfg, models = run.config, run.models
  batch_size = batch_size or cfg.data.eval_batch_size
  corpus = source.open_corpus(cfg.data, run.vocab)
  layers, hidden, t = cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_length

  @tf.function
  def batch_loss(inputs, targets, weights, h, c):
    logits, h, c = models.train([tf.cast(inputs, tf.float32), h, c], training=False)
    per_char = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    return tf.reduce_sum(per_char * weights), tf.reduce_sum(weights), h, c

  out = {'step': run.step}
  for way in WAYS:
    # A streamed corpus has no random access: zero_state then resets the
    # state of each stream at every window instead of visiting windows in order.
    mode = 'stream' if way == 'carried' or corpus.streamed else 'shuffle'
    layout = data_lib.make_layout(len(corpus.val), t, batch_size, mode, 'validation',
                                  cover_all=True)
    ds = data_lib.make_dataset(corpus.val, run.vocab.size, layout, shuffle=False,
                               num_steps=layout.steps_per_epoch, streamed=corpus.streamed)
    h, c = model_lib.zero_state(batch_size, layers, hidden)
    total, chars = 0.0, 0
    for batch in ds:
      if way == 'zero_state':
        h, c = model_lib.zero_state(batch_size, layers, hidden)
      loss, count, h, c = batch_loss(batch['inputs'], batch['targets'], batch['weights'], h, c)
      total += float(loss)
      chars += int(count)
    out[way] = total / chars
    out['chars'] = chars
  return out


# Scoring texts under an export.

class ScoreError(errors.Error):
  """A text cannot be scored as asked; the message says what to change."""


@dataclasses.dataclass
class Text:
  """One text to score: `name` for reports, `text` NFC-normalised."""
  name: str
  text: str


def read_texts(files=(), texts=()):
  """Texts from files (pipeline.text's rules: UTF-8, NFC; not empty, not binary) and strings."""
  out = []
  for path in files:
    if not any(ch in path for ch in '*?[') and not storage.exists(path):
      raise ScoreError(f'--text_file {path!r} does not exist.')
    try:
      out.append(Text(path, text_lib.read_text(path)))
    except text_lib.CorpusError as e:
      raise ScoreError(text_lib.flag_message(str(e), '--text_file', 'Score UTF-8 text only.')) from None
  for i, t in enumerate(texts):
    if not t:
      raise ScoreError(f'--text number {i + 1} is empty: there is nothing to score.')
    out.append(Text(f'--text {i + 1}', unicodedata.normalize('NFC', t)))
  if not out:
    raise ScoreError('Nothing to score: pass --text_file=FILE (repeatable) or --text=TEXT.')
  return out


def _loss_fn(step, num_layers, hidden):
  """A tf.function (ids [B, N] int32, lengths [B]) -> per-target nats [B, N - 1].

  Row b is scored from zero state: target ids[b, t + 1] under the logits of
  step(ids[b, t]), for t + 1 < lengths[b]; padded targets are 0. Runs the
  export's `step` once per character for the whole batch (tf.range is a
  tf.while loop in the graph), with no Python per character.
  """

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32),
                                tf.TensorSpec([None], tf.int32)])
  def losses(ids, lengths):
    b, n = tf.shape(ids)[0], tf.shape(ids)[1]
    h = c = tf.zeros([b, num_layers, hidden])
    out = tf.TensorArray(tf.float32, size=n - 1)
    for t in tf.range(n - 1):
      r = step(ids=ids[:, t], h=h, c=c)
      h, c = r['h'], r['c']
      nats = tf.nn.sparse_softmax_cross_entropy_with_logits(ids[:, t + 1], r['logits'])
      out = out.write(t, tf.where(t + 1 < lengths, nats, 0.0))
    return tf.transpose(out.stack())

  return losses


def _figures(nats, chars):
  """nats/char, bits/char and perplexity (per character) of `chars` targets."""
  if not chars:
    return {'chars_scored': 0, 'nats_per_char': None, 'bits_per_char': None,
            'perplexity': None}
  mean = nats / chars
  return {'chars_scored': int(chars), 'nats_per_char': mean,
          'bits_per_char': mean / math.log(2.0), 'perplexity': math.exp(mean)}


def score(saved_model, texts, strict=False, per_line=False, batch_size=SCORE_BATCH):
  """Scores each Text from zero state, (h, c) carried through it, under an export.

  Characters outside the export's vocabulary are counted and skipped: they
  neither advance the state nor are scored (strict: a ScoreError naming them).
  A text's first character has nothing to be predicted from and is not
  scored, so a text of n known characters scores n - 1 targets (none
  for a single character).

  Returns:
    {'overall': figures, 'texts': [figures + name, chars, oov, oov_chars
    (+ lines: figures + line, 1-based, a line's targets ending at its '\\n')]},
    figures being chars_scored, nats_per_char, bits_per_char, perplexity.
  """
  module, chars = sample_lib.load(saved_model)
  if 'step' not in module.signatures:
    raise ScoreError(f'{saved_model} has no `step` signature; is it a charlstm export?')
  state = module.signatures['step'].structured_input_signature[1]['h'].shape
  losses = _loss_fn(module.step, state[1], state[2])
  codepoints = np.array([ord(ch) for ch in chars], np.int64)  # sorted, as vocab.json
  docs = []
  for t in texts:
    cps = np.frombuffer(t.text.encode('utf-32-le'), '<u4').astype(np.int64)
    pos = np.minimum(np.searchsorted(codepoints, cps), len(codepoints) - 1)
    known = codepoints[pos] == cps
    oov = ''.join(sorted(set(chr(c) for c in cps[~known])))
    if oov and strict:
      raise ScoreError(
          f'{t.name} has {int((~known).sum())} character(s) outside the model\'s '
          f'{len(chars)}-character vocabulary: {oov!r} (--strict). Drop --strict to '
          'skip them (counted, not scored, the state not advanced).')
    line = np.concatenate([[0], np.cumsum(cps == ord('\n'))[:-1]])  # line of each char
    docs.append({'ids': pos[known].astype(np.int32), 'lines': line[known],
                 'num_lines': int(line[-1]) + 1 if len(line) else 0,
                 'report': {'name': t.name, 'chars': int(len(cps)),
                            'oov': int((~known).sum()), 'oov_chars': oov}})
  order = sorted(range(len(docs)), key=lambda i: len(docs[i]['ids']))
  for start in range(0, len(order), batch_size):
    group = [docs[i] for i in order[start:start + batch_size]]
    n = max(len(d['ids']) for d in group)
    ids = np.zeros([len(group), n], np.int32)
    for row, d in enumerate(group):
      ids[row, :len(d['ids'])] = d['ids']
    lengths = np.array([len(d['ids']) for d in group], np.int32)
    if n < 2:  # no targets (an empty TensorArray cannot stack an unknown shape)
      nats = np.zeros([len(group), 0])
    else:
      nats = losses(tf.constant(ids), tf.constant(lengths)).numpy().astype(np.float64)
    for row, d in enumerate(group):
      d['nats'] = nats[row, :max(len(d['ids']) - 1, 0)]
  total, scored, reports = 0.0, 0, []
  for d in docs:
    rep = d['report']
    rep.update(_figures(float(d['nats'].sum()), len(d['nats'])))
    total, scored = total + float(d['nats'].sum()), scored + len(d['nats'])
    if per_line:
      line_of_target = d['lines'][1:]
      sums = np.bincount(line_of_target, d['nats'], minlength=d['num_lines'])
      counts = np.bincount(line_of_target, minlength=d['num_lines'])
      rep['lines'] = [{'line': i + 1, **_figures(float(sums[i]), int(counts[i]))}
                      for i in range(d['num_lines'])]
    reports.append(rep)
  if not scored:
    raise ScoreError('Nothing to score: each text needs at least two characters of the '
                     f"model's vocabulary ({len(chars)} characters; see the export's "
                     'assets/vocab.json).')
  overall = {'chars': sum(r['chars'] for r in reports), 'oov': sum(r['oov'] for r in reports),
             'oov_chars': ''.join(sorted(set(''.join(r['oov_chars'] for r in reports)))),
             **_figures(total, scored)}
  return {'saved_model': saved_model, 'overall': overall, 'texts': reports}
