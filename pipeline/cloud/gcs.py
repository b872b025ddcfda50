"""google-cloud-storage for what tf.io.gfile does not do well: buckets, uploads, runs.

Create or check a bucket, upload a file or a corpus directory, list the
charlstm runs under a prefix and download one. launch.submit stages with
these; the jobs themselves read and write gs:// through pipeline/storage.py.
google-cloud-storage is imported lazily, by `gcs_client`. Failures are the
one-line `storage.StorageError` subclasses that gfile's layer raises too.
"""

import contextlib
import os
import re

from pipeline import storage

_CLIENT_RETRY_SECONDS = 30.0  # the client's default is 120 s of retries on network errors


def gcs_client(project=None):
  """A google.cloud.storage.Client, or a one-line error saying why there is none.

  With STORAGE_EMULATOR_HOST set (a local fake-gcs-server, as in the tests)
  the client is anonymous. Otherwise credentials are found as by
  `storage.gcs_credentials` (bounded wait), then loaded with google.auth.default.
  """
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  source = None if emulator else storage.gcs_credentials('Google Cloud Storage')
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
    raise storage.GcsCredentialsError(
        f'Google Cloud credentials from {source} cannot be used ({storage.first_line(e)}). '
        'Run `gcloud auth application-default login`, or set '
        'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file.') from None
  return gcs.Client(project=project or default_project, credentials=credentials)


def _retry():
  from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
  return retry.DEFAULT_RETRY.with_timeout(_CLIENT_RETRY_SECONDS)


@contextlib.contextmanager
def _client_errors(url):
  """Turns google-cloud-storage failures on `url` into one-line StorageErrors."""
  from google.api_core import exceptions as api  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth  # pylint: disable=g-import-not-at-top
  import requests  # pylint: disable=g-import-not-at-top
  try:
    yield
  except api.NotFound:
    raise storage.GcsBucketNotFoundError(storage.split_gcs(url)[0], url) from None
  except api.Forbidden as e:
    raise storage.GcsPermissionError(url, storage.first_line(e)) from None
  except (api.Unauthorized, auth.GoogleAuthError) as e:
    raise storage.GcsCredentialsError(
        f'The Google Cloud credentials were refused for {url} ({storage.first_line(e)}). '
        'Run `gcloud auth application-default login` again, or check '
        'GOOGLE_APPLICATION_CREDENTIALS.') from None
  except api.GoogleAPICallError as e:
    raise storage.StorageError(
        f'Google Cloud Storage failed on {url}: {storage.first_line(e)}') from None
  except (api.RetryError, requests.exceptions.ConnectionError) as e:
    cause = getattr(e, 'cause', None) or e  # RetryError: the last network error
    raise storage.StorageError(
        f'Cannot reach Google Cloud Storage for {url} ({storage.first_line(cause)}). '
        'Check the network (and STORAGE_EMULATOR_HOST, if set).') from None


def create_bucket(bucket, location=None, project=None):
  """Creates gs://bucket unless it exists; returns True if it was created.

  Needs a project (the credentials' default, or `project`) on real GCS.
  """
  name, _ = storage.split_gcs(bucket)
  url = f'gs://{name}'
  from google.api_core import exceptions as api  # pylint: disable=g-import-not-at-top
  client = gcs_client(project)
  with _client_errors(url):
    if client.bucket(name).exists(retry=_retry()):
      return False
    try:
      client.create_bucket(name, location=location, project=project, retry=_retry())
    except api.Conflict as e:
      raise storage.StorageError(
          f'Cannot create {url}: {storage.first_line(e)} Bucket names are global; pick '
          'another name.') from None
  return True


def check_bucket(bucket):
  """Returns the bucket name if gs://bucket exists; raises GcsBucketNotFoundError if not."""
  name, _ = storage.split_gcs(bucket)
  url = f'gs://{name}'
  with _client_errors(url):
    exists = gcs_client().bucket(name).exists(retry=_retry())
  if not exists:
    raise storage.GcsBucketNotFoundError(name, url)
  return name


def local_files(directory):
  """Files under `directory`, relative, sorted; dot-names, __pycache__ and .pyc files skipped.

  What `upload_dir` uploads, and what a wheel for a VM is built from.
  """
  out = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d != '__pycache__')
    out.extend(os.path.relpath(os.path.join(root, n), directory)
               for n in names if not n.startswith('.') and not n.endswith('.pyc'))
  return sorted(out)


def upload_file(local_path, url):
  """Uploads one local file to the object `url` (gs://bucket/name); returns `url`."""
  bucket, name = storage.split_gcs(url)
  if not name or url.endswith('/'):
    raise storage.StorageError(
        f'{url!r} names no object; give the full gs://bucket/path/file name.')
  if not os.path.isfile(local_path):
    raise storage.StorageError(f'{local_path!r} is not a file.')
  with _client_errors(url):
    gcs_client().bucket(bucket).blob(name).upload_from_filename(local_path)
  return url


def upload_dir(local_dir, url):
  """Uploads every file under `local_dir` to gs://bucket/prefix/<relative path>.

  Hidden files and directories are skipped, as `storage.expand` skips them
  when reading a corpus. Returns the gs:// URLs written, sorted.
  """
  if not os.path.isdir(local_dir):
    raise storage.StorageError(f'{local_dir!r} is not a directory.')
  files = local_files(local_dir)
  if not files:
    raise storage.StorageError(f'Directory {local_dir!r} holds no files to upload.')
  bucket, prefix = storage.split_gcs(url)
  client = gcs_client()
  out = []
  with _client_errors(url):
    b = client.bucket(bucket)
    for rel in files:
      name = '/'.join(p for p in (prefix, rel.replace(os.sep, '/')) if p)
      b.blob(name).upload_from_filename(os.path.join(local_dir, rel))
      out.append(f'gs://{bucket}/{name}')
  return out


def list_runs(url):
  """The charlstm runs directly under the gs:// prefix `url`, as sorted gs:// URLs.

  A run is a directory holding the config.json that training writes first.
  """
  bucket, prefix = storage.split_gcs(url)
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
  bucket, prefix = storage.split_gcs(url)
  if not prefix:
    raise storage.StorageError(f'{url!r} is a whole bucket; give the run, gs://{bucket}/RUN.')
  base = prefix + '/'
  client = gcs_client()
  written = []
  with _client_errors(url):
    blobs = [b for b in client.list_blobs(bucket, prefix=base, retry=_retry())
             if not b.name.endswith('/')]  # skip TF's directory placeholders
    if not any(b.name == base + 'config.json' for b in blobs):
      raise storage.StorageError(
          f'{url} holds no charlstm run (no config.json). See '
          f'pipeline.cloud.gcs.list_runs({f"gs://{bucket}"!r}) for the runs there.')
    for blob in blobs:
      local = os.path.join(local_dir, *blob.name[len(base):].split('/'))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      blob.download_to_filename(local, retry=_retry())
      written.append(local)
  return sorted(written)
