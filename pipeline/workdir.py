"""The run directory: the names of what a run writes, and opening a finished run.

  <workdir>/config.json     the resolved config (written once, checked on resume)
  <workdir>/vocab.json      the vocabulary, built once from the corpus
  <workdir>/checkpoints/    periodic checkpoints (and a copy of vocab.json)
  <workdir>/best/           the best-by-validation checkpoint (and vocab.json)
  <workdir>/export/         the SavedModel written when training ends
  <workdir>/history.json    losses by step; loss.png plots them
  <workdir>/tb/             TensorBoard summaries

Every stage names these files through this module, so nothing imports the
train loop for a constant.
"""

import dataclasses

import tensorflow as tf

from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import errors
from pipeline import model as model_lib
from pipeline import storage

CONFIG_FILE = 'config.json'
VOCAB_FILE = corpus_lib.VOCAB_FILE
CKPT_DIR = 'checkpoints'
BEST_DIR = 'best'
EXPORT_DIR = 'export'
HISTORY_FILE = 'history.json'
PLOT_FILE = 'loss.png'
TB_DIR = 'tb'

# Keys a resumed run must share with the checkpoint it resumes: they fix the
# weight and carried-state shapes, and the mapping from step to data.
FIXED_ON_RESUME = ('model.hidden_size', 'model.num_layers', 'data.seq_length',
                   'data.batch_size', 'data.mode', 'data.val_fraction')


class RunError(errors.Error):
  """A workdir or checkpoint cannot be opened; the message says why."""


def path(workdir, name, *more):
  return storage.join(workdir, name, *more)


def load_vocab(workdir):
  """The run's vocabulary, or None before the first run wrote it."""
  p = path(workdir, VOCAB_FILE)
  return corpus_lib.Vocab.load(p) if storage.exists(p) else None


def write_config(config, workdir, write):
  """Writes config.json (if `write`); on resume, refuses settings the checkpoint cannot take."""
  p = path(workdir, CONFIG_FILE)
  resolved = config_lib.to_json(config)
  if storage.exists(p) and tf.train.latest_checkpoint(path(workdir, CKPT_DIR)):
    old = storage.read_json(p)
    for key in FIXED_ON_RESUME:
      section, name = key.split('.')
      was, now = old.get(section, {}).get(name), resolved[section][name]
      if was != now:
        raise config_lib.ConfigError(
            f'{workdir} holds a run with {key}={was!r}; this config has {now!r}. '
            f'Resume with --config.{key}={was!r}, or use a new --workdir.')
  if write:
    storage.write_json(p, resolved)


def read_config(workdir):
  p = path(workdir, CONFIG_FILE)
  if not storage.exists(p):
    raise RunError(f'{workdir} has no {CONFIG_FILE}; is it a charlstm training workdir? '
                   'Pass the --workdir that launch.train wrote.')
  return config_lib.from_dict(storage.read_json(p))


def checkpoint_path(workdir, checkpoint='latest'):
  """'latest', 'best' or a checkpoint prefix -> the prefix to read."""
  if checkpoint in ('latest', 'best'):
    sub = CKPT_DIR if checkpoint == 'latest' else BEST_DIR
    found = tf.train.latest_checkpoint(path(workdir, sub))
    if found is None:
      raise RunError(f'No {checkpoint} checkpoint in {path(workdir, sub)}. '
                     'Train first, or pass --checkpoint=PATH.')
    return found
  if not storage.exists(checkpoint + '.index'):
    raise RunError(f'Checkpoint {checkpoint!r} not found (no {checkpoint}.index).')
  return checkpoint


def checkpoint_step(prefix):
  tail = prefix.rsplit('-', 1)[-1]
  return int(tail) if tail.isdigit() else -1


@dataclasses.dataclass
class Run:
  """A finished (or paused) run, rebuilt from its workdir."""
  workdir: str
  config: object  # the locked ConfigDict from config.json
  vocab: corpus_lib.Vocab
  models: model_lib.Models
  checkpoint: str  # the prefix the weights were read from
  step: int


def open_run(workdir, checkpoint='latest', precision=None):
  """Rebuilds the models from config.json and restores a checkpoint's weights.

  Args:
    workdir: a training workdir, local or gs://.
    checkpoint: 'latest', 'best', or a checkpoint path prefix.
    precision: Keras dtype policy of the rebuilt layers; default the run's own.

  Every weight of the model must be in the checkpoint (the optimizer and
  carried state may be left unread): a checkpoint of another architecture is
  an error, not a model silently scored with fresh weights.
  """
  cfg = read_config(workdir)
  vocab = load_vocab(workdir)
  if vocab is None:
    raise RunError(f'{workdir} has no {VOCAB_FILE}; is it a charlstm training workdir?')
  prefix = checkpoint_path(workdir, checkpoint)
  m = cfg.model
  # No dropout: dropout has no weights, and an opened run only infers.
  models = model_lib.build(vocab.size, m.hidden_size, m.num_layers, cfg.data.seq_length,
                           precision or cfg.runtime.precision)
  status = tf.train.Checkpoint(model=models.checkpoint_weights()).read(prefix)
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise RunError(f'Checkpoint {prefix} does not match the model in {CONFIG_FILE} '
                   f'(hidden_size={m.hidden_size}, num_layers={m.num_layers}, vocab '
                   f'{vocab.size}): {str(e).splitlines()[0][:200]}') from None
  status.expect_partial()
  return Run(workdir, cfg, vocab, models, prefix, checkpoint_step(prefix))
