"""Storage: every byte the pipeline reads or writes goes through tf.io.gfile.

Local paths and `gs://` URLs therefore behave the same. Writes of small files
go to a temporary name first and are renamed into place, so a crash never
leaves a half-written config, vocabulary or export behind.

tf.io.gfile serves everything the train, export and sampler jobs read and
write; TensorFlow's Checkpoint and SavedModel code write gs:// directly as
well, never via local disk. The first time a process touches a gs:// bucket
these functions check, in bounded time, that credentials exist and that the
bucket does (`check_gcs_path`), so a missing login is one line instead of
TensorFlow's long wait for the GCE metadata server.

What gfile does not do well (create or check a bucket, upload a corpus, list
and download runs) is in pipeline/cloud/gcs.py, on google-cloud-storage; it
raises the same `StorageError` subclasses, with one-line messages for missing
credentials, a missing bucket and permission denied.
"""

import contextlib
import functools
import gzip
import io
import json
import os
import re
import urllib.error
import urllib.request
import uuid

import tensorflow as tf

from pipeline import errors

gfile = tf.io.gfile


class StorageError(errors.Error):
  """A path is missing or cannot be read; the message says which and why."""


class GcsCredentialsError(StorageError):
  """A gs:// path was used, but no Google Cloud credentials were found or they were refused."""


class GcsBucketNotFoundError(StorageError):
  """A gs:// path names a bucket that does not exist."""

  def __init__(self, bucket, url):
    super().__init__(
        f'Bucket gs://{bucket} does not exist (from {url}). Create it with '
        f'`gcloud storage buckets create gs://{bucket}` or '
        f'pipeline.cloud.gcs.create_bucket({bucket!r}), or fix the path.')


class GcsPermissionError(StorageError):
  """The credentials in use may not do what was asked on a gs:// path."""

  def __init__(self, url, detail):
    super().__init__(
        f'Permission denied on {url} ({detail}). Give the account in use '
        '(see `gcloud auth list`) roles/storage.objectAdmin on the bucket, or use '
        'other credentials.')


def is_gcs(path):
  return isinstance(path, str) and path.startswith('gs://')


def _gcs_paths(fn):
  """Checks gs:// arguments once per bucket (`check_gcs_path`) and makes refusals one line.

  Local paths go straight to `fn`, unchanged.
  """
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    urls = [a for a in args if is_gcs(a)]
    for url in urls:
      check_gcs_path(url)
    if not urls:
      return fn(*args, **kwargs)
    try:
      return fn(*args, **kwargs)
    except tf.errors.PermissionDeniedError as e:
      raise GcsPermissionError(urls[0], first_line(e)) from None
  return wrapper


def join(*parts):
  return os.path.join(*parts)


@_gcs_paths
def exists(path):
  return gfile.exists(path)


@_gcs_paths
def makedirs(path):
  gfile.makedirs(path)


@_gcs_paths
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


@_gcs_paths
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


@_gcs_paths
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


@_gcs_paths
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


@contextlib.contextmanager
def new_dir(final_dir):
  """Yields a sibling temporary directory to fill; it then replaces `final_dir` whole.

  If the block fails, the temporary directory is removed and whatever was at
  `final_dir` (an earlier export, say) stays as it was.
  """
  tmp_dir = f'{final_dir.rstrip("/")}.tmp-{uuid.uuid4().hex}'
  try:
    yield tmp_dir
    replace_dir(tmp_dir, final_dir)
  except BaseException:
    rmtree(tmp_dir)
    raise


@_gcs_paths
def copy(src, dst):
  gfile.copy(src, dst, overwrite=True)


@_gcs_paths
def rmtree(path):
  if gfile.exists(path):
    gfile.rmtree(path)


# --- gs:// preflight: credentials and bucket, in bounded time ----------------

# Set to 1 to use gs:// without credentials (public buckets only): TensorFlow
# then sends requests without a token, and the metadata server is not asked.
ANONYMOUS_ENV = 'CHARLSTM_GCS_ANONYMOUS'
_DEFAULT_METADATA_TIMEOUT = 3.0  # seconds; GCE_METADATA_TIMEOUT overrides, as for google-auth
_BUCKET_NAME = re.compile(r'^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$')
_checked_buckets = set()
_credentials = None  # where credentials come from, once found


def split_gcs(url):
  """'gs://bucket/a/b' -> ('bucket', 'a/b'); a bare bucket name -> (name, '')."""
  rest = url[len('gs://'):] if is_gcs(url) else url
  bucket, _, prefix = rest.partition('/')
  if not _BUCKET_NAME.match(bucket) or '..' in bucket:
    raise StorageError(
        f'{url!r} does not name a GCS bucket: bucket names are 3-63 characters of '
        'a-z, 0-9, "-", "_" and "." (e.g. gs://my-bucket/runs/r1).')
  return bucket, prefix.strip('/')


