"""Corpus and vocabulary: text in, compact id arrays and a saved vocabulary out.

The text is read through `pipeline.storage` (so `gs://` works), decoded as
strict UTF-8 and NFC-normalised, so that "é" typed two ways is one character.
The vocabulary is the sorted set of characters; it is built once, saved as JSON
in the workdir, and reused verbatim on resume and export.
"""

import dataclasses
import unicodedata

import numpy as np

from pipeline import errors
from pipeline import storage

VOCAB_FILE = 'vocab.json'


class CorpusError(errors.Error):
  """The corpus cannot be used; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Vocab:
  """An ordered character vocabulary: id i is `chars[i]`."""
  chars: tuple

  def __post_init__(self):
    object.__setattr__(self, '_index', {c: i for i, c in enumerate(self.chars)})

  @property
  def size(self):
    return len(self.chars)

  @property
  def dtype(self):
    return np.uint8 if self.size <= 256 else np.uint16 if self.size <= 65536 else np.uint32

  def encode(self, text):
    """Maps text to ids; raises CorpusError naming characters outside the vocabulary."""
    missing = sorted(set(text) - self._index.keys())
    if missing:
      raise CorpusError(
          f'{len(missing)} character(s) are not in the vocabulary: '
          f'{"".join(missing)!r}. Use text made of the training characters.')
    return np.fromiter((self._index[c] for c in text), dtype=self.dtype,
                       count=len(text))

  def decode(self, ids):
    return ''.join(self.chars[int(i)] for i in ids)

  def to_json(self):
    return {'chars': list(self.chars), 'size': self.size,
            'normalization': 'NFC'}

  @classmethod
  def from_json(cls, obj):
    return cls(tuple(obj['chars']))

  def save(self, path):
    storage.write_json(path, self.to_json())

  @classmethod
  def load(cls, path):
    return cls.from_json(storage.read_json(path))

  @classmethod
  def from_text(cls, text):
    return cls(tuple(sorted(set(text))))


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and validation ids; validation is the contiguous tail of the text."""
  vocab: Vocab
  train: np.ndarray
  val: np.ndarray


def decode_utf8(data, source):
  """Strict UTF-8 decoding that reports the first bad byte's offset."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise CorpusError(
        f'{source} is not UTF-8: byte 0x{data[e.start]:02x} at offset '
        f'{e.start} cannot be decoded ({e.reason}). Convert the file to UTF-8, '
        f'e.g. `iconv -f latin1 -t utf-8`.') from None


def read_text(path):
  """Reads a file, directory or glob (local or gs://) as one NFC string.

  Several files are joined in sorted path order with a newline between them.
  """
  try:
    files = storage.expand(path)
  except storage.StorageError as e:
    raise CorpusError(str(e)) from None
  parts = []
  for f in files:
    parts.append(decode_utf8(storage.read_bytes(f), f))
  text = unicodedata.normalize('NFC', '\n'.join(parts))
  if not text:
    raise CorpusError(
        f'Corpus {path!r} is empty. Point --config.data.corpus at a non-empty '
        'UTF-8 text file.')
  return text


def split(ids, val_fraction):
  """Splits ids into (train, val) with val the contiguous tail fraction."""
  if not 0.0 <= val_fraction < 1.0:
    raise CorpusError(f'data.val_fraction must be in [0, 1), got {val_fraction}.')
  n_val = int(round(len(ids) * val_fraction))
  return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


def load(path, val_fraction, seq_length, vocab=None, tfds_data_dir=''):
  """Reads, encodes and splits a corpus.

  Args:
    path: file, directory or glob, local or gs://; or tfds:NAME/CONFIG[:VERSION],
      a dataset prepared by launch.prepare (pipeline/tfds_source.py).
    val_fraction: tail fraction of the text held out for validation.
    seq_length: window length T; both splits must hold at least one window of
      T + 1 characters.
    vocab: an existing Vocab (resume, re-export). If None it is built from the
      whole text so that the validation split never meets an unknown char.

  Returns:
    A Corpus.
  """
  if path.startswith('tfds:'):  # a prepared TFDS dataset, read from tfds_data_dir
    from pipeline import tfds_source  # pylint: disable=g-import-not-at-top
    # train + validation is the whole text; split() below applies val_fraction as for a file.
    text = ''.join(tfds_source.read_splits(path, tfds_data_dir, val_fraction))
  else:
    text = read_text(path)
  if vocab is None:
    vocab = Vocab.from_text(text)
  ids = vocab.encode(text)
  train, val = split(ids, val_fraction)
  need = seq_length + 1
  if len(train) < need or (val_fraction > 0 and len(val) < need):
    raise CorpusError(
        f'Corpus {path!r} has {len(ids)} characters: train split {len(train)}, '
        f'validation split {len(val)}, but each split needs at least one '
        f'window of seq_length + 1 = {need}. Use a longer text or lower '
        '--config.data.seq_length.')
  return Corpus(vocab=vocab, train=train, val=val)
