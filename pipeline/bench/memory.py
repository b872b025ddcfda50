"""Peak memory against corpus size, for `python -m launch.bench --what=memory`.

Each corpus size runs in fresh processes (loading, the pipeline and a few
train steps), against a tiny corpus that measures TensorFlow's fixed overhead.
BUILD.md ("Memory") explains the layout it measures.
"""

import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import config as config_lib
from pipeline import source
from pipeline import train as train_lib

# Memory: peak RSS of loading a corpus, building the pipeline and training a
# few steps, in a fresh process per corpus size, against a tiny corpus.

MEMORY_SIZES_MB = (1, 10, 100)
_TINY_BYTES = 200_000  # the run that measures the fixed TensorFlow overhead
_VAL_BYTES = 20_000  # every run holds out this much, so evaluation costs the same
_MEMORY_STEPS = 6
_RESULT = 'CHARLSTM_MEMORY '
_STREAMED = 'tfds:char_corpus/bench_memory'  # the streamed run's TFDS config


def write_text_corpus(path, num_bytes, seed=0):
  """Writes `num_bytes` of ASCII text: random words over 74 symbols, fixed by `seed`."""
  rng = np.random.default_rng(seed)
  letters = list('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789')
  words = [''.join(rng.choice(letters, size=int(rng.integers(1, 10)))) for _ in range(3000)]
  gaps = [' '] * 6 + [', ', '. ', '; ', ': ', '! ', '? ', '-', '\n', "'", '(', ')']
  written = 0
  with open(path, 'w', encoding='ascii', newline='') as f:
    while written < num_bytes:
      w = rng.integers(len(words), size=20000)
      g = rng.integers(len(gaps), size=20000)
      text = ''.join(words[a] + gaps[b] for a, b in zip(w, g))[:num_bytes - written]
      f.write(text)
      written += len(text)


