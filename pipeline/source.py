"""Where a corpus comes from: one entry, `open_corpus`, for every source.

`data.corpus` names files (a file, directory or glob, local or gs://, read by
`pipeline.corpus`) or a TFDS corpus `tfds:char_corpus/tinyshakespeare[:1.0.0]`.
`open_corpus(config.data, vocab)` reads any of them and returns a
`corpus.Corpus`; with `data.tfds_streaming` its splits are `StreamedSplit`s
read from the shards while training, and `Corpus.streamed` says so.

A TFDS corpus is a dataset prepared once (`prepare`, i.e.
`python -m launch.prepare`) into a data dir, local or gs://. Loaded, its train
and validation text are encoded like any other corpus (same vocabulary rule:
the sorted characters of train + validation). Reading needs only the
prepared files, not the builder code. Nothing here touches the network: the
builder declares no URLs and GCS downloads are turned off.

tensorflow_datasets is imported lazily, here only, so runs on plain-text
corpora never import it."""

import dataclasses
import importlib.util
import os
import sys

from absl import logging
import numpy as np
import tensorflow as tf

import pipeline
from pipeline import corpus as corpus_lib
from pipeline import storage

PREFIX = 'tfds:'
BUILDER = 'char_corpus'
# Loaded by path, not imported: data/char_corpus imports pipeline.corpus, and
# the wheel installs data/ beside pipeline/.
_BUILDER_DIR = os.path.join(pipeline.ROOT, 'data', BUILDER)


def open_corpus(data, vocab=None):
  """The corpus that `data` (a config's `data` section) names, from any source.

  Args:
    data: config.data: corpus, tfds_data_dir, tfds_streaming, val_fraction,
      seq_length, decode_errors, max_vocab.
    vocab: the run's saved Vocab (resume, evaluation), or None to build one.

  Returns:
    A corpus.Corpus; `streamed` is True for data.tfds_streaming.
  """
  if data.tfds_streaming:  # shards read while training; the text is never loaded
    vocab, train, val = open_streaming(data.corpus, data.tfds_data_dir, data.val_fraction,
                                       vocab=vocab, max_vocab=data.max_vocab)
  elif is_tfds(data.corpus):
    # train + validation is the whole text; split() applies val_fraction as for a file.
    text = ''.join(read_splits(data.corpus, data.tfds_data_dir, data.val_fraction))
    vocab, ids = corpus_lib.encode_text(text, data.corpus, vocab, data.max_vocab)
    del text
    train, val = corpus_lib.split(ids, data.val_fraction)
  else:
    return corpus_lib.load(data.corpus, data.val_fraction, data.seq_length, vocab,
                           decode_errors=data.decode_errors, max_vocab=data.max_vocab)
  corpus_lib.check_lengths(data.corpus, train, val, data.seq_length)
  return corpus_lib.Corpus(vocab=vocab, train=train, val=val,
                           streamed=bool(data.tfds_streaming))


def is_tfds(path):
  """True if a `data.corpus` value names a TFDS dataset (`tfds:NAME[/CONFIG][:VERSION]`)."""
  return isinstance(path, str) and path.startswith(PREFIX)


def dataset_name(path):
  """`tfds:char_corpus/quijote:1.0.0` -> `char_corpus/quijote:1.0.0`."""
  name = path[len(PREFIX):] if is_tfds(path) else path
  if not name or name.startswith('/'):
    raise corpus_lib.CorpusError(
        f'{path!r} names no TFDS dataset. Use tfds:NAME/CONFIG[:VERSION], e.g. '
        'tfds:char_corpus/tinyshakespeare.')
  return name


def _prepare_command(name, data_dir):
  if name.split('/')[0].split(':')[0] == BUILDER:
    manual = ' --manual_dir=YOUR_TEXT_DIR' if '/custom' in name else ''
    return (f'python -m launch.prepare --dataset={name} '
            f'--data_dir={data_dir or "DIR"}{manual}')
  return (f'tfds.builder({name!r}, data_dir={data_dir or "DIR"!r})'
          '.download_and_prepare()')


