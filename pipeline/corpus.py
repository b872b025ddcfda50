"""Corpus and vocabulary: text in, compact id arrays and a saved vocabulary out.

The text is read through `pipeline.storage`'s gfile (so `gs://` works), decoded
as UTF-8 and NFC-normalised, so that "é" typed two ways is one character. The
vocabulary is the sorted set of characters; it is built once, saved as JSON in
the workdir, and reused verbatim on resume and export.

Corpora of any size are read in chunks (`chunk_bytes`), never as one string:
each file goes through an incremental UTF-8 decoder, is normalised piece by
piece (cut only before a character that nothing earlier can combine with, so
the result equals normalising the whole file), and each piece is encoded with
numpy (UTF-32 code points through a lookup table) straight into one growing id
array, uint8 for up to 256 symbols and uint16 above. The array lives in
anonymous memory that grows by remapping pages, not by copying, so loading
needs the ids plus a few chunks; the array is page-aligned, so `pipeline.data`
can hand it to TensorFlow without a copy.
"""

import codecs
import contextlib
import dataclasses
import functools
import gzip
import mmap
import unicodedata
import zlib

import numpy as np
from absl import logging

from pipeline import errors
from pipeline import storage

VOCAB_FILE = 'vocab.json'


class CorpusError(errors.Error):
  """The corpus cannot be used; the message names the problem and the fix."""


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
  """Train and validation ids; validation is the contiguous tail of the text."""
  vocab: Vocab
  train: np.ndarray
  val: np.ndarray


CHUNK_BYTES = 1 << 18  # Bytes read per step (~15 bytes of temporaries per byte); tests pass
# small values to exercise the boundaries.
DECODE_ERRORS = ('strict', 'replace')
_SNIFF_BYTES = 8192  # How much of each file's head the binary check looks at.
_REMAP_STEP = 1 << 22  # Ids remapped per step when the vocabulary is sorted at the end.


# Reading: bytes -> NFC text pieces, one file at a time.

# Signatures of binary formats whose first bytes are not text at all.
_MAGIC = ((b'PK\x03\x04', 'a zip archive'), (b'\xfd7zXZ\x00', 'an xz file'),
          (b'\x28\xb5\x2f\xfd', 'a zstd file'), (b'7z\xbc\xaf\x27\x1c', 'a 7z archive'),
          (b'\x89PNG\r\n\x1a\n', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'),
          (b'\x7fELF', 'an executable'))
# C0 control bytes that text does not contain (tab, newlines, form feed,
# backspace and escape do occur in text and are not counted).
_CONTROL_BYTES = bytes([*range(0x00, 0x08), *range(0x0e, 0x1b), *range(0x1c, 0x20)])

_replaced = [0]  # byte sequences replaced by U+FFFD so far (see _count_replace)


def _count_replace(e):
  """'replace', counting: U+FFFD for each undecodable sequence, as Python's 'replace'."""
  _replaced[0] += 1
  return '\ufffd', e.end


codecs.register_error('charlstm.replace', _count_replace)


def _where(offset, gz):
  return f'offset {offset} of the decompressed data' if gz else f'offset {offset}'


def _binary(path, why):
  return CorpusError(
      f'{path} looks like a binary file, not text: {why}. Leave it out of '
      '--config.data.corpus (name a file, directory or glob of UTF-8 text files).')


def _check_head(path, head, gz):
  """Refuses a file whose first bytes say it is not UTF-8 text."""
  if head.startswith((b'\xff\xfe', b'\xfe\xff')):
    raise CorpusError(
        f'{path} looks like UTF-16 or UTF-32 text (it starts with the byte-order mark '
        f'0x{head[0]:02x} 0x{head[1]:02x}), not UTF-8. Convert it, e.g. '
        '`iconv -f utf-16 -t utf-8`.')
  if head.startswith(b'\x1f\x8b') and not gz:
    raise CorpusError(
        f'{path} is gzip-compressed but its name does not end in .gz. Rename it to '
        '*.gz (it is then decompressed while reading), or gunzip it.')
  for magic, kind in _MAGIC:
    if head.startswith(magic):
      raise _binary(path, f'it starts like {kind}')
  if head.startswith(b'BZh') and head[4:10] == b'1AY&SY':
    raise _binary(path, 'it starts like a bzip2 file')
  sample = head[:_SNIFF_BYTES]
  controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
  if len(sample) >= 32 and controls * 10 > len(sample):
    raise _binary(path, f'{100 * controls // len(sample)}% of its first {len(sample)} '
                  'bytes are control characters')


@contextlib.contextmanager
def _open(path):
  """A binary stream of the file's bytes; `.gz` files are decompressed on the fly."""
  with storage.gfile.GFile(path, 'rb') as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw, mode='rb') as f:
        yield f
    else:
      yield raw


