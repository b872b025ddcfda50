"""Tests of pipeline/storage.py on real local files."""

import gzip
import os

import pytest

from pipeline import storage


def test_write_bytes_atomic_creates_parents_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / 'a' / 'b' / 'file.bin'
  storage.write_bytes_atomic(str(path), b'first')
  assert path.read_bytes() == b'first'
  assert os.listdir(path.parent) == ['file.bin']


def test_write_bytes_atomic_overwrites(tmp_path):
  path = tmp_path / 'file.bin'
  storage.write_bytes_atomic(str(path), b'a much longer first version')
  storage.write_bytes_atomic(str(path), b'second')
  assert path.read_bytes() == b'second'
  assert not [n for n in os.listdir(tmp_path) if '.tmp-' in n]
  assert os.listdir(tmp_path) == ['file.bin']


def test_write_json_round_trips_non_ascii(tmp_path):
  path = str(tmp_path / 'v.json')
  obj = {'chars': ['é', 'ñ', '\n', '"'], 'size': 4}
  storage.write_json(path, obj)
  assert storage.read_json(path) == obj
  assert 'é' in (tmp_path / 'v.json').read_text(encoding='utf-8')


def _make_tree(root, files):
  root.mkdir(parents=True)
  for name, text in files.items():
    (root / name).write_text(text)


def test_replace_dir_swaps_in_new_dir_and_removes_old(tmp_path):
  final = tmp_path / 'export'
  new = tmp_path / 'export.tmp'
  _make_tree(final, {'old.txt': 'old', 'shared.txt': 'old shared'})
  _make_tree(new, {'new.txt': 'new', 'shared.txt': 'new shared'})
  storage.replace_dir(str(new), str(final))
  assert sorted(os.listdir(final)) == ['new.txt', 'shared.txt']
  assert (final / 'shared.txt').read_text() == 'new shared'
  assert (final / 'new.txt').read_text() == 'new'
  # Neither the temporary nor the moved-aside old directory is left behind.
  assert os.listdir(tmp_path) == ['export']


def test_replace_dir_without_existing_target(tmp_path):
  final = tmp_path / 'export'
  new = tmp_path / 'staging'
  _make_tree(new, {'x.txt': 'x'})
  storage.replace_dir(str(new), str(final))
  assert os.listdir(tmp_path) == ['export']
  assert (final / 'x.txt').read_text() == 'x'


def test_expand_glob_matching_nothing_names_pattern(tmp_path):
  (tmp_path / 'a.txt').write_text('a')
  pattern = str(tmp_path / '*.csv')
  with pytest.raises(storage.StorageError) as e:
    storage.expand(pattern)
  assert pattern in str(e.value)


def test_expand_missing_path_names_path(tmp_path):
  path = str(tmp_path / 'nope.txt')
  with pytest.raises(storage.StorageError) as e:
    storage.expand(path)
  assert path in str(e.value)


def test_expand_empty_directory_raises(tmp_path):
  with pytest.raises(storage.StorageError) as e:
    storage.expand(str(tmp_path))
  assert str(tmp_path) in str(e.value)


def test_expand_glob_returns_sorted_files_only(tmp_path):
  for name in ('b.txt', 'a.txt', 'c.md'):
    (tmp_path / name).write_text(name)
  (tmp_path / 'dir.txt').mkdir()
  assert storage.expand(str(tmp_path / '*.txt')) == [
      str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt')]


def test_read_bytes_decompresses_gz(tmp_path):
  path = tmp_path / 'x.txt.gz'
  path.write_bytes(gzip.compress(b'hello\xc3\xa9'))
  assert storage.read_bytes(str(path)) == b'hello\xc3\xa9'


def test_read_bytes_bad_gzip_raises_storage_error(tmp_path):
  path = tmp_path / 'x.txt.gz'
  path.write_bytes(b'this is not gzip')
  with pytest.raises(storage.StorageError) as e:
    storage.read_bytes(str(path))
  assert str(path) in str(e.value)
