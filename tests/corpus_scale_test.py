"""Chunked reading and encoding (pipeline/corpus.py) and bad input, at small chunk sizes.

The chunked reader must give exactly what a simple whole-file reader gives:
decode each file, join with newlines, NFC-normalise, sort the characters,
look each one up. Small `chunk_bytes` put chunk boundaries inside multi-byte
characters and inside runs of combining marks.
"""

import gzip
import logging
import unicodedata

import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import text as text_lib
from pipeline import data as data_lib
from tests.conftest import error_lines, run

CHUNKS = (1, 2, 3, 5, 7, 64)


def _raw(path):
  data = path.read_bytes()
  return gzip.decompress(data) if path.name.endswith('.gz') else data


def _reference(paths, decode_errors='strict'):
  """The whole-file implementation: (text, vocab chars, ids)."""
  text = unicodedata.normalize(
      'NFC', '\n'.join(_raw(p).decode('utf-8', decode_errors) for p in sorted(paths)))
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  return text, tuple(chars), np.array([index[c] for c in text], np.int64)


def _check_same(path_arg, paths, chunk_bytes, decode_errors='strict'):
  text, chars, ids = _reference(paths, decode_errors)
  got_text = text_lib.read_text(path_arg, decode_errors, chunk_bytes=chunk_bytes)
  assert got_text == text
  vocab, got_ids = corpus_lib.encode(path_arg, decode_errors=decode_errors,
                                     chunk_bytes=chunk_bytes)
  assert vocab.chars == chars
  assert got_ids.dtype == vocab.dtype
  np.testing.assert_array_equal(got_ids.astype(np.int64), ids)
  # The same ids again with the vocabulary fixed (resume).
  _, again = corpus_lib.encode(path_arg, vocab, decode_errors=decode_errors,
                               chunk_bytes=chunk_bytes)
  np.testing.assert_array_equal(again, got_ids)


# Decomposed and composed spellings, marks that reorder, starters that compose
# with the previous character (Malayalam o-sign, Hangul jamo), characters NFC
# replaces (Angstrom sign, CJK compatibility ideograph), 2-, 3- and 4-byte
# UTF-8, and a run of combining marks longer than several chunks.
TRICKY = ('cafe\u0301 caf\u00e9 a\u0308\u0301 a\u0301\u0316 \u0d46\u0d3e \u1100\u1161\u11a8 '
          '\uac00\u11a8 \u212b \uf900 \u20ac\u65e5\U0001f600 x' + '\u0301' * 40 + 'e\u0327\u0306 '
          '\u0344 \u0f73 \u1e9b\u0323 q\u0307\u0323\n')


@pytest.mark.parametrize('chunk_bytes', CHUNKS)
def test_chunked_reader_matches_whole_file_reader_on_tricky_text(tmp_path, chunk_bytes):
  path = tmp_path / 'tricky.txt'
  path.write_bytes((TRICKY * 3).encode('utf-8'))
  assert unicodedata.normalize('NFC', TRICKY) != TRICKY  # the text does change under NFC
  _check_same(str(path), [path], chunk_bytes)


def test_chunked_reader_matches_on_random_text(tmp_path):
  # Random mixes of the tricky pieces, at random chunk sizes.
  alphabet = ['a', 'e', ' ', '\n', '\u0301', '\u0308', '\u0316', '\u0327', '\u00e9', '\u1100',
              '\u1161', '\u11a8', '\uac00', '\u0d46', '\u0d3e', '\u212b', '\u65e5',
              '\U0001f600', '\u0344', '\u0f73']
  rng = np.random.default_rng(0)
  for case in range(40):
    text = ''.join(rng.choice(alphabet, size=int(rng.integers(1, 200))))
    path = tmp_path / f'r{case}.txt'
    path.write_bytes(text.encode('utf-8'))
    _check_same(str(path), [path], int(rng.integers(1, 20)))


@pytest.mark.parametrize('chunk_bytes', [1, 4, 1 << 20])
def test_several_files_and_gz_match_the_whole_file_reader(tmp_path, chunk_bytes):
  d = tmp_path / 'corpus'
  d.mkdir()
  (d / 'a.txt').write_bytes('first file ends with e'.encode('utf-8'))
  # A file that starts with a combining mark: it must not merge across the
  # newline that joins the files.
  (d / 'b.txt').write_bytes('\u0301second \u00e9\u65e5\n'.encode('utf-8'))
  (d / 'c.txt.gz').write_bytes(gzip.compress(('gz: ' + TRICKY * 2).encode('utf-8')))
  (d / 'd.txt').write_bytes(b'')
  paths = sorted(d.iterdir())
  _check_same(str(d), paths, chunk_bytes)
  _check_same(str(d / '*.gz'), [d / 'c.txt.gz'], chunk_bytes)


