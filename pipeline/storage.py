"""Storage: every byte the pipeline reads or writes goes through tf.io.gfile.

Local paths and `gs://` URLs therefore behave the same. Writes of small files
go to a temporary name first and are renamed into place, so a crash never
leaves a half-written config, vocabulary or export behind.
"""

import gzip
import io
import json
import os
import uuid

import tensorflow as tf

from pipeline import errors

gfile = tf.io.gfile


class StorageError(errors.Error):
  """A path is missing or cannot be read; the message says which and why."""


def join(*parts):
  return os.path.join(*parts)


def exists(path):
  return gfile.exists(path)


def makedirs(path):
  gfile.makedirs(path)


def expand(pattern):
  """Returns the sorted files a path, directory or glob pattern names.

  Hidden files and directories (dot-names) are skipped, as a shell glob would,
  so that editor and VCS droppings (.git/) don't leak into a corpus.
  """
  if any(ch in pattern for ch in '*?['):
    files = sorted(f for f in gfile.glob(pattern)
                   if not os.path.basename(f).startswith('.') and not gfile.isdir(f))
    if not files:
      raise StorageError(
          f'No files match {pattern!r}. Check the glob, or pass a file or '
          'directory instead.')
    return files
  if not gfile.exists(pattern):
    raise StorageError(
        f'Corpus path {pattern!r} does not exist. Pass an existing file, '
        'directory or glob (local or gs://) as --config.data.corpus.')
  if gfile.isdir(pattern):
    files = []
    for root, dirs, names in gfile.walk(pattern):
      dirs[:] = [d for d in dirs if not d.startswith('.')]  # gfile.walk honours pruning
      files.extend(join(root, n) for n in names if not n.startswith('.'))
    if not files:
      raise StorageError(f'Directory {pattern!r} holds no files.')
    return sorted(files)
  return [pattern]


def read_bytes(path):
  """Reads a whole file; `.gz` files are transparently decompressed."""
  with gfile.GFile(path, 'rb') as f:
    data = f.read()
  if path.endswith('.gz'):
    try:
      data = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
    except (OSError, EOFError) as e:
      raise StorageError(f'{path} is not a valid gzip file: {e}') from None
  return data


def write_bytes_atomic(path, data):
  """Writes `data` to `path` via a temporary file and a rename."""
  parent = os.path.dirname(path)
  if parent:
    gfile.makedirs(parent)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  with gfile.GFile(tmp, 'wb') as f:
    f.write(data)
  gfile.rename(tmp, path, overwrite=True)


def write_json(path, obj):
  write_bytes_atomic(
      path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) +
             '\n').encode('utf-8'))


def read_json(path):
  return json.loads(read_bytes(path).decode('utf-8'))


def replace_dir(tmp_dir, final_dir):
  """Moves a fully written directory into place, keeping the old one until the new one is there.

  On GCS a rename is a copy per object; the old directory is only deleted
  after the new one is complete, so a crash leaves either the old or the new
  export, never a mix.
  """
  old = None
  if gfile.exists(final_dir):
    old = f'{final_dir}.old-{uuid.uuid4().hex}'
    gfile.rename(final_dir, old)
  gfile.rename(tmp_dir, final_dir)
  if old:
    gfile.rmtree(old)


def copy(src, dst):
  gfile.copy(src, dst, overwrite=True)


def rmtree(path):
  if gfile.exists(path):
    gfile.rmtree(path)
