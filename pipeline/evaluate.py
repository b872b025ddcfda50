"""Validation loss of a run's checkpoint, with carried state and from zero state.

A stream-mode run evaluates with (h, c) carried across the validation text; a
shuffle-mode run evaluates every window from zero state. Their logged
validation losses therefore measure different things. `evaluate` scores one
checkpoint both ways on the run's own validation split, so runs of either
mode compare on the same footing (BUILD.md, "Quality").
"""

import numpy as np
import tensorflow as tf

from pipeline import data as data_lib
from pipeline import model as model_lib
from pipeline import source
from pipeline import workdir as workdir_lib

WAYS = ('carried', 'zero_state')


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
  """
  run = workdir_lib.open_run(workdir, checkpoint, precision='float32')
  cfg, models = run.config, run.models
  batch_size = batch_size or cfg.data.eval_batch_size
  corpus = source.open_corpus(cfg.data, run.vocab)
  layers, hidden, t = cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_length

  @tf.function
  def batch_loss(inputs, targets, h, c):
    logits, h, c = models.train([tf.cast(inputs, tf.float32), h, c], training=False)
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)), h, c

  out = {'step': run.step}
  for way in WAYS:
    # A streamed corpus has no random access: zero_state then resets the
    # state of each stream at every window instead of visiting windows in order.
    mode = 'stream' if way == 'carried' or corpus.streamed else 'shuffle'
    layout = data_lib.make_layout(len(corpus.val), t, batch_size, mode, 'validation')
    ds = data_lib.make_dataset(corpus.val, run.vocab.size, layout, shuffle=False,
                               num_steps=layout.steps_per_epoch, streamed=corpus.streamed)
    h, c = model_lib.zero_state(batch_size, layers, hidden)
    total, chars = 0.0, 0
    for batch in ds:
      if way == 'zero_state':
        h, c = model_lib.zero_state(batch_size, layers, hidden)
      loss, h, c = batch_loss(batch['inputs'], batch['targets'], h, c)
      total += float(loss)
      chars += int(np.prod(batch['targets'].shape))
    out[way] = total / chars
    out['chars'] = chars
  return out