def test_more_than_256_symbols_widen_ids_to_uint16_mid_stream(tmp_path):
  # The first chunks hold a few symbols, so ids start as uint8 and widen later.
  text = 'ab\n' * 50 + ''.join(chr(0x4e00 + i) for i in range(300)) + 'ba'
  path = tmp_path / 'cjk.txt'
  path.write_bytes(text.encode('utf-8'))
  _check_same(str(path), [path], chunk_bytes=16)
  c = corpus_lib.load(str(path), 0.1, 4, chunk_bytes=16)
  assert c.vocab.size == 303
  assert c.train.dtype == np.uint16 and c.val.dtype == np.uint16
  assert c.vocab.decode(np.concatenate([c.train, c.val])) == text


def test_256_symbols_stay_uint8(tmp_path):
  text = ''.join(chr(0x4e00 + i) for i in range(256)) * 2
  path = tmp_path / 'cjk.txt'
  path.write_bytes(text.encode('utf-8'))
  vocab, ids = corpus_lib.encode(str(path), chunk_bytes=5)
  assert vocab.size == 256 and ids.dtype == np.uint8
  assert vocab.decode(ids) == text


def test_ids_are_aligned_and_shared_with_the_pipeline_tensor(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_bytes(b'hello world\n' * 1000)
  c = corpus_lib.load(str(path), 0.1, 8, chunk_bytes=100)
  assert c.train.ctypes.data % 4096 == 0  # page-aligned anonymous memory
  t = data_lib._ids_tensor(c.train)  # pylint: disable=protected-access
  np.testing.assert_array_equal(t.numpy(), c.train)
  c.train[0] = 3
  assert int(t[0]) == 3  # the tensor is the numpy memory, not a copy
  # A misaligned slice is copied once into aligned memory, with the same values.
  odd = c.val[1:]
  assert odd.ctypes.data % 64
  np.testing.assert_array_equal(data_lib._ids_tensor(odd).numpy(), odd)  # pylint: disable=protected-access
  assert data_lib._ids_tensor(np.arange(7, dtype=np.uint16)).dtype == tf.uint16  # pylint: disable=protected-access


# Bad bytes: offsets are file offsets wherever the chunks fall.

@pytest.mark.parametrize('chunk_bytes', [1, 3, 7, 1000, 1 << 20])
@pytest.mark.parametrize('prefix, bad', [(5000, b'\xff'), (4998, b'\xe2\x82x'),
                                          (4999, b'\xc3'), (6, b'\xe9t\xc3\xa9')])
def test_non_utf8_offsets_are_file_offsets_past_the_first_chunk(tmp_path, chunk_bytes,
                                                                prefix, bad):
  data = ('\u00e9' * (prefix // 2) + 'a' * (prefix % 2)).encode('utf-8') + bad + b' tail'
  if bad == b'\xc3':  # truncated at the very end of the file
    data = data[:-len(b' tail')]
  path = tmp_path / 'latin1.txt'
  path.write_bytes(data)
  with pytest.raises(UnicodeDecodeError) as want:
    data.decode('utf-8')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path), chunk_bytes=chunk_bytes)
  msg = str(e.value)
  assert f'{path} is not UTF-8: byte 0x{data[want.value.start]:02x} at offset ' \
         f'{want.value.start} cannot be decoded' in msg
  assert '--config.data.decode_errors=replace' in msg
  assert '\n' not in msg


def test_non_utf8_in_gz_names_the_decompressed_offset(tmp_path):
  path = tmp_path / 'a.txt.gz'
  path.write_bytes(gzip.compress(b'x' * 3000 + b'\xff'))
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path), chunk_bytes=512)
  assert 'offset 3000 of the decompressed data' in str(e.value)


@pytest.mark.parametrize('chunk_bytes', [1, 3, 1 << 20])
def test_decode_errors_replace_substitutes_and_warns_with_count(tmp_path, caplog,
                                                               chunk_bytes):
  data = b'caf\xe9 ok ' * 3 + '\u00e9\ufffd'.encode('utf-8') + b' \xe2\x82 end \xc3'
  path = tmp_path / 'latin1.txt'
  path.write_bytes(data)
  with caplog.at_level(logging.WARNING):
    _check_same(str(path), [path], chunk_bytes, decode_errors='replace')
  # 3 x \xe9, \xe2\x82 (one truncated sequence) and the final \xc3; the real
  # U+FFFD in the text is not counted. _check_same reads the file three times.
  warnings = [r.getMessage() for r in caplog.records if 'U+FFFD' in r.getMessage()]
  assert len(warnings) == 3
  assert warnings[0] == (f'{path}: replaced 5 byte sequence(s) that are not UTF-8 with U+FFFD '
                         '(data.decode_errors=replace), the first at offset 3.')


def test_decode_errors_value_is_checked():
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode('unused', decode_errors='ignore')
  assert 'decode_errors' in str(e.value)
  config = config_lib.base_config()
  config.data.decode_errors = 'ignore'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.finalize(config)
  assert "data.decode_errors must be one of ('strict', 'replace'), got 'ignore'" in str(e.value)


