"""Storage: every byte the pipeline reads or writes goes through tf.io.gfile.

Local paths and `gs://` URLs therefore behave the same. Writes of small files
go to a temporary name first and are renamed into place, so a crash never
leaves a half-written config, vocabulary or export behind.

Two layers:

1. tf.io.gfile (the functions up to `rmtree`) for everything the train,
   export and sampler jobs read and write; TensorFlow's Checkpoint and
   SavedModel code write gs:// directly as well, never via local disk. The
   first time a process touches a gs:// bucket these functions check, in
   bounded time, that credentials exist and that the bucket does
   (`check_gcs_path`), so a missing login is one line instead of
   TensorFlow's long wait for the GCE metadata server.
2. google-cloud-storage (imported lazily, from `gcs_client` on) for what
   gfile does not do well: create or check a bucket, upload a corpus
   directory or a staged code package, list the runs under a prefix and
   download one.

Both layers raise `StorageError` subclasses with one-line messages for
missing credentials, a missing bucket and permission denied.
"""

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
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


class GcsPermissionError(StorageError):
  """The credentials in use may not do what was asked on a gs:// path."""


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
      raise GcsPermissionError(_permission_message(urls[0], _first_line(e))) from None
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


def _first_line(e):
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


def _permission_message(url, detail):
  return (f'Permission denied on {url} ({detail}). Give the account in use '
          '(see `gcloud auth list`) roles/storage.objectAdmin on the bucket, or use '
          'other credentials.')


def _missing_bucket_message(bucket, url):
  return (f'Bucket gs://{bucket} does not exist (from {url}). Create it with '
          f'`gcloud storage buckets create gs://{bucket}` or '
          f'pipeline.storage.create_bucket({bucket!r}), or fix the path.')


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
    raise GcsBucketNotFoundError(_missing_bucket_message(bucket, url))
  _checked_buckets.add(bucket)


# --- google-cloud-storage: buckets, uploads, runs ---------------------------

def gcs_client(project=None):
  """A google.cloud.storage.Client, or a one-line error saying why there is none.

  With STORAGE_EMULATOR_HOST set (a local fake-gcs-server, as in the tests)
  the client is anonymous. Otherwise credentials are found as by
  `gcs_credentials` (bounded wait), then loaded with google.auth.default.
  """
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  source = None if emulator else gcs_credentials('Google Cloud Storage')
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  if emulator:
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
    return gcs.Client(project=project or os.environ.get('GOOGLE_CLOUD_PROJECT') or 'emulator',
                      credentials=AnonymousCredentials())
  if source == 'anonymous':
    return gcs.Client.create_anonymous_client()
  if source == 'GOOGLE_AUTH_TOKEN_FOR_TESTING':  # TensorFlow's test token; use it the same way
    from google.oauth2 import credentials as oauth2  # pylint: disable=g-import-not-at-top
    return gcs.Client(project=project or os.environ.get('GOOGLE_CLOUD_PROJECT'),
                      credentials=oauth2.Credentials(os.environ[source]))
  import google.auth  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top
  try:
    credentials, default_project = google.auth.default()
  except auth_exceptions.GoogleAuthError as e:
    raise GcsCredentialsError(
        f'Google Cloud credentials from {source} cannot be used ({_first_line(e)}). '
        'Run `gcloud auth application-default login`, or set '
        'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file.') from None
  return gcs.Client(project=project or default_project, credentials=credentials)


_CLIENT_RETRY_SECONDS = 30.0  # the client's default is 120 s of retries on network errors


def _retry():
  from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
  return retry.DEFAULT_RETRY.with_timeout(_CLIENT_RETRY_SECONDS)