def _read(f, size, path, gz):
  if not gz:
    return f.read(size)
  try:
    return f.read(size)
  except (OSError, EOFError, zlib.error) as e:
    raise CorpusError(f'{path} is not a valid gzip file ({e}). Re-compress it, or '
                      'decompress it and drop the .gz.') from None


def _raw_chunks(f, size, path, gz):
  """Yields the file's bytes in chunks of `size`, then b''; checks the head first.

  The head check sees the first _SNIFF_BYTES whatever the chunk size.
  """
  head = _read(f, max(size, _SNIFF_BYTES), path, gz)
  _check_head(path, head, gz)
  for start in range(0, len(head), size):
    yield head[start:start + size]
  raw = head
  while raw:
    raw = _read(f, size, path, gz)
    yield raw
  if head == b'':
    yield b''


def _first_error(data):
  try:
    data.decode('utf-8')
  except UnicodeDecodeError as e:
    return e.start
  return 0


@functools.cache
def _composes_backward():
  """Characters that NFC may merge into the character before them.

  The second character of every canonical two-character decomposition (mostly
  combining marks, plus some vowel signs that are starters), and the Hangul
  medial vowels and final consonants (composed by rule, not by table).
  """
  out = {chr(cp) for cp in (*range(0x1161, 0x1176), *range(0x11a8, 0x11c3))}
  for cp in range(0xc0, 0x30000):  # no canonical decompositions outside this range
    d = unicodedata.decomposition(chr(cp))
    if d and not d.startswith('<'):
      parts = d.split()
      if len(parts) == 2:
        out.add(chr(int(parts[1], 16)))
  return frozenset(out)


@functools.lru_cache(maxsize=65536)
def _starts_segment(c):
  """True if nothing before `c` can change under NFC because of c or what follows it.

  Then NFC(a + b) == NFC(a) + NFC(b) whenever b starts with c: c is a starter
  (combining class 0) that is already in NFC, does not compose with the
  character before it, and neither does the first character it decomposes to.
  Every ASCII character qualifies.
  """
  if c < '\x80':
    return True
  if unicodedata.combining(c) or not unicodedata.is_normalized('NFC', c):
    return False
  first = unicodedata.normalize('NFD', c)[0]
  back = _composes_backward()
  return not unicodedata.combining(first) and c not in back and first not in back


def _nfc_cut(text, known):
  """The last index i >= 1 at which `text` can be cut for NFC, or 0 if there is none.

  text[1:known] was searched before and holds no such index.
  """
  for i in range(len(text) - 1, max(known, 1) - 1, -1):
    if _starts_segment(text[i]):
      return i
  return 0


def _file_text(path, decode_errors='strict', chunk_bytes=CHUNK_BYTES):
  """Yields the NFC text of one file in pieces of about `chunk_bytes`.

  Offsets in errors are byte offsets in the file (in the decompressed data for
  `.gz`), wherever the chunk boundaries fall.
  """
  gz = path.endswith('.gz')
  decoder = codecs.getincrementaldecoder('utf-8')(
      'charlstm.replace' if decode_errors == 'replace' else 'strict')
  offset = 0  # of the next byte read
  pending = ''  # decoded, not yet normalised: it may still combine with what follows
  replaced, first_replaced = 0, None
  with _open(path) as f:
    for raw in _raw_chunks(f, chunk_bytes, path, gz):
      nul = raw.find(b'\0')
      if nul >= 0:
        raise _binary(path, f'it contains a NUL byte at {_where(offset + nul, gz)}')
      final = not raw
      held = decoder.getstate()[0]  # bytes of a character split by the last chunk boundary
      start = offset - len(held)  # file offset of held + raw
      before = _replaced[0]
      try:
        text = decoder.decode(raw, final)
      except UnicodeDecodeError as e:
        bad = e.object[e.start]
        raise CorpusError(
            f'{path} is not UTF-8: byte 0x{bad:02x} at {_where(start + e.start, gz)} '
            f'cannot be decoded ({e.reason}). Convert the file to UTF-8 (e.g. '
            '`iconv -f latin1 -t utf-8`), or set --config.data.decode_errors=replace '
            'to read such bytes as U+FFFD.') from None
      if _replaced[0] != before:
        if first_replaced is None:
          first_replaced = start + _first_error(held + raw)
        replaced += _replaced[0] - before
      offset += len(raw)
      if pending:
        text = pending + text
      cut = len(text) if final else _nfc_cut(text, len(pending))
      if cut:
        yield unicodedata.normalize('NFC', text[:cut])
      pending = text[cut:]
  if replaced:
    logging.warning('%s: replaced %d byte sequence(s) that are not UTF-8 with U+FFFD '
                    '(data.decode_errors=replace), the first at %s.', path, replaced,
                    _where(first_replaced, gz))


