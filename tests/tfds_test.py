"""The char_corpus TFDS builder (data/char_corpus) and `data.corpus=tfds:...` in training.

Every build here is real (TFDS writes tfrecords into tmp_path) and offline.
"""

import socket
import sys

import numpy as np
import pytest

from conftest import CHILD_ENV, ROOT, error_lines, run
from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import source
from pipeline import text as text_lib

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

SHAKESPEARE = config_lib.bundled('tinyshakespeare.txt.gz')
TFDS_SHAKESPEARE = 'tfds:char_corpus/tinyshakespeare'

# Runs launch.prepare with Python-level internet sockets refused (and logged),
# on top of the dead proxy and NO_GCE_CHECK in the environment, which cover
# TensorFlow's C++ (curl) file systems and google-auth's metadata probe.
_NO_NETWORK = r'''
import runpy, socket, sys
_connect = socket.socket.connect
def _refuse(self, address):
  if self.family in (socket.AF_INET, socket.AF_INET6):
    sys.stderr.write(f'NETWORK ATTEMPT {address}\n')
    raise OSError('network disabled in this test')
  return _connect(self, address)
socket.socket.connect = _refuse
sys.argv = ['launch.prepare'] + sys.argv[1:]
runpy.run_module('launch.prepare', run_name='__main__', alter_sys=True)
'''


def _closed_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]  # nothing listens on it once closed


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """tinyshakespeare prepared by `python -m launch.prepare` in a process without network."""
  data_dir = tmp_path_factory.mktemp('tfds')
  proxy = f'http://127.0.0.1:{_closed_port()}'
  env = dict(CHILD_ENV, HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy,
             https_proxy=proxy, NO_GCE_CHECK='true', NO_PROXY='', no_proxy='',
             TFDS_DATA_DIR=str(data_dir / 'not_used'))
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, '-c', _NO_NETWORK, '--dataset=char_corpus/tinyshakespeare',
       f'--data_dir={data_dir}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return data_dir, proc


def test_builds_offline(prepared):
  data_dir, proc = prepared
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'NETWORK ATTEMPT' not in proc.stderr, proc.stderr[-3000:]
  builder_dir = data_dir / 'char_corpus' / 'tinyshakespeare' / '1.0.0'
  assert f'Prepared {builder_dir}' in proc.stdout
  assert '--config.data.corpus=tfds:char_corpus/tinyshakespeare' in proc.stdout
  assert sorted(p.name for p in builder_dir.glob('*.tfrecord*')) == [
      'char_corpus-train.tfrecord-00000-of-00001',
      'char_corpus-validation.tfrecord-00000-of-00001']
  assert not (data_dir / 'not_used').exists()


def _examples(builder_dir, split):
  builder = tfds.builder_from_directory(builder_dir)
  assert builder.info.disable_shuffling
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return [(int(ex['index']), ex['text'].decode('utf-8')) for ex in tfds.as_numpy(ds)]


def _assert_in_order(builder_dir, text, val_fraction=0.05):
  train, val = corpus_lib.split(text, val_fraction)
  for split, want in (('train', train), ('validation', val)):
    examples = _examples(builder_dir, split)
    assert [i for i, _ in examples] == list(range(len(examples)))
    assert all(len(t) == 1 << 16 for _, t in examples[:-1])
    assert ''.join(t for _, t in examples) == want, split


def test_examples_in_text_order(prepared):
  data_dir, _ = prepared
  builder_dir = data_dir / 'char_corpus' / 'tinyshakespeare' / '1.0.0'
  assert len(_examples(builder_dir, 'train')) == 17  # 1,059,624 chars in 65,536-char examples
  _assert_in_order(builder_dir, text_lib.read_text(SHAKESPEARE))


def test_quijote_in_text_order(tmp_path):
  builder_dir = source.prepare('char_corpus/quijote', str(tmp_path))
  _assert_in_order(builder_dir, text_lib.read_text(config_lib.bundled('quijote.txt.gz')))


def test_custom_from_manual_dir(tmp_path):
  manual = tmp_path / 'texts'
  manual.mkdir()
  # NFD "é" (e + U+0301) must come out NFC; b.txt sorts after a.txt.
  (manual / 'b.txt').write_text('Second file, cafe\u0301 ñ.\n' * 2000, encoding='utf-8')
  (manual / 'a.txt').write_text('First file: ß → ∑ 文字\n' * 2000, encoding='utf-8')
  (manual / '.hidden').write_text('skipped', encoding='utf-8')
  data_dir = tmp_path / 'tfds'
  builder_dir = source.prepare('char_corpus/custom', str(data_dir), str(manual))
  assert builder_dir == str(data_dir / 'char_corpus' / 'custom' / '1.0.0')
  text = text_lib.read_text(str(manual))
  assert 'First file' in text.split('\n')[0] and 'café' in text and 'skipped' not in text
  assert len(text) > 1 << 16  # more than one train example
  _assert_in_order(builder_dir, text)
  train, val = source.read_splits('tfds:char_corpus/custom', str(data_dir), 0.05)
  assert train + val == text