@contextlib.contextmanager
def _client_errors(url, missing=None):
  """Turns google-cloud-storage failures on `url` into one-line StorageErrors.

  `missing` is the message for a 404 (by default: the bucket does not exist).
  """
  from google.api_core import exceptions as api  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth  # pylint: disable=g-import-not-at-top
  import requests  # pylint: disable=g-import-not-at-top
  try:
    yield
  except api.NotFound:
    raise (StorageError(missing) if missing else
           GcsBucketNotFoundError(_missing_bucket_message(split_gcs(url)[0], url))) from None
  except api.Forbidden as e:
    raise GcsPermissionError(_permission_message(url, _first_line(e))) from None
  except (api.Unauthorized, auth.GoogleAuthError) as e:
    raise GcsCredentialsError(
        f'The Google Cloud credentials were refused for {url} ({_first_line(e)}). '
        'Run `gcloud auth application-default login` again, or check '
        'GOOGLE_APPLICATION_CREDENTIALS.') from None
  except api.GoogleAPICallError as e:
    raise StorageError(f'Google Cloud Storage failed on {url}: {_first_line(e)}') from None
  except (api.RetryError, requests.exceptions.ConnectionError) as e:
    cause = getattr(e, 'cause', None) or e  # RetryError: the last network error
    raise StorageError(f'Cannot reach Google Cloud Storage for {url} ({_first_line(cause)}). '
                       'Check the network (and STORAGE_EMULATOR_HOST, if set).') from None


def create_bucket(bucket, location=None, project=None):
  """Creates gs://bucket unless it exists; returns True if it was created.

  Needs a project (the credentials' default, or `project`) on real GCS.
  """
  name, _ = split_gcs(bucket)
  url = f'gs://{name}'
  from google.api_core import exceptions as api  # pylint: disable=g-import-not-at-top
  client = gcs_client(project)
  with _client_errors(url):
    if client.bucket(name).exists(retry=_retry()):
      return False
    try:
      client.create_bucket(name, location=location, project=project, retry=_retry())
    except api.Conflict as e:
      raise StorageError(
          f'Cannot create {url}: {_first_line(e)} Bucket names are global; pick '
          'another name.') from None
  _checked_buckets.add(name)
  return True


def check_bucket(bucket):
  """Returns the bucket name if gs://bucket exists; raises GcsBucketNotFoundError if not."""
  name, _ = split_gcs(bucket)
  url = f'gs://{name}'
  with _client_errors(url):
    exists = gcs_client().bucket(name).exists(retry=_retry())
  if not exists:
    raise GcsBucketNotFoundError(_missing_bucket_message(name, url))
  return name


def _local_files(directory):
  """Files under `directory`, relative, sorted; dot-names and __pycache__ skipped."""
  out = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d != '__pycache__')
    out.extend(os.path.relpath(os.path.join(root, n), directory)
               for n in names if not n.startswith('.') and not n.endswith('.pyc'))
  return sorted(out)


def upload_file(local_path, url):
  """Uploads one local file to the object `url` (gs://bucket/name); returns `url`."""
  bucket, name = split_gcs(url)
  if not name or url.endswith('/'):
    raise StorageError(f'{url!r} names no object; give the full gs://bucket/path/file name.')
  if not os.path.isfile(local_path):
    raise StorageError(f'{local_path!r} is not a file.')
  with _client_errors(url):
    gcs_client().bucket(bucket).blob(name).upload_from_filename(local_path)
  return url


def upload_dir(local_dir, url):
  """Uploads every file under `local_dir` to gs://bucket/prefix/<relative path>.

  Hidden files and directories are skipped, as `expand` skips them when
  reading a corpus. Returns the gs:// URLs written, sorted.
  """
  if not os.path.isdir(local_dir):
    raise StorageError(f'{local_dir!r} is not a directory.')
  files = _local_files(local_dir)
  if not files:
    raise StorageError(f'Directory {local_dir!r} holds no files to upload.')
  bucket, prefix = split_gcs(url)
  client = gcs_client()
  out = []
  with _client_errors(url):
    b = client.bucket(bucket)
    for rel in files:
      name = '/'.join(p for p in (prefix, rel.replace(os.sep, '/')) if p)
      b.blob(name).upload_from_filename(os.path.join(local_dir, rel))
      out.append(f'gs://{bucket}/{name}')
  return out


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a remote machine needs to `pip install` and run the jobs. README.md is
# included because pyproject.toml names it as the package readme.
CODE_PATHS = ('pipeline', 'launch', 'configs', 'data', 'pyproject.toml', 'README.md')


