"""The run directory: the names of what a run writes, and opening a finished run.

  <workdir>/config.json     the resolved config (written once, checked on resume)
  <workdir>/vocab.json      the vocabulary, built once from the corpus
  <workdir>/checkpoints/    periodic checkpoints (and a copy of vocab.json)
  <workdir>/best/           the best-by-validation checkpoint (and vocab.json)
  <workdir>/export/         the SavedModel written when training ends
  <workdir>/history.json    losses by step; loss.svg plots them
  <workdir>/tb/             TensorBoard summaries
  <workdir>/init_from.json  a fine-tuning run's source (train.init_from), resolved

Every stage names these files through this module, so nothing imports the
train loop for a constant. Fine-tuning (train.init_from) reads its source run,
export or checkpoint here too, and maps the trained weights onto the merged
vocabulary (`open_init`, `apply_init`). `loss_svg` draws loss.svg from the history.
"""

import dataclasses
import math
from xml.sax import saxutils

import numpy as np
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
PLOT_FILE = 'loss.svg'
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


# Fine-tuning: train.init_from names trained weights to start a new run from.

INIT_FILE = 'init_from.json'  # what a fine-tuning run started from, written when it starts
_VALUE = '/.ATTRIBUTES/VARIABLE_VALUE'
INPUT_KERNEL = 'lstm_0/lstm_cell/kernel'  # rows: one per input character
OUTPUT_KERNEL, OUTPUT_BIAS = 'logits/kernel', 'logits/bias'  # columns / entries: per output char


@dataclasses.dataclass
class InitSource:
  """Trained weights to start from: a workdir's latest checkpoint, an export or a checkpoint."""
  path: str  # train.init_from as given
  kind: str  # 'workdir', 'export' or 'checkpoint'
  checkpoint: str  # the checkpoint prefix the weights are read from
  step: object  # its training step (int), or None (an export does not record it)
  vocab: corpus_lib.Vocab
  weights: dict  # Keras weight path ('lstm_0/lstm_cell/kernel', 'logits/bias', ...) -> array

  @property
  def num_layers(self):
    return sum(1 for k in self.weights if k.endswith('/lstm_cell/kernel'))

  @property
  def hidden_size(self):
    return int(self.weights['lstm_0/lstm_cell/recurrent_kernel'].shape[0])

  def record(self, vocab):
    """init_from.json: where the run started, and how the vocabularies met."""
    old = set(self.vocab.chars)
    return {'init_from': self.path, 'kind': self.kind, 'checkpoint': self.checkpoint,
            'step': self.step, 'num_layers': self.num_layers, 'hidden_size': self.hidden_size,
            'vocab_size': self.vocab.size, 'new_vocab_size': vocab.size,
            'new_chars': ''.join(ch for ch in vocab.chars if ch not in old)}


def _not_a_source(path, why):
  return RunError(
      f'train.init_from={path!r} is not a charlstm run, export or checkpoint ({why}). Pass '
      'a training workdir, its export/ directory or a checkpoint prefix such as '
      'WORKDIR/checkpoints/ckpt-1000.')


def _checkpoint_weights(path, prefix):
  """The model weights of a training checkpoint, by Keras weight path."""
  reader = tf.train.load_checkpoint(prefix)
  out = {}
  for key in reader.get_variable_to_shape_map():
    if key.startswith('model/') and key.endswith(_VALUE):
      # checkpoint_weights() keys are paths with '/' -> '.'; the object graph escapes '.' as '..'.
      out[key[len('model/'):-len(_VALUE)].replace('..', '.').replace('.', '/')] = \
          reader.get_tensor(key)
  if INPUT_KERNEL not in out:
    raise _not_a_source(path, f'checkpoint {prefix} holds no charlstm model weights')
  return out


