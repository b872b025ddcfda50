"""Validation loss of a run's checkpoint, with carried state and from zero state.

A stream-mode run evaluates with (h, c) carried across the validation text; a
shuffle-mode run evaluates every window from zero state. Their logged
validation losses therefore measure different things. `evaluate` scores one
checkpoint both ways on the run's own validation split, so runs of either
mode compare on the same footing (README, "Quality").
"""

import numpy as np
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import data as data_lib
from pipeline import errors
from pipeline import model as model_lib
from pipeline import storage
from pipeline import train as train_lib

WAYS = ('carried', 'zero_state')


class EvaluateError(errors.Error):
  """The workdir or checkpoint cannot be evaluated; the message says why."""


def evaluate(workdir, checkpoint='latest', batch_size=None):
  """Returns {'carried': nats/char, 'zero_state': nats/char, 'step': int, 'chars': int}.

  Args:
    workdir: a training workdir (local or gs://).
    checkpoint: 'latest' or 'best'.
    batch_size: validation streams (carried) and windows per batch (zero_state);
      default the run's data.eval_batch_size, so one of the two ways repeats
      the run's own validation loss exactly.

  'carried' cuts the validation split into batch_size contiguous streams and
  carries (h, c) from window to window, as a stream-mode run's evaluation
  does; 'zero_state' starts every window of seq_length chars from zero, as a
  shuffle-mode run's does.
  """
  cfg_path = storage.join(workdir, train_lib.CONFIG_FILE)
  if not storage.exists(cfg_path):
    raise EvaluateError(f'{workdir} has no {train_lib.CONFIG_FILE}; is it a charlstm workdir?')
  cfg = config_lib.from_dict(storage.read_json(cfg_path))
  sub = train_lib.CKPT_DIR if checkpoint == 'latest' else train_lib.BEST_DIR
  path = tf.train.latest_checkpoint(storage.join(workdir, sub))
  if path is None:
    raise EvaluateError(f'No {checkpoint} checkpoint in {storage.join(workdir, sub)}.')
  batch_size = batch_size or cfg.data.eval_batch_size
  vocab = corpus_lib.Vocab.load(storage.join(workdir, corpus_lib.VOCAB_FILE))
  corpus = corpus_lib.load(cfg.data.corpus, cfg.data.val_fraction, cfg.data.seq_length,
                           vocab=vocab, tfds_data_dir=cfg.data.tfds_data_dir,
                           decode_errors=cfg.data.decode_errors)
  models = model_lib.build(vocab.size, cfg.model.hidden_size, cfg.model.num_layers,
                           cfg.data.seq_length)
  tf.train.Checkpoint(model=models.checkpoint_weights()).read(path).expect_partial()
  step = int(path.rsplit('-', 1)[-1]) if path.rsplit('-', 1)[-1].isdigit() else -1

  @tf.function
  def batch_loss(inputs, targets, h, c):
    logits, h, c = models.train([inputs, h, c], training=False)
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)), h, c

  out = {'step': step}
  for way, mode in zip(WAYS, ('stream', 'shuffle')):
    layout = data_lib.make_layout(len(corpus.val), cfg.data.seq_length, batch_size, mode,
                                  'validation')
    ds = data_lib.make_dataset(corpus.val, vocab.size, layout, shuffle=False,
                               num_steps=layout.steps_per_epoch)
    h, c = model_lib.zero_state(batch_size, cfg.model.num_layers, cfg.model.hidden_size)
    total, chars = 0.0, 0
    for batch in ds:
      if way == 'zero_state':
        h, c = model_lib.zero_state(batch_size, cfg.model.num_layers, cfg.model.hidden_size)
      loss, h, c = batch_loss(batch['inputs'], batch['targets'], h, c)
      total += float(loss)
      chars += int(np.prod(batch['targets'].shape))
    out[way] = total / chars
    out['chars'] = chars
  return out
