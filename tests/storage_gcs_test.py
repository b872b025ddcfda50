"""pipeline/storage.py and pipeline/cloud/gcs.py against a real local GCS: fake-gcs-server.

google-cloud-storage (pipeline/cloud/gcs.py) runs in this process
(STORAGE_EMULATOR_HOST; tests/gcs_emulator.py). TensorFlow's gs:// filesystem
(pipeline/storage.py) runs in child processes, which reach the emulator
through the TLS proxy (`GcsEmulator.tf_env`). The jobs are started as users
start them: `python -m launch.train/export/sample` with gs:// paths.
"""

import gzip
import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline import storage
from pipeline.cloud import gcs as gcs_lib
from tests import gcs_emulator
from tests.conftest import CHILD_ENV, ROOT, error_lines

BUCKET = 'charlstm-test'


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """fake-gcs-server + TLS proxy for the session; this process uses it through the client env."""
  with gcs_emulator.serving(tmp_path_factory.mktemp('gcs'), BUCKET) as emulator:
    yield emulator


def _client():
  return gcs_lib.gcs_client()


def _names(prefix):
  return sorted(b.name for b in _client().list_blobs(BUCKET, prefix=prefix))


def _run_tf(gcs, args, timeout=240, check=True):
  """Runs `python args...` with the TF-to-emulator environment; returns CompletedProcess."""
  env = dict(CHILD_ENV, **gcs.tf_env())
  start = time.monotonic()
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  label = ' '.join(args[:2]) if args[0] == '-m' else 'python -c <script>'
  print(f'{label} took {time.monotonic() - start:.1f} s')  # shown with -s or on failure
  if check and proc.returncode != 0:
    raise AssertionError(f'{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n'
                         f'proxy log tail: {gcs.proxy.log[-10:]}')
  return proc


# --- google-cloud-storage (pipeline/cloud/gcs.py), in process ------------------

def test_create_bucket_is_idempotent_and_check_bucket_finds_it(gcs):
  assert gcs_lib.create_bucket('gs://charlstm-made-here') is True
  assert gcs_lib.create_bucket('charlstm-made-here') is False
  assert gcs_lib.check_bucket('gs://charlstm-made-here/any/path') == 'charlstm-made-here'
  assert 'charlstm-made-here' in [b.name for b in _client().list_buckets()]


def test_missing_bucket_is_a_one_line_error(gcs):
  with pytest.raises(storage.GcsBucketNotFoundError) as e:
    gcs_lib.check_bucket('gs://no-such-bucket/runs')
  message = str(e.value)
  assert 'gs://no-such-bucket does not exist' in message and '\n' not in message
  assert 'gcloud storage buckets create gs://no-such-bucket' in message
  with pytest.raises(storage.GcsBucketNotFoundError):
    gcs_lib.upload_dir(str(ROOT / 'configs'), 'gs://no-such-bucket/x')
  with pytest.raises(storage.GcsBucketNotFoundError):
    gcs_lib.list_runs('gs://no-such-bucket/runs')


def test_bad_bucket_name_is_refused_before_any_request(gcs):
  with pytest.raises(storage.StorageError, match='does not name a GCS bucket'):
    gcs_lib.create_bucket('gs://Upper_Case!')