def _files(path):
  try:
    return storage.expand(path)
  except storage.StorageError as e:
    raise CorpusError(str(e)) from None


def pieces(path, decode_errors='strict', chunk_bytes=CHUNK_BYTES):
  """Yields (file, NFC text) pieces of the corpus; files are joined by a newline.

  Joined, the pieces are `read_text(path)`; each is at most about chunk_bytes
  characters, so a caller can stream a corpus larger than memory.
  """
  if decode_errors not in DECODE_ERRORS:
    raise CorpusError(
        f'data.decode_errors must be one of {DECODE_ERRORS}, got {decode_errors!r}.')
  for i, f in enumerate(_files(path)):
    if i:
      yield f, '\n'
    for piece in _file_text(f, decode_errors, chunk_bytes):
      yield f, piece


def _empty(path):
  return CorpusError(
      f'Corpus {path!r} is empty. Point --config.data.corpus at a non-empty '
      'UTF-8 text file.')


def read_text(path, decode_errors='strict', chunk_bytes=CHUNK_BYTES):
  """Reads a file, directory or glob (local or gs://) as one NFC string.

  Several files are joined in sorted path order with a newline between them.
  This holds the whole text as a Python string (1-4 bytes per character);
  `load` and `encode` never do.
  """
  text = ''.join(piece for _, piece in pieces(path, decode_errors, chunk_bytes))
  if not text:
    raise _empty(path)
  return text


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
      raise _empty(path)
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
  for f, piece in pieces(path, decode_errors, chunk_bytes):
    encoder.add(piece, f)
  return encoder.finish(path)


def split(ids, val_fraction):
  """Splits ids into (train, val) with val the contiguous tail fraction."""
  if not 0.0 <= val_fraction < 1.0:
    raise CorpusError(f'data.val_fraction must be in [0, 1), got {val_fraction}.')
  n_val = int(round(len(ids) * val_fraction))
  return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


def load(path, val_fraction, seq_length, vocab=None, tfds_data_dir='', *,
         decode_errors='strict', max_vocab=None, chunk_bytes=CHUNK_BYTES):
  """Reads, encodes and splits a corpus.

  Args:
    path: file, directory or glob, local or gs://; or tfds:NAME/CONFIG[:VERSION],
      a dataset prepared by launch.prepare (pipeline/tfds_source.py).
    val_fraction: tail fraction of the text held out for validation.
    seq_length: window length T; both splits must hold at least one window of
      T + 1 characters.
    vocab: an existing Vocab (resume, re-export). If None it is built from the
      whole text so that the validation split never meets an unknown char.
    tfds_data_dir: where tfds: datasets are prepared.
    decode_errors, max_vocab, chunk_bytes: see `encode` (files, not tfds:).

  Returns:
    A Corpus.
  """
  if path.startswith('tfds:'):  # a prepared TFDS dataset, read from tfds_data_dir
    from pipeline import tfds_source  # pylint: disable=g-import-not-at-top
    # train + validation is the whole text; split() below applies val_fraction as for a file.
    text = ''.join(tfds_source.read_splits(path, tfds_data_dir, val_fraction))
    encoder = _Encoder(vocab, max_vocab)
    encoder.add(text, path)
    del text
    vocab, ids = encoder.finish(path)
  else:
    vocab, ids = encode(path, vocab, decode_errors=decode_errors, max_vocab=max_vocab,
                        chunk_bytes=chunk_bytes)
  train, val = split(ids, val_fraction)
  need = seq_length + 1
  if len(train) < need or (val_fraction > 0 and len(val) < need):
    raise CorpusError(
        f'Corpus {path!r} has {len(ids)} characters: train split {len(train)}, '
        f'validation split {len(val)}, but each split needs at least one '
        f'window of seq_length + 1 = {need}. Use a longer text or lower '
        '--config.data.seq_length.')
  return Corpus(vocab=vocab, train=train, val=val)