def read_splits(path, data_dir, val_fraction):
  """Reads a prepared TFDS corpus; returns (train_text, validation_text).

  Args:
    path: `tfds:NAME/CONFIG[:VERSION]`; without a version, the newest prepared one.
    data_dir: where it was prepared, local or gs://; '' or None is TFDS's default
      ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    val_fraction: data.val_fraction. The caller splits train + validation
      again with it (`pipeline.corpus.split`), so any fraction gives the ids the
      same text read from a file would; a fraction other than the one the
      dataset was prepared with is only logged.

  Raises:
    CorpusError: one line, if the dataset is not prepared there (naming the
      command that prepares it) or is not a text corpus.
  """
  tfds, name, builder = _open(path, data_dir)
  texts = [_read_split(tfds, builder, s) for s in ('train', 'validation')]
  _check_split(name, builder, len(texts[0]), len(texts[1]), val_fraction)
  return texts[0], texts[1]


def _open(path, data_dir):
  """(tfds module, dataset name, read-only builder) of a prepared text corpus."""
  name = dataset_name(path)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or 'the default TFDS data dir'
  try:
    builder = tfds.core.read_only_builder.builder_from_files(
        name, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    del e
    raise corpus_lib.CorpusError(
        f'TFDS dataset {name!r} is not prepared in {where}. Prepare it once '
        f'with `{_prepare_command(name, data_dir)}`, or set '
        '--config.data.tfds_data_dir to where it was prepared.') from None
  missing = {'train', 'validation'} - set(builder.info.splits.keys())
  if missing or 'text' not in builder.info.features:
    raise corpus_lib.CorpusError(
        f'TFDS dataset {name!r} ({builder.data_dir}) needs a `text` feature and '
        f'train and validation splits; it has features '
        f'{sorted(builder.info.features.keys())} and splits '
        f'{sorted(builder.info.splits.keys())}. Use a char_corpus config.')
  return tfds, name, builder


def _read_split(tfds, builder, split):
  # In order: one shard at a time, no file shuffling. With disable_shuffling
  # the examples sit in the files in key (= index) order.
  read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  parts = []
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if 'index' in ex and int(ex['index']) != i:
      raise corpus_lib.CorpusError(
          f'{builder.data_dir}: {split} example {i} has index {int(ex["index"])}; '
          'the examples are out of order. Prepare the dataset again.')
    parts.append(ex['text'].decode('utf-8'))
  return ''.join(parts)


def _check_split(name, builder, n_train, n_val, val_fraction):
  """Logs when data.val_fraction re-splits the text differently from the prepared splits."""
  total = n_train + n_val
  _, want_val = corpus_lib.split(range(total), val_fraction)
  if len(want_val) == n_val:
    return
  meta = os.path.join(os.fspath(builder.data_dir), 'metadata.json')
  prepared = storage.read_json(meta).get('val_fraction') if storage.exists(meta) else None
  prepared = prepared if prepared is not None else round(n_val / total, 6)
  logging.info(
      'TFDS dataset %s was split with val_fraction=%s (validation = last %d of %d '
      'characters); data.val_fraction=%s holds out the last %d instead, exactly as '
      'for the same text read from a file.', name, prepared, n_val, total,
      val_fraction, len(want_val))


@dataclasses.dataclass(frozen=True)
class StreamedSplit:
  """One split of a prepared char_corpus dataset, read from its shards on demand.

  `len()` is the split's length in characters, like the id array of a loaded
  corpus; `chars(start, stop)` is a tf.data pipeline of its ids in [start, stop).
  """
  name: str
  files: tuple  # the split's tfrecord shards, in order
  shard_examples: tuple  # examples per shard
  chars_per_example: int  # every example but the split's last holds this many
  num_chars: int
  features: object  # the dataset's tfds FeaturesDict (decodes an example in-graph)
  codepoints: tuple  # the vocabulary: id i is chr(codepoints[i])

  def __len__(self):
    return self.num_chars

  def chars(self, start, stop):
    """A dataset of int32 id vectors that together are the split's ids [start, stop).

    Args:
      start, stop: int64 scalars (tensors are fine: this runs inside
        tf.data functions), 0 <= start < stop <= len(self).

    Only the shards holding [start, stop) are opened, and only from the one
    holding `start`: whole shards before it are never read; inside that shard
    tf.data skips the earlier records without decoding them.
    """
    n = self.chars_per_example
    start, stop = tf.cast(start, tf.int64), tf.cast(stop, tf.int64)
    first, last = start // n, (stop - 1) // n + 1  # examples [first, last)
    ends = tf.constant(np.cumsum(self.shard_examples), tf.int64)
    shard = tf.searchsorted(ends, first[None], side='right')[0]
    skip = first - tf.concat([[0], ends], 0)[shard]
    records = tf.data.TFRecordDataset(tf.constant(self.files)[shard:],
                                      buffer_size=1 << 16)
    records = records.skip(skip).take(last - first)
    name = self.name
    lut = np.full(self.codepoints[-1] + 2, -1, np.int32)  # last entry: past the table
    lut[list(self.codepoints)] = np.arange(len(self.codepoints), dtype=np.int32)
    table = tf.constant(lut)

    def ids(i, record):
      example = self.features.deserialize_example(record)
      index = first + i
      check = tf.debugging.assert_equal(
          example['index'], index,
          message=f'{name}: examples out of order; prepare the dataset again')
      with tf.control_dependencies([check]):
        cps = tf.strings.unicode_decode(example['text'], 'UTF-8')
      got = tf.gather(table, tf.minimum(cps, tf.size(table) - 1))
      lo = tf.maximum(start - index * n, 0)
      hi = tf.minimum(stop - index * n, tf.cast(tf.size(got), tf.int64))
      return got[lo:hi]

    return records.enumerate().map(ids)


def open_streaming(path, data_dir, val_fraction, vocab=None, max_vocab=None):
  """Opens a prepared corpus for streaming: (vocab, train StreamedSplit, validation StreamedSplit).

  Nothing of the text is read here: the vocabulary and the split lengths come
  from the dataset's metadata, written by `prepare`.

  Args:
    path, data_dir: as for read_splits.
    val_fraction: must be the fraction the dataset was prepared with (a
      streamed corpus cannot be re-split).
    vocab: the run's Vocab on resume; it must be the dataset's.
    max_vocab: data.max_vocab.

  Raises:
    CorpusError: one line, naming the fix.
  """
  _, name, builder = _open(path, data_dir)
  meta = builder.info.metadata or {}
  if 'vocab' not in meta or 'num_chars' not in meta:
    raise corpus_lib.CorpusError(
        f'TFDS dataset {name!r} ({builder.data_dir}) was prepared without the vocabulary '
        'metadata that streaming needs. Prepare it again with '
        f'`{_prepare_command(name, data_dir)} --overwrite`, or drop '
        '--config.data.tfds_streaming to load the text.')
  prepared = meta.get('val_fraction')
  if prepared is not None and abs(prepared - val_fraction) > 1e-12:
    raise corpus_lib.CorpusError(
        f'TFDS dataset {name!r} was split with val_fraction={prepared}; a streamed corpus '
        f'keeps its prepared splits. Use --config.data.val_fraction={prepared}, or drop '
        '--config.data.tfds_streaming to re-split the loaded text.')
  dataset_vocab = corpus_lib.Vocab(tuple(chr(c) for c in meta['vocab']))
  if max_vocab is not None and dataset_vocab.size > max_vocab:
    raise corpus_lib.CorpusError(
        f'TFDS dataset {name!r} has {dataset_vocab.size} distinct characters, more than '
        f'data.max_vocab={max_vocab}. Raise it with '
        f'--config.data.max_vocab={dataset_vocab.size}.')
  if vocab is not None and vocab.chars != dataset_vocab.chars:
    raise corpus_lib.CorpusError(
        f'The run was started with a {vocab.size}-character vocabulary; TFDS dataset '
        f'{name!r} has {dataset_vocab.size} different ones. Resume on the same dataset, '
        'or start a new --workdir.')
  splits = []
  for split in ('train', 'validation'):
    info = builder.info.splits[split]
    files = tuple(os.fspath(f) for f in info.filepaths)
    splits.append(StreamedSplit(
        name=f'{name} {split}', files=files, shard_examples=tuple(info.shard_lengths),
        chars_per_example=int(meta['chars_per_example']),
        num_chars=int(meta['num_chars'][split]), features=builder.info.features,
        codepoints=tuple(int(c) for c in meta['vocab'])))
  logging.info('Streaming TFDS dataset %s from %d + %d shards (%d + %d chars); the text '
               'is not loaded.', name, len(splits[0].files), len(splits[1].files),
               splits[0].num_chars, splits[1].num_chars)
  return dataset_vocab, splits[0], splits[1]


def _builder_module():
  """Imports data/char_corpus once (importing it registers the builder with TFDS).

  A second import under another module name would register `char_corpus`
  twice, which TFDS refuses; so an existing `import data.char_corpus` is reused.
  """
  if f'data.{BUILDER}' in sys.modules:
    return sys.modules[f'data.{BUILDER}']
  mod_name = f'charlstm_data_{BUILDER}'
  if mod_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        mod_name, os.path.join(_BUILDER_DIR, '__init__.py'),
        submodule_search_locations=[_BUILDER_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[mod_name]
      raise
  return sys.modules[mod_name]


def prepare(dataset, data_dir, manual_dir=None, overwrite=False, num_shards=None):
  """Builds `char_corpus/CONFIG[:VERSION]` into data_dir, offline; returns its directory.

  Args:
    dataset: e.g. 'char_corpus/tinyshakespeare' (a `tfds:` prefix is allowed).
    data_dir: TFDS data dir, local or gs://; '' or None is TFDS's default.
    manual_dir: the `custom` config's text: a directory of UTF-8 files.
    overwrite: regenerate even if the dataset is already prepared there (a
      prepared dataset is otherwise reused as it is).
    num_shards: files per split (None: TFDS picks, about one per 1 GiB); more
      shards let a streaming run start reading nearer to where it resumes.
  """
  name = dataset_name(dataset)
  if name.split('/')[0] != BUILDER:
    raise corpus_lib.CorpusError(
        f'Can only prepare {BUILDER}/<config> datasets, not {name!r}: '
        f'--dataset={BUILDER}/tinyshakespeare, {BUILDER}/quijote or {BUILDER}/custom.')
  if manual_dir and not storage.exists(manual_dir):
    raise corpus_lib.CorpusError(f'--manual_dir {manual_dir!r} does not exist.')
  if manual_dir and not tf.io.gfile.isdir(manual_dir):
    # TFDS lists the manual dir; it cannot be a file.
    raise corpus_lib.CorpusError(
        f'--manual_dir {manual_dir!r} is a file; TFDS reads a directory. Put the file in '
        'a directory of its own and pass that.')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  module = _builder_module()
  configs = [c.name for c in module.CharCorpus.BUILDER_CONFIGS]
  config = name.split(':')[0].partition('/')[2]
  if config and config not in configs:
    raise corpus_lib.CorpusError(
        f'{BUILDER} has no config {config!r}; use one of {", ".join(configs)}.')
  try:
    builder = tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
  except (ValueError, AssertionError) as e:  # e.g. an unknown version (AssertionError)
    raise corpus_lib.CorpusError(
        f'Cannot prepare {name!r}: {" ".join(str(e).split())}') from None
  if builder.builder_config.source is None and not manual_dir:
    raise corpus_lib.CorpusError(
        f'{name} reads your own text: pass --manual_dir=DIR (a directory of UTF-8 '
        'text files).')
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None, download_mode=mode, try_download_gcs=False,
        num_shards=num_shards))
  except AssertionError as e:  # TFDS: 'num_examples (1) < number_of_shards (3)'
    if 'number_of_shards' not in str(e):
      raise
    raise corpus_lib.CorpusError(
        f'Cannot cut {name} into {num_shards} shards per split: {e}. Each split has one '
        f'example per {builder.builder_config.chars_per_example} characters; lower '
        '--num_shards.') from None
  return os.fspath(builder.data_dir)
