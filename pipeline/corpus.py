"""Corpus and vocabulary: text in, compact id arrays and a saved vocabulary out.

`pipeline.text` reads the files; this module encodes them. The vocabulary is
the sorted set of characters; it is built once, saved as JSON in the workdir,
and reused verbatim on resume and export. Each piece of text is encoded with
numpy (UTF-32 code points through a lookup table) straight into one growing id
array, uint8 for up to 256 symbols and uint16 above. The array lives in
anonymous memory that grows by remapping pages, not by copying, so loading
needs the ids plus a few chunks; the array is page-aligned, so `pipeline.data`
can hand it to TensorFlow without a copy.

Only files are read here; `pipeline.source.open_corpus` is the one entry that
picks the source (files, or a prepared TFDS dataset) for a config.
"""

import dataclasses
import functools
import mmap

import numpy as np

from pipeline import storage
from pipeline import text as text_lib

VOCAB_FILE = 'vocab.json'
CorpusError = text_lib.CorpusError  # one class; raised by reading and by encoding
CHUNK_BYTES = text_lib.CHUNK_BYTES
_REMAP_STEP = 1 << 22  # Ids remapped per step when the vocabulary is sorted at the end.


@dataclasses.dataclass(frozen=True)
class Vocab:
  """An ordered character vocabulary: id i is `chars[i]`."""
  chars: tuple

  @property
  def size(self):
    return len(self.chars)

  @property
  def dtype(self):
    return np.uint8 if self.size <= 256 else np.uint16 if self.size <= 65536 else np.uint32

  @functools.cached_property
  def _lut(self):
    return _lookup_table([ord(c) for c in self.chars])

  def encode(self, text):
    """Maps text to ids; raises CorpusError naming characters outside the vocabulary."""
    cps = _codepoints(text)
    ids = _lookup(self._lut, cps)
    if len(ids) and ids.min() < 0:
      missing = _chars(cps[ids < 0])
      raise CorpusError(
          f'{len(missing)} character(s) are not in the vocabulary: '
          f'{"".join(missing)!r}. Use text made of the training characters.')
    return ids.astype(self.dtype)

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
  """Train and validation ids; validation is the contiguous tail of the text.

  streamed: False when train and val are numpy id arrays held in memory; True
  when they are `pipeline.source.StreamedSplit`s read from TFDS shards while
  training (`pipeline.data` builds a different pipeline for each).
  """
  vocab: Vocab
  train: object
  val: object
  streamed: bool = False


# Encoding: text pieces -> one compact id array.

def _codepoints(text):
  return np.frombuffer(text.encode('utf-32-le'), dtype='<u4')


def _chars(codepoints):
  return [chr(c) for c in np.unique(codepoints)]


def _lookup_table(codepoints):
  """int32 table: code point -> id, -1 for the rest; its last entry is always -1."""
  table = np.full(max(codepoints, default=0) + 2, -1, np.int32)
  table[np.asarray(codepoints, np.int64)] = np.arange(len(codepoints), dtype=np.int32)
  return table


def _lookup(table, codepoints):
  """Ids of `codepoints` (-1 where unknown); code points past the table hit its last, -1 entry."""
  if len(codepoints) and codepoints.max() >= len(table):
    codepoints = np.minimum(codepoints, len(table) - 1)
  return table[codepoints]


def _dtype(size):
  return np.dtype(np.uint8 if size <= 256 else np.uint16 if size <= 65536 else np.uint32)


