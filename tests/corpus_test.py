"""Tests of pipeline/corpus.py: reading, NFC, vocabulary, ids, split, bad input."""

import gzip
import json

import numpy as np
import pytest

from pipeline import corpus as corpus_lib
from pipeline import text as text_lib


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode('utf-8'))
  return str(path)


# Reading.

def test_read_text_single_file(tmp_path):
  path = _write(tmp_path / 'a.txt', 'To be, or not to be\nthat is the question.\n')
  assert text_lib.read_text(path) == 'To be, or not to be\nthat is the question.\n'


def test_read_text_directory_joins_sorted_files_and_skips_dot_files(tmp_path):
  d = tmp_path / 'corpus'
  _write(d / 'b.txt', 'second')
  _write(d / 'a.txt', 'first')
  _write(d / '.a.txt.swp', 'editor junk')
  _write(d / '.DS_Store', 'finder junk')
  assert text_lib.read_text(str(d)) == 'first\nsecond'


def test_read_text_directory_skips_hidden_directories(tmp_path):
  # The docstring of storage.expand: dot-files are skipped "so that editor and
  # VCS droppings don't leak into a corpus"; a VCS keeps them in .git/, .svn/.
  d = tmp_path / 'corpus'
  _write(d / 'a.txt', 'text')
  _write(d / '.git' / 'HEAD', 'ref: refs/heads/main\n')
  assert text_lib.read_text(str(d)) == 'text'


def test_read_text_glob(tmp_path):
  _write(tmp_path / 'part-1.txt', 'one')
  _write(tmp_path / 'part-0.txt', 'zero')
  _write(tmp_path / 'notes.md', 'not matched')
  assert text_lib.read_text(str(tmp_path / 'part-*.txt')) == 'zero\none'


def test_read_text_gz(tmp_path):
  text = 'En un lugar de la Mancha, de cuyo nombre no quiero acordarme\n'
  path = tmp_path / 'q.txt.gz'
  path.write_bytes(gzip.compress(text.encode('utf-8')))
  assert text_lib.read_text(str(path)) == text


def test_read_text_nfc_normalises_decomposed_characters(tmp_path):
  path = _write(tmp_path / 'a.txt', 'cafe\u0301 cafe\u0301')
  text = text_lib.read_text(path)
  assert text == 'caf\u00e9 caf\u00e9'
  assert '\u0301' not in text


# Vocabulary and ids.

def test_vocab_is_sorted_set_of_characters(tmp_path):
  path = _write(tmp_path / 'a.txt', 'hello, wörld\n' * 10)
  c = corpus_lib.load(path, val_fraction=0.1, seq_length=4)
  assert c.vocab.chars == tuple(sorted(set('hello, wörld\n')))
  assert c.vocab.size == len(set('hello, wörld\n'))


def test_vocab_nfc_gives_one_symbol_for_both_spellings(tmp_path):
  path = _write(tmp_path / 'a.txt', ('caf\u00e9 cafe\u0301 ' * 5))
  c = corpus_lib.load(path, val_fraction=0.2, seq_length=4)
  assert '\u00e9' in c.vocab.chars
  assert '\u0301' not in c.vocab.chars
  assert c.vocab.decode(np.concatenate([c.train, c.val])) == 'caf\u00e9 caf\u00e9 ' * 5


def test_vocab_save_load_round_trip(tmp_path):
  vocab = corpus_lib.Vocab.from_text('zyx é\n"\\ 日本')
  path = str(tmp_path / 'run' / corpus_lib.VOCAB_FILE)
  vocab.save(path)
  loaded = corpus_lib.Vocab.load(path)
  assert loaded == vocab
  assert loaded.chars == tuple(sorted(set('zyx é\n"\\ 日本')))
  saved = json.loads((tmp_path / 'run' / corpus_lib.VOCAB_FILE).read_text('utf-8'))
  assert saved['chars'] == list(vocab.chars)
  assert saved['size'] == vocab.size


def test_vocab_encode_decode_round_trip():
  vocab = corpus_lib.Vocab.from_text('abc\n')
  assert vocab.chars == ('\n', 'a', 'b', 'c')
  ids = vocab.encode('cab\nba')
  assert ids.tolist() == [vocab.chars.index(ch) for ch in 'cab\nba']
  assert vocab.decode(ids) == 'cab\nba'