def test_upload_dir_skips_hidden_files(gcs, tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.txt').write_text('alpha')
  (tmp_path / 'sub' / 'b.txt').write_text('beta')
  (tmp_path / '.hidden').write_text('no')
  (tmp_path / '.git').mkdir()
  (tmp_path / '.git' / 'HEAD').write_text('no')
  urls = gcs_lib.upload_dir(str(tmp_path), f'gs://{BUCKET}/corpora/mine')
  assert urls == [f'gs://{BUCKET}/corpora/mine/a.txt', f'gs://{BUCKET}/corpora/mine/sub/b.txt']
  blob = _client().bucket(BUCKET).blob('corpora/mine/sub/b.txt')
  assert blob.download_as_bytes() == b'beta'


def test_list_runs_and_download_run(gcs, tmp_path):
  bucket = _client().bucket(BUCKET)
  for name, data in {'runs/r1/config.json': b'{"a": 1}', 'runs/r1/vocab.json': b'{}',
                     'runs/r1/checkpoints/ckpt-5.index': b'idx',
                     'runs/r1/checkpoints/': b'',  # a directory placeholder, as TF writes
                     'runs/r2/config.json': b'{}',
                     'runs/notarun/loss.svg': b'<svg/>',
                     'runs/r3/nested/config.json': b'{}'}.items():
    bucket.blob(name).upload_from_string(data)
  assert gcs_lib.list_runs(f'gs://{BUCKET}/runs') == [f'gs://{BUCKET}/runs/r1',
                                                      f'gs://{BUCKET}/runs/r2']
  assert gcs_lib.list_runs(f'gs://{BUCKET}/runs/') == gcs_lib.list_runs(f'gs://{BUCKET}/runs')
  assert gcs_lib.list_runs(f'gs://{BUCKET}/nothing-here') == []

  out = tmp_path / 'r1'
  paths = gcs_lib.download_run(f'gs://{BUCKET}/runs/r1', str(out))
  assert paths == sorted(str(out / p) for p in
                         ('config.json', 'vocab.json', 'checkpoints/ckpt-5.index'))
  assert (out / 'checkpoints' / 'ckpt-5.index').read_bytes() == b'idx'
  assert json.loads((out / 'config.json').read_text()) == {'a': 1}

  with pytest.raises(storage.StorageError, match='holds no charlstm run'):
    gcs_lib.download_run(f'gs://{BUCKET}/runs/notarun', str(tmp_path / 'x'))


class _Forbidden(http.server.BaseHTTPRequestHandler):
  """Answers every request as GCS does when the account lacks a permission."""

  def _deny(self):
    body = json.dumps({'error': {'code': 403, 'message':
                                 'tester@example.com does not have storage.objects.list '
                                 'access to the Google Cloud Storage bucket.'}}).encode()
    self.send_response(403)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = _deny

  def log_message(self, *args):
    pass


def test_permission_denied_is_a_one_line_error(gcs, monkeypatch):
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Forbidden)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{server.server_address[1]}')
    with pytest.raises(storage.GcsPermissionError) as e:
      gcs_lib.list_runs(f'gs://{BUCKET}/runs')
  finally:
    server.shutdown()
    server.server_close()
  message = str(e.value)
  assert message.startswith(f'Permission denied on gs://{BUCKET}/runs')
  assert 'storage.objects.list' in message and 'roles/storage.objectAdmin' in message
  assert '\n' not in message


# --- TensorFlow's gs:// through the TLS proxy, in child processes ---------------