def _peak_rss_bytes():
  """This process's peak resident set size (VmHWM)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(config_json, corpus, num_bytes, mode):
  """Runs in a fresh process (see `memory`); prints one result line.

  mode 'load' times loading the corpus alone (source.open_corpus, as
  pipeline.train loads it); mode 'train' runs train_and_evaluate
  for a few steps (load, pipeline, model, train loops, one evaluation).
  'prepare' builds the text at `corpus` into a char_corpus TFDS dataset next
  to it, and 'train_streamed' trains on that with data.tfds_streaming.
  """
  import json  # pylint: disable=g-import-not-at-top
  c = config_lib.from_dict(json.loads(config_json))
  text_path = corpus
  if mode in ('prepare', 'train_streamed'):
    config_lib.override(c, **{'data.corpus': _STREAMED, 'data.tfds_data_dir': corpus + '.tfds',
                              'data.tfds_streaming': True, 'data.mode': 'stream'})
    corpus = _STREAMED
  else:  # the generated text file, loaded
    config_lib.override(c, **{'data.tfds_streaming': False})
  config_lib.override(c, **{
      'data.corpus': corpus, 'data.val_fraction': _VAL_BYTES / num_bytes,
      'train.num_steps': _MEMORY_STEPS, 'train.steps_per_loop': _MEMORY_STEPS // 2,
      'train.log_every': _MEMORY_STEPS // 2, 'train.eval_every': 10 ** 9,
      'train.checkpoint_every': 10 ** 9, 'train.export': False, 'train.sample_length': 10})
  out = {'import_peak': _peak_rss_bytes()}
  t0 = time.perf_counter()
  if mode == 'load':
    source.open_corpus(c.data)
  elif mode == 'prepare':
    module = source._builder_module()  # pylint: disable=protected-access
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = module.CharCorpus(
        config=module.CharCorpusConfig(name=_STREAMED.split('/')[1],
                                       val_fraction=c.data.val_fraction),
        data_dir=c.data.tfds_data_dir)
    manual = text_path + '.manual'  # TFDS reads a directory
    tf.io.gfile.makedirs(manual)
    tf.io.gfile.rename(text_path, f'{manual}/corpus.txt', overwrite=True)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual, try_download_gcs=False))
    finally:
      tf.io.gfile.rename(f'{manual}/corpus.txt', text_path)
  else:
    with tempfile.TemporaryDirectory() as workdir:
      train_lib.train_and_evaluate(c, workdir)
  out['seconds'] = time.perf_counter() - t0
  out['peak'] = _peak_rss_bytes()
  print(_RESULT + json.dumps(out), flush=True)


def _run_memory_child(config, corpus, num_bytes, mode):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys; from pipeline.bench import memory; '
          'memory.memory_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])')
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
  proc = subprocess.run(
      [sys.executable, '-c', code, json.dumps(config_lib.to_json(config)), corpus,
       str(num_bytes), mode], capture_output=True, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f'memory benchmark child ({mode}, {num_bytes} bytes) exited '
                       f'{proc.returncode}:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len(_RESULT):])


def memory(config, sizes_mb=MEMORY_SIZES_MB, repeats=3):
  """Peak RSS per corpus size, minus the fixed overhead, as a ratio to the corpus bytes.

  Each corpus (generated text, `write_text_corpus`) runs in fresh processes:
  'load' (source.open_corpus alone) and 'train' (train_and_evaluate for a few steps
  with the config's model and batch). The fixed overhead is the same run on a
  200 kB corpus. The largest size is also trained with
  runtime.deterministic=False, which skips tf.data's make_deterministic
  rewrite and the copy of the ids it makes, and prepared as a TFDS dataset
  (its 'load' columns are then `prepare`) and trained with
  data.tfds_streaming, which never holds the text. The peak of a train run varies by
  up to 50 MB from run to run (TensorFlow's threads and allocators only add),
  so each run is repeated and the lowest peak is reported, with the spread.

  Returns:
    A list of dicts, one per run.
  """
  c = config_lib.finalize(config)
  runs = [('fixed', _TINY_BYTES, True)] + [(f'{mb:g} MB', int(mb * 1e6), True)
                                            for mb in sizes_mb]
  biggest = int(max(sizes_mb) * 1e6)
  runs.append((f'{max(sizes_mb):g} MB, deterministic=False', biggest, False))
  runs.append((f'{max(sizes_mb):g} MB, TFDS streamed', biggest, True))
  rows, fixed = [], {}
  with tempfile.TemporaryDirectory(prefix='charlstm-memory-') as tmp:
    for label, num_bytes, deterministic in runs:
      path = f'{tmp}/corpus-{num_bytes}.txt'
      if not tf.io.gfile.exists(path):
        write_text_corpus(path, num_bytes)
      run_config = config_lib.override(config_lib.from_dict(config_lib.to_json(c)),
                                       **{'runtime.deterministic': deterministic})
      row = {'run': label, 'corpus_bytes': num_bytes}
      streamed = label.endswith('streamed')
      for mode in ('load', 'train'):
        child_mode = {'load': 'prepare', 'train': 'train_streamed'}[mode] if streamed else mode
        results = [_run_memory_child(run_config, path, num_bytes, child_mode)
                   for _ in range(1 if child_mode == 'prepare' else repeats)]
        peaks = sorted(r['peak'] for r in results)
        peak = float(peaks[0])
        row[f'{mode}_seconds'] = float(np.median([r['seconds'] for r in results]))
        row[f'{mode}_peak'] = peak
        row[f'{mode}_spread'] = peaks[-1] - peaks[0]
        if label == 'fixed':
          fixed[mode] = peak
        row[f'{mode}_over_fixed'] = peak - fixed[mode]
        row[f'{mode}_ratio'] = row[f'{mode}_over_fixed'] / num_bytes
        logging.info('memory %s %s: peaks %s MB', label, mode,
                     ', '.join(f'{x / 1e6:.1f}' for x in peaks))
      rows.append(row)
  return rows


def format_table(rows):
  """The rows of `memory` as the text table launch.bench prints.

  Peak RSS in MB (1e6 bytes), the lowest of the repeats; '+MB' is above the
  fixed run, 'x' that over the corpus bytes, 'spread' the repeats' max - min.
  """
  lines = [f'{"run":30s} {"corpus MB":>9s} {"load s":>6s} {"load peak":>9s} {"+MB":>6s} '
           f'{"x":>5s} {"train s":>7s} {"train peak":>10s} {"spread":>6s} {"+MB":>6s} {"x":>5s}']
  for r in rows:
    lines.append(f'{r["run"]:30s} {r["corpus_bytes"] / 1e6:9.1f} {r["load_seconds"]:6.2f} '
                 f'{r["load_peak"] / 1e6:9.1f} {r["load_over_fixed"] / 1e6:6.1f} '
                 f'{r["load_ratio"]:5.2f} {r["train_seconds"]:7.1f} '
                 f'{r["train_peak"] / 1e6:10.1f} {r["train_spread"] / 1e6:6.1f} '
                 f'{r["train_over_fixed"] / 1e6:6.1f} {r["train_ratio"]:5.2f}')
  return '\n'.join(lines)


def run(config, sizes_mb=MEMORY_SIZES_MB):
  """launch.bench --what=memory: measures (`memory`) and prints the table."""
  rows = memory(config, sizes_mb)
  print(format_table(rows), flush=True)
  return rows