def _open_corpus(path, val_fraction, seq_length, **data):
  """source.open_corpus, the entry training uses, for a data section with these keys."""
  d = config_lib.base_config().data
  d.update(corpus=path, val_fraction=val_fraction, seq_length=seq_length, **data)
  return source.open_corpus(d)


@pytest.mark.parametrize('val_fraction', [0.05, 0.01])
def test_training_ids_match_text_path(prepared, val_fraction):
  data_dir, _ = prepared
  via_tfds = _open_corpus(TFDS_SHAKESPEARE, val_fraction, 100, tfds_data_dir=str(data_dir))
  via_text = corpus_lib.load(SHAKESPEARE, val_fraction, 100)
  assert via_tfds.vocab == via_text.vocab
  assert via_tfds.train.dtype == via_text.train.dtype
  np.testing.assert_array_equal(via_tfds.train, via_text.train)
  np.testing.assert_array_equal(via_tfds.val, via_text.val)


def test_same_first_batches(prepared):
  from pipeline import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir, _ = prepared
  batches = []
  for path, kw in ((TFDS_SHAKESPEARE, {'tfds_data_dir': str(data_dir)}), (SHAKESPEARE, {})):
    c = _open_corpus(path, 0.05, 32, **kw)
    layout = data_lib.make_layout(len(c.train), 32, 8, 'shuffle')
    ds = data_lib.make_dataset(c.train, c.vocab.size, layout, seed=3, num_steps=3)
    batches.append([{k: v.numpy() for k, v in b.items()} for b in ds])
  assert len(batches[0]) == len(batches[1]) == 3
  for got, want in zip(*batches):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_missing_dataset_is_one_line_error(tmp_path):
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path / "run"}', f'--config.data.corpus={TFDS_SHAKESPEARE}',
              f'--config.data.tfds_data_dir={tmp_path / "empty"}'], check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "TFDS dataset 'char_corpus/tinyshakespeare' is not prepared in" in lines[0]
  assert ('python -m launch.prepare --dataset=char_corpus/tinyshakespeare '
          f'--data_dir={tmp_path / "empty"}') in lines[0]


# data.tfds_streaming: shards read while training, the text never loaded.

TFDS_SMALL = 'tfds:char_corpus/tinyshakespeare_4k'


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  """tinyshakespeare in 4,096-char examples and 3 shards per split, so each
  stream of a batch crosses example and shard ends."""
  data_dir = tmp_path_factory.mktemp('tfds_sharded')
  module = source._builder_module()  # pylint: disable=protected-access
  config = module.CharCorpusConfig(name='tinyshakespeare_4k', source='tinyshakespeare.txt.gz',
                                   chars_per_example=4096)
  builder = module.CharCorpus(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, num_shards=3))
  return str(data_dir)


def test_streaming_reads_metadata_not_text(sharded):
  vocab, train, val = source.open_streaming(TFDS_SMALL, sharded, 0.05)
  loaded = corpus_lib.load(SHAKESPEARE, 0.05, 100)
  assert vocab == loaded.vocab
  assert (len(train), len(val)) == (len(loaded.train), len(loaded.val))
  assert len(train.files) == len(val.files) == 3
  assert sum(train.shard_examples) == -(-len(loaded.train) // 4096)


@pytest.mark.parametrize('split', ['train', 'val'])
@pytest.mark.parametrize('where', ['start', 'epoch_end', 'second_pipeline'])
def test_streamed_batches_match_loaded(sharded, split, where):
  from pipeline import data as data_lib  # pylint: disable=g-import-not-at-top
  vocab, *streamed = source.open_streaming(TFDS_SMALL, sharded, 0.05)
  loaded = corpus_lib.load(SHAKESPEARE, 0.05, 100)
  split_src, ids = (streamed[0], loaded.train) if split == 'train' else (streamed[1], loaded.val)
  layout = data_lib.make_layout(len(ids), 50, 8, 'stream')
  start, ctx = {'start': (0, None),
                # crosses into the next epoch, where every row starts again
                'epoch_end': (layout.steps_per_epoch - 2, None),
                # resumed mid-epoch, feeding only the second of two pipelines
                'second_pipeline': (7, tf.distribute.InputContext(2, 1, 2))}[where]
  kw = dict(seed=1, start_step=start, num_steps=start + 4, reset_prob=0.3)
  want = list(data_lib.make_dataset(ids, vocab.size, layout, ctx, **kw).as_numpy_iterator())
  got = list(data_lib.make_dataset(split_src, vocab.size, layout, ctx, streamed=True,
                                   **kw).as_numpy_iterator())
  assert len(got) == len(want) == 4
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def _streaming_config(**data):
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  c = shakespeare.get_config('smoke')
  c.data.mode = 'stream'
  c.data.val_fraction = 0.05
  c.train.num_steps = 20
  c.train.eval_every = 20
  c.train.checkpoint_every = 20
  c.train.export = False
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def test_streamed_training_matches_loaded(sharded, tmp_path):
  from pipeline import train  # pylint: disable=g-import-not-at-top
  streamed = train.train_and_evaluate(
      _streaming_config(corpus=TFDS_SMALL, tfds_data_dir=sharded, tfds_streaming=True),
      str(tmp_path / 'streamed'))
  loaded = train.train_and_evaluate(_streaming_config(), str(tmp_path / 'loaded'))
  assert streamed['step'] == loaded['step'] == 20
  assert streamed['weights_digest'] == loaded['weights_digest']
  assert streamed['val_loss'] == loaded['val_loss']
  assert corpus_lib.Vocab.load(str(tmp_path / 'streamed' / corpus_lib.VOCAB_FILE)) == \
      corpus_lib.Vocab.load(str(tmp_path / 'loaded' / corpus_lib.VOCAB_FILE))


@pytest.mark.parametrize('flags, message', [
    (['--config.data.mode=shuffle'],
     'data.tfds_streaming reads each row of the batch as one contiguous stream'),
    (['--config.data.mode=stream', '--config.data.val_fraction=0.1'],
     'was split with val_fraction=0.05; a streamed corpus keeps its prepared splits. '
     'Use --config.data.val_fraction=0.05'),
])
def test_streaming_bad_config_is_one_line_error(sharded, tmp_path, flags, message):
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path / "run"}', f'--config.data.corpus={TFDS_SMALL}',
              f'--config.data.tfds_data_dir={sharded}', '--config.data.tfds_streaming=true',
              *flags], check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
  assert not list((tmp_path / 'run').glob('checkpoints/*'))