def code_files(root=REPO_ROOT):
  """The files of CODE_PATHS under `root`, relative and sorted per path: what a remote machine needs.

  Dot-names, __pycache__ and .pyc files are left out (see `_local_files`).
  """
  files = []
  for top in CODE_PATHS:
    path = os.path.join(root, top)
    if os.path.isdir(path):
      files.extend(os.path.join(top, rel) for rel in _local_files(path))
    elif os.path.isfile(path):
      files.append(top)
    else:
      raise StorageError(f'Cannot stage the code: {path} is missing.')
  return files


def build_code_package(out_dir, root=REPO_ROOT):
  """Writes charlstm-<digest>.tar.gz of CODE_PATHS under `root`; returns its path.

  The digest covers the files' names, contents and executable bits, so the
  same code gives the same name and an unchanged tree is not uploaded twice.
  """
  files = code_files(root)
  digest = hashlib.sha256()
  for rel in files:
    full = os.path.join(root, rel)
    with open(full, 'rb') as f:
      data = f.read()
    digest.update(f'{rel}\0{os.access(full, os.X_OK)}\0{len(data)}\0'.encode())
    digest.update(data)
  out = os.path.join(out_dir, f'charlstm-{digest.hexdigest()[:16]}.tar.gz')
  with tarfile.open(out, 'w:gz') as tar:
    for rel in files:
      tar.add(os.path.join(root, rel), arcname=f'charlstm/{rel}', recursive=False)
  return out


def stage_code(url, root=REPO_ROOT):
  """Uploads the code package (see build_code_package) under the gs:// prefix `url`.

  Returns the package's gs:// URL; an identical package already there is kept.
  On the remote machine: `gcloud storage cp URL . && tar xzf charlstm-*.tar.gz
  && pip install -e ./charlstm[cpu]` (or [gpu], [tpu]).
  """
  bucket, prefix = split_gcs(url)
  with tempfile.TemporaryDirectory(prefix='charlstm-stage-') as tmp:
    package = build_code_package(tmp, root)
    name = '/'.join(p for p in (prefix, os.path.basename(package)) if p)
    dest = f'gs://{bucket}/{name}'
    with _client_errors(dest):
      blob = gcs_client().bucket(bucket).blob(name)
      if not blob.exists(retry=_retry()):
        blob.upload_from_filename(package, content_type='application/gzip')
  return dest


def list_runs(url):
  """The charlstm runs directly under the gs:// prefix `url`, as sorted gs:// URLs.

  A run is a directory holding the config.json that training writes first.
  """
  bucket, prefix = split_gcs(url)
  base = f'{prefix}/' if prefix else ''
  pattern = re.compile(re.escape(base) + r'([^/]+)/config\.json$')
  runs = []
  with _client_errors(url):
    for blob in gcs_client().list_blobs(bucket, prefix=base, retry=_retry()):
      m = pattern.match(blob.name)
      if m:
        runs.append(f'gs://{bucket}/{base}{m.group(1)}')
  return sorted(runs)


def download_run(url, local_dir):
  """Downloads every object of the run at gs:// `url` into `local_dir`, keeping paths.

  Returns the local paths written, sorted. Raises StorageError if `url` holds
  no run (no config.json).
  """
  bucket, prefix = split_gcs(url)
  if not prefix:
    raise StorageError(f'{url!r} is a whole bucket; give the run, gs://{bucket}/RUN.')
  base = prefix + '/'
  client = gcs_client()
  written = []
  with _client_errors(url):
    blobs = [b for b in client.list_blobs(bucket, prefix=base, retry=_retry())
             if not b.name.endswith('/')]  # skip TF's directory placeholders
    if not any(b.name == base + 'config.json' for b in blobs):
      raise StorageError(
          f'{url} holds no charlstm run (no config.json). See '
          f'pipeline.storage.list_runs({f"gs://{bucket}"!r}) for the runs there.')
    for blob in blobs:
      local = os.path.join(local_dir, *blob.name[len(base):].split('/'))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      blob.download_to_filename(local, retry=_retry())
      written.append(local)
  return sorted(written)