# Binary files.

@pytest.mark.parametrize('data, why', [
    (b'some text\n' * 700 + b'\x00' + b'more', 'it contains a NUL byte at offset 7000'),
    (bytes(range(1, 7)) * 100 + b'text', 'of its first 604 bytes are control characters'),
    (b'PK\x03\x04rest of a zip', 'it starts like a zip archive'),
    (b'\x89PNG\r\n\x1a\n\x00\x00', 'it starts like a PNG image'),
])
def test_binary_file_is_named_and_refused(tmp_path, data, why):
  path = tmp_path / 'corpus' / 'blob.bin'
  path.parent.mkdir()
  path.write_bytes(data)
  (tmp_path / 'corpus' / 'a.txt').write_text('fine text\n')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(tmp_path / 'corpus'), chunk_bytes=64)
  msg = str(e.value)
  assert msg.startswith(f'{path} looks like a binary file, not text: ')
  assert why in msg
  # Also in replace mode: replacing bytes does not turn a binary file into text.
  with pytest.raises(corpus_lib.CorpusError, match='looks like a binary file'):
    corpus_lib.encode(str(path), decode_errors='replace')


def test_nul_in_gz_is_a_decompressed_offset(tmp_path):
  path = tmp_path / 'a.txt.gz'
  path.write_bytes(gzip.compress(b'y' * 2000 + b'\x00'))
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path), chunk_bytes=300)
  assert 'NUL byte at offset 2000 of the decompressed data' in str(e.value)


def test_gzip_without_gz_name_and_utf16_are_named(tmp_path):
  path = tmp_path / 'text.txt'
  path.write_bytes(gzip.compress(b'hello'))
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path))
  assert f'{path} is gzip-compressed but its name does not end in .gz' in str(e.value)
  path.write_bytes('hello'.encode('utf-16'))
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path))
  assert f'{path} looks like UTF-16 or UTF-32 text' in str(e.value)


def test_corrupt_gz_is_named(tmp_path):
  path = tmp_path / 'a.txt.gz'
  path.write_bytes(gzip.compress(b'hello world' * 100)[:40])
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path))
  assert f'{path} is not a valid gzip file' in str(e.value)


# Empty inputs.

def test_empty_directory_and_directory_of_hidden_files(tmp_path):
  d = tmp_path / 'empty'
  d.mkdir()
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(str(d), 0.1, 4)
  assert f"Directory '{d}' holds no files" in str(e.value)
  (d / '.hidden').write_text('not read')
  with pytest.raises(corpus_lib.CorpusError, match='holds no files'):
    corpus_lib.load(str(d), 0.1, 4)


def test_glob_matching_nothing_and_empty_files(tmp_path):
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(str(tmp_path / '*.txt'), 0.1, 4)
  assert f"No files match '{tmp_path / '*.txt'}'" in str(e.value)
  (tmp_path / 'a.txt').write_bytes(b'')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(str(tmp_path / '*.txt'), 0.1, 4)
  assert 'is empty' in str(e.value)


# Vocabulary size.

def test_vocabulary_larger_than_max_vocab(tmp_path):
  text = 'abc ' * 100 + ''.join(chr(0x4e00 + i) for i in range(40)) + '\u2603'
  path = tmp_path / 'a.txt'
  path.write_bytes(text.encode('utf-8'))
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(str(path), 0.1, 4, max_vocab=20, chunk_bytes=7)
  msg = str(e.value)
  assert f"Corpus '{path}' has 45 distinct characters, more than data.max_vocab=20." in msg
  assert '--config.data.max_vocab=45' in msg
  assert '41 of the characters occur fewer than 10 times' in msg
  assert "rarest: '\u4e00' x1" in msg
  # At the limit it loads.
  assert corpus_lib.load(str(path), 0.1, 4, max_vocab=45).vocab.size == 45


def test_max_vocab_config_key_reaches_the_corpus(tmp_path):
  config = config_lib.base_config()
  assert config.data.max_vocab == 1024 and config.data.decode_errors == 'strict'
  config.data.max_vocab = 1
  with pytest.raises(config_lib.ConfigError, match='data.max_vocab must be >= 2'):
    config_lib.finalize(config)
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path}', '--config.data.max_vocab=10'], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('charlstm: error: Corpus ')
  assert 'has 65 distinct characters, more than data.max_vocab=10' in lines[0]


def test_resume_vocabulary_rejects_new_characters_naming_the_file(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_bytes('abc\u00e9zz'.encode('utf-8'))
  vocab = corpus_lib.Vocab.from_text('abc')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.encode(str(path), vocab, chunk_bytes=2)
  assert f"{path} has 1 character(s) that are not in the vocabulary" in str(e.value)
  assert "'\u00e9'" in str(e.value)
