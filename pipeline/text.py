"""Reading text: files, directories and globs (local or gs://) in, NFC text pieces out.

The text is read through `pipeline.storage`'s gfile (so `gs://` works), decoded
as UTF-8 and NFC-normalised, so that "é" typed two ways is one character.
Corpora of any size are read in chunks (`chunk_bytes`), never as one string:
each file goes through an incremental UTF-8 decoder and is normalised piece by
piece, cut only before a character that nothing earlier can combine with, so
the result equals normalising the whole file. Binary files, other encodings
and bad gzip data are refused with the file and offset named.
"""

import codecs
import contextlib
import functools
import gzip
import unicodedata
import zlib

from absl import logging

from pipeline import errors
from pipeline import storage


class CorpusError(errors.Error):
  """The corpus cannot be used; the message names the problem and the fix."""


CHUNK_BYTES = 1 << 18  # Bytes read per step (~15 bytes of temporaries per byte); tests pass
# small values to exercise the boundaries.
DECODE_ERRORS = ('strict', 'replace')
_SNIFF_BYTES = 8192  # How much of each file's head the binary check looks at.


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


def empty_error(path):
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
    raise empty_error(path)
  return text


def flag_message(message, flag, fix):
  """A CorpusError's message for a launcher that reads a file given as `flag`, ending in `fix`."""
  message = message.replace(
      ' Leave it out of --config.data.corpus (name a file, directory or glob of UTF-8 text '
      'files).', f' {fix}')
  message = message.replace('--config.data.corpus', flag).replace('Corpus ', 'Text ')
  cut = message.find(', or set --config.data.decode_errors')
  return message if cut < 0 else message[:cut] + '.'
