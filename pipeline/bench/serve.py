"""`python -m launch.bench --what=serve`: what batching buys through the real HTTP server.

Starts `python -m launch.serve` on 127.0.0.1 (a subprocess, as users run it)
and measures the total characters per second that N concurrent clients get,
each asking for `chars` characters per request (JSON, not streamed) back to
back, for N in `clients` (1 first: the baseline). As in the speed table the
cases take turns round by round (the machine is shared) and each ratio is
the median over rounds of the ratio within a round.

Without --saved_model it exports a freshly initialised model of the asked
size (sampling costs the same, trained or not) on the --config corpus's
vocabulary. Clients are stdlib http.client threads: they only wait on
sockets, so one Python process drives dozens without being the bottleneck.
"""

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import pipeline
from pipeline import export as export_lib
from pipeline import model as model_lib
from pipeline import source

TARGET = (32, 4.0)  # 32 clients get >= 4x one client's total chars/s


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _request(port, body):
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
  try:
    conn.request('POST', '/v1/generate', json.dumps(body),
                 {'Content-Type': 'application/json'})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
      raise RuntimeError(f'HTTP {r.status}: {data[:200]!r}')
    return json.loads(data)
  finally:
    conn.close()


def _start(saved_model, port, max_batch, log):
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, '-m', 'launch.serve', f'--saved_model={saved_model}', f'--port={port}',
       f'--max_batch={max_batch}'], cwd=pipeline.ROOT, stdout=log, stderr=subprocess.STDOUT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'launch.serve exited {proc.returncode}; see {log.name}')
    try:
      conn = http.client.HTTPConnection('127.0.0.1', port, timeout=2)
      conn.request('GET', '/healthz')
      if conn.getresponse().status == 200:
        return proc
    except OSError:
      time.sleep(0.2)
  proc.kill()
  raise RuntimeError(f'launch.serve not ready in 180 s; see {log.name}')


def measure(port, clients, chars, seconds, seed0):
  """Total chars/s and request latencies of `clients` threads, each requesting back to back."""
  latencies, got, errors = [], [0] * clients, []
  stop_at = time.perf_counter() + seconds

  def loop(i):
    n = 0
    while time.perf_counter() < stop_at:
      start = time.perf_counter()
      try:
        out = _request(port, {'prompt': 'ROMEO:', 'num_chars': chars, 'temperature': 0.8,
                              'seed': seed0 + i * 100000 + n})
      except (OSError, RuntimeError) as e:
        errors.append(repr(e))
        return
      latencies.append(time.perf_counter() - start)
      got[i] += out['chars']
      n += 1

  threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start  # includes finishing the last requests
  if errors:
    raise RuntimeError(f'{len(errors)} failed request(s), e.g. {errors[0]}')
  return sum(got) / wall, latencies


def _export_fresh(config, hidden, layers, directory):
  corpus = source.open_corpus(config.data)
  models = model_lib.build(corpus.vocab.size, hidden, layers, config.data.seq_length,
                           use_cudnn=False)
  return export_lib.export_models(models, corpus.vocab, os.path.join(directory, 'export'))


def run(config, saved_model=None, hidden=256, layers=1, clients=(1, 8, 32), chars=200,
        rounds=5, seconds=3.0, json_path=None):
  """Measures, prints the table and the target line; returns the result dict."""
  clients = sorted(set(clients) | {1})
  with tempfile.TemporaryDirectory(prefix='charlstm-bench-serve-') as tmp:
    what = saved_model or f'a freshly initialised {layers} x LSTM({hidden})'
    saved_model = saved_model or _export_fresh(config, hidden, layers, tmp)
    port = _free_port()
    with open(os.path.join(tmp, 'serve.log'), 'w+', encoding='utf-8') as log:
      proc = _start(saved_model, port, max(64, max(clients)), log)
      try:
        info = json.loads(_get(port, '/v1/model'))
        measure(port, max(clients), chars, 1.0, 0)  # warm-up: every batch size seen once
        rates = {n: [] for n in clients}
        lat = {n: [] for n in clients}
        for r in range(rounds):
          order = clients[r % len(clients):] + clients[:r % len(clients)]
          for n in order:
            rate, latencies = measure(port, n, chars, seconds, (r + 1) * 10**7)
            rates[n].append(rate)
            lat[n] += latencies
        stats = json.loads(_get(port, '/healthz'))
      finally:
        proc.terminate()
        proc.wait(timeout=30)
  rows = []
  for n in clients:
    ratio = float(np.median(np.array(rates[n]) / np.array(rates[1])))
    q = statistics.quantiles(lat[n], n=100) if len(lat[n]) > 1 else [lat[n][0]] * 99
    rows.append({'clients': n, 'median': float(np.median(rates[n])),
                 'min': float(np.min(rates[n])), 'max': float(np.max(rates[n])),
                 'ratio': ratio, 'requests': len(lat[n]), 'p50_ms': q[49] * 1000,
                 'p99_ms': q[98] * 1000})
  result = {'saved_model': what, 'hidden': info['hidden_size'],
            'layers': info['num_layers'], 'vocab': info['vocab_size'], 'chars': chars,
            'rounds': rounds, 'seconds': seconds, 'batching': info['batching'],
            'rows': rows, 'server_stats': stats}
  n, minimum = TARGET
  by_clients = {r['clients']: r for r in rows}
  if n in by_clients:
    result['target'] = {'clients': n, 'minimum': minimum, 'value': by_clients[n]['ratio'],
                        'met': by_clients[n]['ratio'] >= minimum}
  print(format_table(result), flush=True)
  if json_path:
    with open(json_path, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  return result


def _get(port, path):
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
  conn.request('GET', path)
  return conn.getresponse().read()


def format_table(result):
  b = result['batching']
  lines = [f"serve: {result['layers']} x LSTM({result['hidden']}), V={result['vocab']}, "
           f"{result['chars']} chars per request (JSON), window {b['window_ms']:g} ms, "
           f"chunks of {b['chunk_chars']}, batch <= {b['max_rows']} rows; "
           f"{result['rounds']} interleaved rounds of {result['seconds']:g} s per case",
           'ratio: median over rounds of (N clients\' chars/s) / (1 client\'s) in that round',
           f"{'clients':>8s} {'chars/s median':>15s} {'min':>9s} {'max':>9s} {'ratio':>7s} "
           f"{'requests':>9s} {'p50 ms':>8s} {'p99 ms':>8s}"]
  for r in result['rows']:
    lines.append(f"{r['clients']:8d} {r['median']:15,.0f} {r['min']:9,.0f} {r['max']:9,.0f} "
                 f"{r['ratio']:6.2f}x {r['requests']:9d} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f}")
  s = result['server_stats']
  lines.append(f"server: {s['extend_calls']} batch steps, largest batch {s['max_batch_rows']} "
               f"rows, largest prime {s['max_prime_rows']} rows")
  if 'target' in result:
    t = result['target']
    lines.append(f"target: {t['clients']} clients >= {t['minimum']:g} x 1 client: "
                 f"{t['value']:.2f}  {'met' if t['met'] else 'NOT MET'}")
  return '\n'.join(lines)