def _export_weights(path, prefix):
  """The weights of an export: its `model_variables`, in the train model's weight order."""
  reader = tf.train.load_checkpoint(prefix)
  values = {}
  for key in reader.get_variable_to_shape_map():
    if key.startswith('model_variables/') and key.endswith(_VALUE):
      values[int(key.split('/')[1])] = reader.get_tensor(key)
  if len(values) < 5 or (len(values) - 2) % 3:
    raise _not_a_source(path, f'the SavedModel holds {len(values)} model variables, not a '
                        'charlstm model\'s 3 per LSTM layer + 2')
  names = [f'lstm_{i}/lstm_cell/{w}' for i in range((len(values) - 2) // 3)
           for w in ('kernel', 'recurrent_kernel', 'bias')] + [OUTPUT_KERNEL, OUTPUT_BIAS]
  return {name: values[i] for i, name in enumerate(names)}


def _vocab_near(path, *dirs):
  for d in dirs:
    p = storage.join(d, VOCAB_FILE)
    if storage.exists(p):
      return corpus_lib.Vocab.load(p)
  raise _not_a_source(path, f'no {VOCAB_FILE} in {" or ".join(dirs)}')


def open_init(path):
  """Reads train.init_from: a workdir (its latest checkpoint), an export dir, or a checkpoint.

  A checkpoint is a prefix (`.../ckpt-N`, with `.../ckpt-N.index`) or a
  checkpoints/ or best/ directory (its latest); its vocabulary is the vocab.json
  beside it (training copies one there) or in the workdir above.
  """
  path = path.rstrip('/')
  if storage.exists(storage.join(path, 'saved_model.pb')):
    prefix = storage.join(path, 'variables', 'variables')
    kind, step, weights = 'export', None, _export_weights(path, prefix)
    vocab = _vocab_near(path, storage.join(path, 'assets'))
  elif storage.exists(storage.join(path, CONFIG_FILE)):
    prefix = tf.train.latest_checkpoint(storage.join(path, CKPT_DIR))
    if prefix is None:
      raise _not_a_source(path, f'the workdir has no checkpoint in {CKPT_DIR}/ yet')
    kind, step, weights = 'workdir', checkpoint_step(prefix), _checkpoint_weights(path, prefix)
    vocab = _vocab_near(path, path)
  else:
    prefix = path if storage.exists(path + '.index') else tf.train.latest_checkpoint(path)
    if prefix is None:
      raise _not_a_source(path, f'no saved_model.pb, no {CONFIG_FILE}, no {path}.index')
    kind, step, weights = 'checkpoint', checkpoint_step(prefix), _checkpoint_weights(path, prefix)
    here = prefix.rsplit('/', 1)[0] if '/' in prefix else '.'
    vocab = _vocab_near(path, here, here.rsplit('/', 1)[0] if '/' in here else '..')
  rows, cols = weights[INPUT_KERNEL].shape[0], weights[OUTPUT_BIAS].shape[0]
  if rows != vocab.size or cols != vocab.size:
    raise _not_a_source(path, f'its weights take {rows} characters and predict {cols}, '
                        f'its {VOCAB_FILE} has {vocab.size}')
  return InitSource(path, kind, prefix, step, vocab, weights)


def check_init_model(source, model_cfg):
  """A fine-tuning run keeps the source's architecture; the message names both."""
  have = (source.num_layers, source.hidden_size)
  want = (model_cfg.num_layers, model_cfg.hidden_size)
  if have != want:
    raise config_lib.ConfigError(
        f'train.init_from={source.path!r} is a model with num_layers={have[0]}, '
        f'hidden_size={have[1]}; this config has num_layers={want[0]}, hidden_size='
        f'{want[1]}. Fine-tuning keeps the architecture: set --config.model.num_layers='
        f'{have[0]} --config.model.hidden_size={have[1]}.')


def merged_vocab(source, corpus_vocab):
  """The sorted union of the source's and the new corpus's characters."""
  return corpus_lib.Vocab(tuple(sorted(set(source.vocab.chars) | set(corpus_vocab.chars))))


def on_vocab(corpus, vocab, max_vocab):
  """`corpus` with its ids in `vocab`, a superset of its own vocabulary (fine-tuning)."""
  if vocab.size > max_vocab:
    raise config_lib.ConfigError(
        f'train.init_from and the corpus have {vocab.size} distinct characters together, '
        f'more than data.max_vocab={max_vocab}. Raise it with '
        f'--config.data.max_vocab={vocab.size}.')
  index = {ch: i for i, ch in enumerate(vocab.chars)}
  missing = ''.join(sorted(set(corpus.vocab.chars) - set(index)))
  if missing:
    raise config_lib.ConfigError(
        f'The corpus has characters that the run\'s {VOCAB_FILE} lacks: {missing!r}. '
        'Use a new --workdir.')
  if corpus.streamed:  # the shards decode code points straight to ids of `codepoints`
    cps = tuple(ord(ch) for ch in vocab.chars)
    return dataclasses.replace(corpus, vocab=vocab,
                               train=dataclasses.replace(corpus.train, codepoints=cps),
                               val=dataclasses.replace(corpus.val, codepoints=cps))
  lut = np.array([index[ch] for ch in corpus.vocab.chars], vocab.dtype)
  return dataclasses.replace(corpus, vocab=vocab, train=lut[corpus.train], val=lut[corpus.val])


def apply_init(source, models, vocab):
  """Copies the source's trained weights into freshly initialised `models` of `vocab`.

  A character in both vocabularies keeps its trained input weights (rows of
  layer 0's kernel: the inputs are one-hot) and output weights (the logits
  kernel's column and bias entry); a character new to `vocab` keeps the fresh
  model's rows, as a model trained from scratch starts. Every other weight is
  copied as it is.
  """
  index = {ch: i for i, ch in enumerate(vocab.chars)}
  to = np.array([index[ch] for ch in source.vocab.chars], np.int64)
  for w in models.train.weights:
    value, src = w.numpy(), source.weights[w.path]
    if w.path == INPUT_KERNEL or w.path == OUTPUT_BIAS:
      value[to] = src
    elif w.path == OUTPUT_KERNEL:
      value[:, to] = src
    elif value.shape == src.shape:
      value = src
    else:
      raise config_lib.ConfigError(
          f'train.init_from={source.path!r}: weight {w.path} has shape {list(src.shape)}, '
          f'this model {list(value.shape)}.')
    w.assign(value)


# The loss plot, history.json drawn as a standalone SVG. By hand rather than with
# matplotlib: TensorFlow imports Keras, and Keras imports matplotlib.pyplot
# whenever it is installed (an image-gallery helper), which cost every process
# that imports TensorFlow (each launcher, worker and sampler job) 0.5-0.7 s of
# its ~3.5 s start-up here. An SVG needs no library and opens in any browser;
# TensorBoard keeps the live curves.

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 48  # margins around the axes: room for tick labels
COLORS = {'train': '#1f77b4', 'val': '#ff7f0e'}  # the seed plot's (matplotlib's) first two


def nice_ticks(lo, hi, count=6):
  """About `count` round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
  if not hi > lo:
    lo, hi = lo - 0.5, hi + 0.5
  raw = (hi - lo) / max(count - 1, 1)
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.floor(lo / step) * step
  ticks, k = [], 0
  while first + k * step <= hi + step * 1e-9:
    ticks.append(round(first + k * step, 12))
    k += 1
  if ticks[-1] < hi:
    ticks.append(round(ticks[-1] + step, 12))
  return ticks


def _label(value):
  return f'{value:g}' if abs(value) < 1e6 else f'{value:.3g}'


def loss_svg(history):
  """history {'train': [[step, loss], ...], 'val': [...]} -> an SVG document (str).

  Axes span every finite point of both curves; validation points carry markers,
  as in the seed post's plot.
  """
  curves = {name: [(float(s), float(l)) for s, l in history.get(name, [])
                   if math.isfinite(float(s)) and math.isfinite(float(l))]
            for name in ('train', 'val')}
  points = [p for pts in curves.values() for p in pts]
  xs = nice_ticks(min((p[0] for p in points), default=0.0), max((p[0] for p in points), default=1.0))
  ys = nice_ticks(min((p[1] for p in points), default=0.0), max((p[1] for p in points), default=1.0))
  x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP

  def px(step):
    return x0 + (step - xs[0]) / (xs[-1] - xs[0]) * (x1 - x0)

  def py(loss):
    return y0 + (loss - ys[0]) / (ys[-1] - ys[0]) * (y1 - y0)

  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
         f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
         f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
  for t in xs:
    out.append(f'<line x1="{px(t):.1f}" y1="{y0}" x2="{px(t):.1f}" y2="{y1}" stroke="#ddd"/>')
    out.append(f'<text x="{px(t):.1f}" y="{y0 + 16}" text-anchor="middle">{_label(t)}</text>')
  for t in ys:
    out.append(f'<line x1="{x0}" y1="{py(t):.1f}" x2="{x1}" y2="{py(t):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{x0 - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
  out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" '
             'stroke="black"/>')
  out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">step</text>')
  out.append(f'<text transform="translate(14 {(y0 + y1) / 2:.1f}) rotate(-90)" '
             'text-anchor="middle">loss (nats per char)</text>')
  legend_y = y1 + 16
  for name, pts in curves.items():
    if not pts:
      continue
    color = COLORS[name]
    coords = ' '.join(f'{px(s):.1f},{py(l):.1f}' for s, l in pts)
    out.append(f'<polyline class="{name}" points="{coords}" fill="none" stroke="{color}" '
               'stroke-width="1.5"/>')
    if name == 'val':
      out.extend(f'<circle cx="{px(s):.1f}" cy="{py(l):.1f}" r="3" fill="{color}"/>'
                 for s, l in pts)
    out.append(f'<line x1="{x1 - 110}" y1="{legend_y - 4}" x2="{x1 - 90}" y2="{legend_y - 4}" '
               f'stroke="{color}" stroke-width="1.5"/>')
    out.append(f'<text x="{x1 - 84}" y="{legend_y}">{saxutils.escape(name)} loss</text>')
    legend_y += 16
  out.append('</svg>')
  return '\n'.join(out) + '\n'