def test_gfile_round_trip_through_the_tls_proxy(gcs):
  script = textwrap.dedent(f'''
      import json, tensorflow as tf
      from pipeline import storage
      g, root = tf.io.gfile, 'gs://{BUCKET}/gfile'
      out = {{}}
      storage.write_json(root + '/a/cfg.json', {{'é': [1, 2]}})
      out['json'] = storage.read_json(root + '/a/cfg.json')
      storage.write_bytes_atomic(root + '/a/big.bin', bytes(range(256)) * 8192)  # 2 MiB
      out['big'] = len(storage.read_bytes(root + '/a/big.bin'))
      with g.GFile(root + '/a/c.txt.gz', 'wb') as f:
        import gzip; f.write(gzip.compress('gz text'.encode()))
      out['gz'] = storage.read_bytes(root + '/a/c.txt.gz').decode()
      out['expand'] = storage.expand(root + '/a/*.json') + storage.expand(root + '/a')
      storage.makedirs(root + '/new/dir')
      out['isdir'] = g.isdir(root + '/new/dir')
      storage.write_json(root + '/staging/x.json', 1)
      storage.replace_dir(root + '/staging', root + '/final')
      out['listdir'] = sorted(g.listdir(root))
      storage.copy(root + '/final/x.json', root + '/copy.json')
      storage.rmtree(root + '/final')
      out['after_rmtree'] = [storage.exists(root + '/final/x.json'), storage.exists(root + '/copy.json')]
      try:
        storage.exists('gs://no-such-bucket/run')
      except storage.GcsBucketNotFoundError as e:
        out['missing'] = str(e)
      print(json.dumps(out))
  ''')
  proc = _run_tf(gcs, ['-c', script])
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['json'] == {'é': [1, 2]}
  assert out['big'] == 2 * 1024 * 1024
  assert out['gz'] == 'gz text'
  assert out['expand'] == [f'gs://{BUCKET}/gfile/a/cfg.json'] + [
      f'gs://{BUCKET}/gfile/a/{n}' for n in ('big.bin', 'c.txt.gz', 'cfg.json')]
  assert out['isdir'] is True
  assert out['listdir'] == ['a/', 'final/', 'new/']
  assert out['after_rmtree'] == [False, True]
  assert out['missing'].startswith('Bucket gs://no-such-bucket does not exist')
  # The client sees what TF wrote, and no temporary or moved-aside objects are left.
  names = _names('gfile/')
  assert 'gfile/a/cfg.json' in names and 'gfile/copy.json' in names
  assert not [n for n in names if '.tmp-' in n or '.old-' in n or n.startswith('gfile/final')]
  # TF's requests really went through the proxy, to both intercepted hosts.
  hosts = {entry[1] for entry in gcs.proxy.log}
  assert set(gcs_emulator.INTERCEPTED_HOSTS) <= hosts


def test_train_export_sample_with_gs_workdir_and_corpus(gcs, tmp_path):
  corpus_dir = tmp_path / 'corpus'
  corpus_dir.mkdir()
  (corpus_dir / 'tinyshakespeare.txt').write_bytes(
      gzip.decompress((ROOT / 'data' / 'tinyshakespeare.txt.gz').read_bytes()))
  gcs_lib.upload_dir(str(corpus_dir), f'gs://{BUCKET}/corpus')
  workdir = f'gs://{BUCKET}/trained/smoke'

  _run_tf(gcs, ['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
                f'--workdir={workdir}',
                f'--config.data.corpus=gs://{BUCKET}/corpus/tinyshakespeare.txt',
                '--config.train.num_steps=20', '--config.train.log_every=10',
                '--config.train.eval_every=10', '--config.train.checkpoint_every=10',
                '--config.data.val_fraction=0.002'])
  run = 'trained/smoke/'
  names = set(_names(run))
  for needed in ('config.json', 'vocab.json', 'history.json', 'loss.svg',
                 'checkpoints/checkpoint', 'checkpoints/ckpt-10.index',
                 'checkpoints/ckpt-20.index', 'checkpoints/vocab.json',
                 'best/checkpoint', 'export/saved_model.pb', 'export/assets/vocab.json',
                 'export/assets/config.json'):
    assert run + needed in names, needed
  assert any(n.startswith(run + 'checkpoints/ckpt-20.data-') for n in names)
  assert any(n.startswith(run + 'export/variables/variables.data-') for n in names)
  for sub in ('train', 'eval'):
    assert any(n.startswith(f'{run}tb/{sub}/events.out.tfevents.') for n in names)
  assert not [n for n in names if '.tmp-' in n or '.old-' in n]
  config = json.loads(_client().bucket(BUCKET).blob(run + 'config.json').download_as_bytes())
  assert config['data']['corpus'] == f'gs://{BUCKET}/corpus/tinyshakespeare.txt'
  assert gcs_lib.list_runs(f'gs://{BUCKET}/trained') == [workdir]

  # Re-export the best checkpoint to another gs:// directory, then sample from both.
  _run_tf(gcs, ['-m', 'launch.export', f'--workdir={workdir}', '--checkpoint=best',
                f'--export_dir={workdir}/export_best'])
  assert run + 'export_best/saved_model.pb' in _names(run + 'export_best/')
  proc = _run_tf(gcs, ['-m', 'launch.sample', f'--saved_model={workdir}/export',
                       '--prompt=ROMEO:', '--length=60', '--seed=3', '--num_samples=2'])
  samples = proc.stdout.split('-' * 40)
  assert len(samples) == 2 and all(s.strip().startswith('ROMEO:') for s in samples)
  assert all(len(s.strip()) >= len('ROMEO:') + 40 for s in samples)  # newlines may trail
  sample_log = [e for e in gcs.proxy.log if 'export' in e[2]]
  assert sample_log, 'the sampler did not read the export from gs://'