class _IdBuffer:
  """A growing id array in anonymous private memory.

  Growing remaps pages (mremap) instead of copying them, and capacity that was
  never written costs no memory, so the ids never exist twice. The memory is
  page-aligned, which lets pipeline.data give it to TensorFlow without a copy.
  """

  def __init__(self, dtype, capacity=1 << 16):
    self.dtype = np.dtype(dtype)
    self.size = 0
    self._mm = mmap.mmap(-1, capacity * self.dtype.itemsize, flags=mmap.MAP_PRIVATE)

  def _view(self, start, stop):
    item = self.dtype.itemsize
    return np.frombuffer(self._mm, self.dtype, stop - start, start * item)

  def append(self, values):
    end = self.size + len(values)
    capacity = len(self._mm) // self.dtype.itemsize
    if end > capacity:  # no views may be alive here: mmap refuses to resize under them
      self._mm.resize(max(end, 2 * capacity) * self.dtype.itemsize)
    self._view(self.size, end)[:] = values
    self.size = end

  def widen(self, dtype):
    """Moves the ids to a wider dtype (more than 256 symbols were seen)."""
    wider = _IdBuffer(dtype, max(self.size, 1) * 2)
    for start in range(0, self.size, _REMAP_STEP):
      wider.append(self._view(start, min(start + _REMAP_STEP, self.size)))
    self._mm.close()
    return wider

  def finish(self):
    """The ids as a numpy array (sharing this memory; the unused capacity is released)."""
    if not self.size:
      return np.zeros(0, self.dtype)
    self._mm.resize(self.size * self.dtype.itemsize)
    return np.frombuffer(self._mm, self.dtype)


class _Encoder:
  """Encodes NFC text pieces into one id array.

  With a vocabulary (resume), ids are final at once. Without one, each new
  character gets the next provisional id; at the end the vocabulary is sorted
  and the ids are remapped in place.
  """

  def __init__(self, vocab=None, max_vocab=None):
    self.vocab = vocab
    self.max_vocab = max_vocab
    if vocab is not None:
      self.codepoints = [ord(c) for c in vocab.chars]
      self.ids = _IdBuffer(vocab.dtype)
    else:
      self.codepoints = []  # provisional id -> code point
      self.ids = _IdBuffer(np.uint8)
    self.table = _lookup_table(self.codepoints)
    self.counts = np.zeros(len(self.codepoints), np.int64)  # only kept while learning

  def add(self, text, path):
    cps = _codepoints(text)
    if not len(cps):
      return
    ids = _lookup(self.table, cps)
    if ids.min() < 0:
      unknown = cps[ids < 0]
      if self.vocab is not None:
        missing = _chars(unknown)
        shown = ''.join(missing[:40]) + ('...' if len(missing) > 40 else '')
        raise CorpusError(
            f'{path} has {len(missing)} character(s) that are not in the vocabulary '
            f'this run was started with: {shown!r}. A run keeps its vocab.json; '
            'train on text made of its characters, or start a new --workdir.')
      self._learn(np.unique(unknown))
      ids = _lookup(self.table, cps)
    if self.vocab is None:
      self.counts += np.bincount(ids, minlength=len(self.counts))
    if self.ids is not None:
      self.ids.append(ids)

  def _learn(self, new):
    first = len(self.codepoints)
    self.codepoints.extend(int(c) for c in new)
    if new[-1] + 2 > len(self.table):
      table = np.full(int(new[-1]) + 2, -1, np.int32)
      table[:len(self.table)] = self.table
      self.table = table
    self.table[new] = np.arange(first, len(self.codepoints), dtype=np.int32)
    self.counts = np.concatenate([self.counts, np.zeros(len(new), np.int64)])
    if self.max_vocab is not None and len(self.codepoints) > self.max_vocab:
      if self.ids is not None:  # keep counting symbols for the message; ids are moot
        self.ids._mm.close()  # pylint: disable=protected-access
        self.ids = None
    elif _dtype(len(self.codepoints)) != self.ids.dtype:
      self.ids = self.ids.widen(_dtype(len(self.codepoints)))

  def finish(self, path):
    """Returns (vocab, ids); raises CorpusError if the corpus is empty or has too many symbols."""
    n = len(self.codepoints)
    if self.ids is None:
      order = np.argsort(self.counts, kind='stable')
      rare = int((self.counts < 10).sum())
      rarest = ', '.join(f'{chr(self.codepoints[i])!r} x{self.counts[i]}' for i in order[:8])
      raise CorpusError(
          f'Corpus {path!r} has {n} distinct characters, more than data.max_vocab='
          f'{self.max_vocab}. Raise the limit with --config.data.max_vocab={n}, or clean '
          f'the text: {rare} of the characters occur fewer than 10 times (rarest: {rarest}).')
    ids = self.ids.finish()
    if not len(ids):
      raise text_lib.empty_error(path)
    if self.vocab is not None:
      return self.vocab, ids
    order = np.argsort(np.asarray(self.codepoints, np.int64), kind='stable')
    vocab = Vocab(tuple(chr(self.codepoints[i]) for i in order))
    rank = np.empty(n, ids.dtype)
    rank[order] = np.arange(n)
    for start in range(0, len(ids), _REMAP_STEP):  # in place, a slice at a time
      part = ids[start:start + _REMAP_STEP]
      part[:] = rank[part]
    assert ids.dtype == vocab.dtype
    return vocab, ids