def first_line(e):
  """The first non-empty line of an exception's message (300 characters at most)."""
  text = getattr(e, 'message', None) or str(e)
  line = next((l.strip() for l in str(text).splitlines() if l.strip()), type(e).__name__)
  return line[:300]


def _adc_file():
  config = os.environ.get('CLOUDSDK_CONFIG') or os.path.join(
      os.path.expanduser('~'), '.config', 'gcloud')
  return os.path.join(config, 'application_default_credentials.json')


def _metadata_timeout():
  try:
    return float(os.environ.get('GCE_METADATA_TIMEOUT') or _DEFAULT_METADATA_TIMEOUT)
  except ValueError:
    return _DEFAULT_METADATA_TIMEOUT


def _on_gce(timeout):
  """Whether a GCE metadata server answers (one request, no proxy, `timeout` s)."""
  host = (os.environ.get('GCE_METADATA_HOST') or os.environ.get('GCE_METADATA_ROOT') or
          '169.254.169.254')
  request = urllib.request.Request(f'http://{host}/computeMetadata/v1/',
                                   headers={'Metadata-Flavor': 'Google'})
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  try:
    with opener.open(request, timeout=timeout) as response:
      headers = response.headers
  except urllib.error.HTTPError as e:
    headers = e.headers
  except (OSError, ValueError):  # refused, unreachable, timed out, bad host
    return False
  # Only Google's metadata server sets this header; anything else is not GCE.
  return (headers.get('Metadata-Flavor') or '') == 'Google'


def gcs_credentials(url='gs://'):
  """Says where TensorFlow and google-auth will find credentials for `url`, or raises.

  Looks where TensorFlow's GCS filesystem looks, in its order:
  GOOGLE_AUTH_TOKEN_FOR_TESTING, the key file in GOOGLE_APPLICATION_CREDENTIALS,
  gcloud's application-default credentials, then the GCE metadata server.
  The metadata server gets one request of GCE_METADATA_TIMEOUT seconds
  (default 3); if it does not answer, NO_GCE_CHECK=true is set so that
  TensorFlow (and google-auth) do not spend a minute retrying it, and
  GcsCredentialsError is raised.

  Returns:
    A short description of the source, e.g. 'GCE metadata server'.
  """
  global _credentials
  if _credentials:
    return _credentials
  if os.environ.get('GOOGLE_AUTH_TOKEN_FOR_TESTING'):
    _credentials = 'GOOGLE_AUTH_TOKEN_FOR_TESTING'
    return _credentials
  if os.environ.get(ANONYMOUS_ENV) == '1':
    os.environ['NO_GCE_CHECK'] = 'true'
    _credentials = 'anonymous'
    return _credentials
  key = os.environ.get('GOOGLE_APPLICATION_CREDENTIALS')
  if key:
    if not os.path.isfile(key):
      raise GcsCredentialsError(
          f'{url} needs Google Cloud credentials, but GOOGLE_APPLICATION_CREDENTIALS='
          f'{key!r} is not a file. Point it at a service-account key file, or unset it.')
    _credentials = key
    return _credentials
  if os.path.isfile(_adc_file()):
    _credentials = _adc_file()
    return _credentials
  skipped = os.environ.get('NO_GCE_CHECK', '').lower() == 'true'
  timeout = _metadata_timeout()
  if not skipped and _on_gce(timeout):
    _credentials = 'GCE metadata server'
    return _credentials
  os.environ['NO_GCE_CHECK'] = 'true'
  why = ('NO_GCE_CHECK=true skips the GCE metadata server' if skipped else
         f'no GCE metadata server answered within {timeout:g} s (GCE_METADATA_TIMEOUT), '
         'so NO_GCE_CHECK=true was set to stop TensorFlow waiting for one')
  raise GcsCredentialsError(
      f'{url} needs Google Cloud credentials and none were found: '
      f'GOOGLE_APPLICATION_CREDENTIALS is unset, {_adc_file()} does not exist, and {why}. '
      'Run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS '
      f'to a service-account key file ({ANONYMOUS_ENV}=1 reads public buckets without '
      'credentials).')


def check_gcs_path(url):
  """Fails fast with one line if `url` (gs://...) cannot work: no credentials, or no bucket.

  Runs once per bucket and process. The bucket is looked up through
  tf.io.gfile, i.e. with exactly the credentials and endpoint the job will
  use. A bucket whose metadata the credentials may not read passes: they may
  still read or write objects, and the operation itself then says if not.
  """
  if not is_gcs(url):
    return
  bucket, _ = split_gcs(url)
  if bucket in _checked_buckets:
    return
  gcs_credentials(url)
  try:
    found = gfile.exists(f'gs://{bucket}')
  except tf.errors.PermissionDeniedError:
    found = True
  if not found:
    raise GcsBucketNotFoundError(bucket, url)
  _checked_buckets.add(bucket)