def test_job_on_a_missing_bucket_is_a_one_line_error(gcs):
  proc = _run_tf(gcs, ['-m', 'launch.sample', '--saved_model=gs://no-such-bucket/export',
                       '--prompt=A'], check=False)
  assert proc.returncode == 2, proc.stderr
  assert error_lines(proc.stderr) == [
      'charlstm: error: Bucket gs://no-such-bucket does not exist (from '
      'gs://no-such-bucket/export). Create it with `gcloud storage buckets create '
      "gs://no-such-bucket` or pipeline.cloud.gcs.create_bucket('no-such-bucket'), "
      'or fix the path.']


# --- no credentials: one line, bounded time -----------------------------------

def _env_without_credentials(tmp_path, metadata_port):
  env = {k: v for k, v in CHILD_ENV.items()
         if not k.startswith(('GOOGLE_', 'GCE_', 'STORAGE_EMULATOR', 'CLOUDSDK', 'CHARLSTM_GCS'))
         and k.upper() not in ('NO_GCE_CHECK', 'HTTPS_PROXY', 'CURL_CA_BUNDLE')}
  # A metadata "server" that accepts connections and never answers: the worst
  # case off Google Cloud, where a plain TF would retry it for a long time.
  env.update(HOME=str(tmp_path), GCE_METADATA_HOST=f'127.0.0.1:{metadata_port}')
  return env


@pytest.fixture
def silent_metadata_server():
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  sock.listen(16)
  yield sock.getsockname()[1]
  sock.close()


def test_gs_path_without_credentials_fails_fast_with_one_line(tmp_path, silent_metadata_server):
  env = _env_without_credentials(tmp_path, silent_metadata_server)
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.sample', '--saved_model=gs://some-bucket/run/export',
       '--prompt=A'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  elapsed = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('charlstm: error: gs://some-bucket/run/export needs Google '
                             'Cloud credentials and none were found')
  for hint in ('GOOGLE_APPLICATION_CREDENTIALS', 'gcloud auth application-default login',
               'within 3 s', 'NO_GCE_CHECK=true'):
    assert hint in lines[0]
  assert elapsed < 20, f'took {elapsed:.1f} s'


def test_client_without_credentials_fails_fast_in_process(tmp_path, monkeypatch,
                                                          silent_metadata_server):
  for k in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'NO_GCE_CHECK', 'CLOUDSDK_CONFIG',
            storage.ANONYMOUS_ENV):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv('GCE_METADATA_HOST', f'127.0.0.1:{silent_metadata_server}')
  monkeypatch.setenv('GCE_METADATA_TIMEOUT', '1')
  monkeypatch.setattr(storage, '_credentials', None)
  start = time.monotonic()
  with pytest.raises(storage.GcsCredentialsError) as e:
    gcs_lib.check_bucket('gs://some-bucket')
  assert time.monotonic() - start < 5
  assert 'within 1 s' in str(e.value) and '\n' not in str(e.value)
  assert os.environ['NO_GCE_CHECK'] == 'true'  # so TF and google-auth skip the wait too
  # A key file that is named but missing is reported as such.
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(tmp_path / 'key.json'))
  with pytest.raises(storage.GcsCredentialsError, match='key.json'):
    storage.gcs_credentials('gs://some-bucket')