def encode(path, vocab=None, *, decode_errors='strict', max_vocab=None,
           chunk_bytes=CHUNK_BYTES):
  """Reads the corpus at `path` (file, directory or glob) chunk by chunk into ids.

  Args:
    path: as for read_text.
    vocab: a fixed Vocab (resume); characters outside it are an error. If None,
      the vocabulary is the sorted set of the corpus's characters.
    decode_errors: 'strict' (bytes that are not UTF-8 are an error naming the
      file and offset) or 'replace' (they become U+FFFD, with a warning).
    max_vocab: most distinct characters allowed when building the vocabulary
      (None: no limit).
    chunk_bytes: bytes read at a time.

  Returns:
    (vocab, ids): ids is a 1-D array of vocab.dtype over the whole text.
  """
  encoder = _Encoder(vocab, max_vocab)
  for f, piece in text_lib.pieces(path, decode_errors, chunk_bytes):
    encoder.add(piece, f)
  return encoder.finish(path)


def split(ids, val_fraction):
  """Splits ids into (train, val) with val the contiguous tail fraction."""
  if not 0.0 <= val_fraction < 1.0:
    raise CorpusError(f'data.val_fraction must be in [0, 1), got {val_fraction}.')
  n_val = int(round(len(ids) * val_fraction))
  return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


def check_lengths(name, train, val, seq_length, need_val=True):
  """Both splits must hold at least one window of seq_length + 1 characters."""
  need = seq_length + 1
  if len(train) < need or (need_val and len(val) < need):
    raise CorpusError(
        f'Corpus {name!r} has {len(train) + len(val)} characters: train split {len(train)}, '
        f'validation split {len(val)}, but each split needs at least one '
        f'window of seq_length + 1 = {need}. Use a longer text or lower '
        '--config.data.seq_length.')


def encode_text(text, name, vocab=None, max_vocab=None):
  """(vocab, ids) of text already in memory (a TFDS corpus), with `encode`'s rules."""
  encoder = _Encoder(vocab, max_vocab)
  encoder.add(text, name)
  return encoder.finish(name)


def load(path, val_fraction, seq_length, vocab=None, *, decode_errors='strict',
         max_vocab=None, chunk_bytes=CHUNK_BYTES):
  """Reads, encodes and splits a corpus of files.

  Args:
    path: file, directory or glob, local or gs://.
    val_fraction: tail fraction of the text held out for validation.
    seq_length: window length T; both splits must hold at least one window of
      T + 1 characters.
    vocab: an existing Vocab (resume, re-export). If None it is built from the
      whole text so that the validation split never meets an unknown char.
    decode_errors, max_vocab, chunk_bytes: see `encode`.

  Returns:
    A Corpus.
  """
  vocab, ids = encode(path, vocab, decode_errors=decode_errors, max_vocab=max_vocab,
                      chunk_bytes=chunk_bytes)
  train, val = split(ids, val_fraction)
  check_lengths(path, train, val, seq_length, need_val=val_fraction > 0)
  return Corpus(vocab=vocab, train=train, val=val)