def test_vocab_encode_rejects_unknown_characters():
  vocab = corpus_lib.Vocab.from_text('abc')
  with pytest.raises(corpus_lib.CorpusError) as e:
    vocab.encode('abzq')
  assert 'qz' in str(e.value)


def _distinct_chars(n):
  # CJK ideographs are NFC-stable, so n distinct characters stay n symbols.
  return ''.join(chr(0x4E00 + i) for i in range(n))


@pytest.mark.parametrize('num_symbols, dtype', [(2, np.uint8), (256, np.uint8),
                                                 (257, np.uint16), (1000, np.uint16)])
def test_ids_dtype_depends_on_vocab_size(tmp_path, num_symbols, dtype):
  path = _write(tmp_path / 'a.txt', _distinct_chars(num_symbols) * 20)
  c = corpus_lib.load(path, val_fraction=0.1, seq_length=2)
  assert c.vocab.size == num_symbols
  assert c.train.dtype == dtype and c.val.dtype == dtype
  # The largest id survives the narrow dtype.
  assert int(max(c.train.max(), c.val.max())) == num_symbols - 1


@pytest.mark.parametrize('n, val_fraction', [(1003, 0.1), (1000, 0.05), (777, 0.37)])
def test_validation_split_is_contiguous_tail(tmp_path, n, val_fraction):
  rng = np.random.default_rng(n)
  text = ''.join(rng.choice(list('abcdefgh \n'), size=n))
  path = _write(tmp_path / 'a.txt', text)
  c = corpus_lib.load(path, val_fraction=val_fraction, seq_length=8)
  all_ids = c.vocab.encode(text)
  assert len(c.val) == round(n * val_fraction)
  assert len(c.train) + len(c.val) == n
  np.testing.assert_array_equal(np.concatenate([c.train, c.val]), all_ids)
  assert c.vocab.decode(c.val) == text[n - len(c.val):]


# Bad input: each a CorpusError whose message says what is wrong.

def test_missing_path_names_path(tmp_path):
  path = str(tmp_path / 'nope.txt')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(path, 0.1, 10)
  assert path in str(e.value)
  assert 'does not exist' in str(e.value)


def test_glob_matching_nothing_names_pattern(tmp_path):
  pattern = str(tmp_path / '*.txt')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(pattern, 0.1, 10)
  assert pattern in str(e.value)


def test_empty_file_is_rejected(tmp_path):
  path = _write(tmp_path / 'empty.txt', '')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(path, 0.1, 10)
  assert 'empty' in str(e.value)
  assert path in str(e.value)


@pytest.mark.parametrize('data, offset, byte', [(b'abc\xff', 3, 'ff'),
                                                (b'h\xc3\xa9llo \xe9t\xc3\xa9', 7, 'e9')])
def test_non_utf8_reports_byte_offset(tmp_path, data, offset, byte):
  path = tmp_path / 'latin1.txt'
  path.write_bytes(data)
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(str(path), 0.1, 1)
  msg = str(e.value)
  assert f'offset {offset}' in msg
  assert f'0x{byte}' in msg
  assert str(path) in msg


def test_corpus_shorter_than_a_train_window(tmp_path):
  # 20 chars, half held out: train 10 < seq_length + 1 = 11.
  path = _write(tmp_path / 'a.txt', 'abcdefghij' * 2)
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(path, val_fraction=0.5, seq_length=10)
  msg = str(e.value)
  assert 'train split 10' in msg
  assert 'seq_length + 1 = 11' in msg


def test_corpus_shorter_than_a_validation_window(tmp_path):
  # 100 chars, 5% held out: validation 5 < seq_length + 1 = 11.
  path = _write(tmp_path / 'a.txt', 'abcdefghij' * 10)
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(path, val_fraction=0.05, seq_length=10)
  msg = str(e.value)
  assert 'validation split 5' in msg
  assert 'seq_length + 1 = 11' in msg


def test_corpus_of_exactly_one_window_per_split_loads(tmp_path):
  # The boundary of the two errors above: 11 chars in each split is enough.
  path = _write(tmp_path / 'a.txt', 'abcdefghijk' * 2)
  c = corpus_lib.load(path, val_fraction=0.5, seq_length=10)
  assert len(c.train) == len(c.val) == 11