def test_prepare_bad_input_names_the_fix(tmp_path):
  text = tmp_path / 'one.txt'
  text.write_text('some text\n' * 100, encoding='utf-8')
  with pytest.raises(corpus_lib.CorpusError, match='is a file; TFDS reads a directory'):
    source.prepare('char_corpus/custom', str(tmp_path / 'tfds'), str(text))
  with pytest.raises(corpus_lib.CorpusError,
                     match=r'Cannot cut char_corpus/tinyshakespeare into 5 shards.*lower '
                           r'--num_shards'):
    source.prepare('char_corpus/tinyshakespeare', str(tmp_path / 'tfds'), num_shards=5)
  # TFDS writes into an incomplete.* directory and drops it on failure.
  assert not list((tmp_path / 'tfds' / 'char_corpus').glob('*/*1.0.0*'))


def test_streamed_batches_have_fully_static_shapes(sharded):
  # A TPU compiles for one shape: a dynamic time dimension would be rejected or padded.
  from pipeline import data as data_lib  # pylint: disable=g-import-not-at-top
  vocab, train, _ = source.open_streaming(TFDS_SMALL, sharded, 0.05)
  layout = data_lib.make_layout(len(train), 50, 8, 'stream')
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  dist = strategy.distribute_datasets_from_function(lambda ctx: data_lib.make_dataset(
      train, vocab.size, layout, ctx, num_steps=2, streamed=True, input_dtype=tf.bfloat16))
  specs = tf.nest.flatten(dist.element_spec)
  assert all(s.shape.is_fully_defined() for s in specs), dist.element_spec
  assert dist.element_spec['inputs'].shape == (8, 50, vocab.size)
  assert dist.element_spec['inputs'].dtype == tf.bfloat16
  batch = next(iter(dist))
  assert batch['inputs'].shape == (8, 50, vocab.size)


def test_streamed_validation_covers_the_whole_split_like_the_loaded_one(sharded):
  from pipeline import data as data_lib  # pylint: disable=g-import-not-at-top
  vocab, _, val = source.open_streaming(TFDS_SMALL, sharded, 0.05)
  loaded = corpus_lib.load(SHAKESPEARE, 0.05, 100).val
  layout = data_lib.make_layout(len(val), 50, 8, 'stream', 'validation', cover_all=True)
  kw = dict(num_steps=layout.steps_per_epoch, shuffle=False)
  want = list(data_lib.make_dataset(loaded, vocab.size, layout, **kw).as_numpy_iterator())
  got = list(data_lib.make_dataset(val, vocab.size, layout, streamed=True,
                                   **kw).as_numpy_iterator())
  assert len(got) == len(want) == layout.steps_per_epoch
  assert sum(b['weights'].sum() for b in got) == len(val) - 1
  for g, w in zip(got, want):
    m = w['weights'] > 0  # padding may differ; what is scored may not
    np.testing.assert_array_equal(g['weights'], w['weights'])
    np.testing.assert_array_equal(g['targets'][m], w['targets'][m])
    np.testing.assert_array_equal(g['inputs'].argmax(-1)[m], w['inputs'].argmax(-1)[m])
