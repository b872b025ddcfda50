"""Tests of pipeline/data.py: window layout, batches, order, resume and sharding.

Most tests use "positional" ids, ids[i] == i with a vocabulary of len(ids)
symbols, so every character names its own position in the text and a window's
start can be read off its first input.
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from pipeline import corpus as corpus_lib
from pipeline import data as data_lib

T = 4


def _positional(n):
  return np.arange(n, dtype=np.uint16)


def _batches(ds):
  return [{k: v.numpy() for k, v in b.items()} for b in ds]


def _starts(batch):
  """Text position of each row's first input character (positional ids)."""
  return batch['inputs'][:, 0, :].argmax(-1)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _context(pipelines, pipeline_id, replicas):
  return tf.distribute.InputContext(num_input_pipelines=pipelines,
                                    input_pipeline_id=pipeline_id,
                                    num_replicas_in_sync=replicas)


# Element structure, on a real corpus.

@pytest.fixture(scope='module')
def real_corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  text = ''.join(rng.choice(list('abcdefghijklmnop é\n'), size=3000))
  path = tmp_path_factory.mktemp('corpus') / 'text.txt'
  path.write_text(text, encoding='utf-8')
  return corpus_lib.load(str(path), val_fraction=0.2, seq_length=8)


@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
@pytest.mark.parametrize('split, batch', [('train', 16), ('validation', 6)])
def test_elements_have_documented_shapes_dtypes_and_text_windows(real_corpus, mode, split,
                                                                 batch):
  c, t = real_corpus, 8
  ids = c.train if split == 'train' else c.val
  v = c.vocab.size
  layout = data_lib.make_layout(len(ids), t, batch, mode, split)
  ds = data_lib.make_dataset(ids, v, layout, num_steps=3, seed=3, reset_prob=0.1,
                             shuffle=split == 'train')
  text = c.vocab.decode(ids)
  if mode == 'shuffle':
    valid = {text[s:s + t + 1] for s in range(0, len(text) - t, t)}
  else:
    valid = {text[s:s + t + 1] for s in range(len(text) - t)}
  # Static shapes (a TPU compiles for one) and one byte per one-hot entry.
  assert all(spec.shape.is_fully_defined() for spec in ds.element_spec.values())
  batches = _batches(ds)
  assert len(batches) == 3
  for b in batches:
    assert b['inputs'].dtype == np.uint8 and b['inputs'].shape == (batch, t, v)
    assert b['targets'].dtype == np.int32 and b['targets'].shape == (batch, t)
    assert b['rows'].dtype == np.int32 and b['rows'].shape == (batch,)
    assert b['reset'].dtype == np.float32 and b['reset'].shape == (batch,)
    # One-hot: every position is exactly one 1 and zeros elsewhere.
    np.testing.assert_array_equal(b['inputs'].sum(-1), np.ones((batch, t)))
    assert set(np.unique(b['inputs'])) <= {0, 1}
    chars = b['inputs'].argmax(-1)
    # Targets are the inputs shifted by one character.
    np.testing.assert_array_equal(chars[:, 1:], b['targets'][:, :-1])
    np.testing.assert_array_equal(b['rows'], np.arange(batch))
    for row_chars, row_targets in zip(chars, b['targets']):
      window = c.vocab.decode(row_chars) + c.vocab.decode(row_targets[-1:])
      assert window in valid


# Stream mode.

def test_stream_rows_continue_across_batches_and_reset_at_epoch_start():
  b, n = 4, 4 * (5 * T + 1)  # 4 streams of 21 chars: 5 windows each.
  ids = _positional(n)
  layout = data_lib.make_layout(n, T, b, 'stream')
  assert layout.steps_per_epoch == 5
  batches = _batches(data_lib.make_dataset(ids, n, layout, num_steps=12))
  stream = layout.stream_length
  for k, batch in enumerate(batches):
    starts = _starts(batch)
    epoch_start = k % layout.steps_per_epoch == 0
    if epoch_start:
      # Row j starts its own contiguous stream at the beginning of an epoch.
      np.testing.assert_array_equal(starts, np.arange(b) * stream)
    else:
      # Row j resumes exactly where it ended: last target of step k-1 is
      # the first input of step k (windows overlap by one character).
      np.testing.assert_array_equal(starts, batches[k - 1]['targets'][:, -1])
    # Every window stays inside its row's stream.
    ends = batch['targets'][:, -1]
    assert np.all(starts >= np.arange(b) * stream)
    assert np.all(ends < (np.arange(b) + 1) * stream)
    np.testing.assert_array_equal(batch['reset'], np.full(b, float(epoch_start)))


def test_stream_random_resets_mix_with_epoch_resets():
  b, n = 8, 8 * (10 * T + 1)
  layout = data_lib.make_layout(n, T, b, 'stream')
  batches = _batches(data_lib.make_dataset(_positional(n), n, layout, num_steps=10,
                                           reset_prob=0.5))
  resets = np.stack([x['reset'] for x in batches])
  assert set(np.unique(resets)) <= {0.0, 1.0}
  np.testing.assert_array_equal(resets[0], np.ones(b))
  later = resets[1:]
  assert 0 < later.sum() < later.size  # some rows reset, others carry state


# Shuffle mode.

def _epoch_order(n_windows, batch, seed, steps, shuffle=True):
  n = n_windows * T + 1
  layout = data_lib.make_layout(n, T, batch, 'shuffle')
  assert layout.num_windows == n_windows
  ds = data_lib.make_dataset(_positional(n), n, layout, seed=seed, num_steps=steps,
                             shuffle=shuffle)
  batches = _batches(ds)
  for x in batches:
    np.testing.assert_array_equal(x['reset'], np.ones(batch))
  return np.concatenate([_starts(x) for x in batches]) // T


@pytest.mark.parametrize('seed', [0, 1, 7])
def test_shuffle_epoch_visits_every_window_once(seed):
  order = _epoch_order(32, 8, seed, steps=8)  # two epochs of 4 steps
  np.testing.assert_array_equal(np.sort(order[:32]), np.arange(32))
  np.testing.assert_array_equal(np.sort(order[32:]), np.arange(32))
  assert not np.array_equal(order[:32], order[32:])  # a new order per epoch


def test_shuffle_epoch_not_divisible_by_batch_is_still_a_permutation():
  # 10 windows, batches of 4: epochs run across step boundaries.
  order = _epoch_order(10, 4, seed=1, steps=5)
  assert len(order) == 20
  np.testing.assert_array_equal(np.sort(order[:10]), np.arange(10))
  np.testing.assert_array_equal(np.sort(order[10:]), np.arange(10))


def test_shuffle_different_seed_gives_different_order():
  a = _epoch_order(32, 8, seed=1, steps=4)
  b = _epoch_order(32, 8, seed=2, steps=4)
  np.testing.assert_array_equal(np.sort(a), np.sort(b))
  assert not np.array_equal(a, b)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_shuffle_order_is_well_mixed(seed):
  # A uniform random permutation of 64 windows leaves on average one window at
  # its text-order place; more than 8 has probability below 1e-5. seed=0 is
  # the default config.seed.
  order = _epoch_order(64, 8, seed, steps=16)
  for epoch in order.reshape(2, 64):
    fixed = int((epoch == np.arange(64)).sum())
    assert fixed <= 8, f'{fixed} of 64 windows in text order: {epoch.tolist()}'


def test_shuffle_false_visits_windows_in_text_order():
  order = _epoch_order(32, 8, seed=5, steps=4, shuffle=False)
  np.testing.assert_array_equal(order, np.arange(32))


# Statelessness (resume) and sharding.

@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
@pytest.mark.parametrize('pipelines, replicas', [(1, 1), (1, 2)])
def test_start_step_equals_skipping_steps(mode, pipelines, replicas):
  n, b, s = 8 * (6 * T + 1), 8, 5
  layout = data_lib.make_layout(n, T, b, mode)

  def make(start):
    return data_lib.make_dataset(_positional(n), n, layout, _context(pipelines, 0, replicas),
                                 seed=4, start_step=start, num_steps=12, reset_prob=0.3)

  full = _batches(make(0))
  local = replicas // pipelines  # elements per step on this pipeline
  assert len(full) == 12 * local
  _assert_same_batches(_batches(make(s)), full[s * local:])


def _concat_rows(parts):
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(out['rows'], kind='stable')
  return {k: v[order] for k, v in out.items()}


@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
@pytest.mark.parametrize('pipelines, replicas', [(2, 2), (2, 4), (1, 2), (1, 4)])
def test_sharded_pipelines_together_give_the_global_batch(mode, pipelines, replicas):
  n, b, steps = 8 * (6 * T + 1), 8, 8
  ids = _positional(n)
  layout = data_lib.make_layout(n, T, b, mode)
  kwargs = dict(seed=9, num_steps=steps, reset_prob=0.3)
  glob = _batches(data_lib.make_dataset(ids, n, layout, tf.distribute.InputContext(),
                                        **kwargs))
  assert len(glob) == steps
  assert all(x['targets'].shape == (b, T) for x in glob)

  per_replica, local = b // replicas, replicas // pipelines
  shards = []
  for i in range(pipelines):
    elements = _batches(data_lib.make_dataset(ids, n, layout, _context(pipelines, i, replicas),
                                              **kwargs))
    assert len(elements) == steps * local
    assert all(x['targets'].shape == (per_replica, T) for x in elements)
    shards.append(elements)

  for k in range(steps):
    # Consecutive elements of a pipeline feed its consecutive local replicas.
    parts = []
    for i, elements in enumerate(shards):
      for r in range(local):
        e = elements[k * local + r]
        replica = i * local + r
        np.testing.assert_array_equal(
            e['rows'], replica * per_replica + np.arange(per_replica))
        parts.append(e)
    union = _concat_rows(parts)
    np.testing.assert_array_equal(union['rows'], np.arange(b))  # none dropped or repeated
    for key in ('inputs', 'targets', 'reset'):
      np.testing.assert_array_equal(union[key], glob[k][key], err_msg=f'{key} step {k}')


@pytest.mark.parametrize('batch, replicas', [(6, 4), (2, 4), (9, 2), (10, 3)])
def test_global_batch_not_dividing_across_replicas_names_valid_batch(batch, replicas):
  n = 100 * (T + 1)
  layout = data_lib.make_layout(n, T, batch, 'shuffle')
  with pytest.raises(data_lib.DataError) as e:
    data_lib.make_dataset(_positional(n), n, layout, _context(1, 0, replicas))
  msg = str(e.value)
  assert f'{replicas} replicas' in msg
  suggested = [int(x) for x in re.findall(r'batch_size=(\d+)', msg)]
  assert suggested
  assert all(x > 0 and x % replicas == 0 for x in suggested), msg


# Layout checks.

@pytest.mark.parametrize('mode, enough', [
    ('shuffle', 8 * T + 1),  # exactly 8 windows of T + 1 chars
    ('stream', 8 * (T + 1)),  # 8 streams of exactly T + 1 chars
])
def test_make_layout_rejects_split_shorter_than_one_batch(mode, enough):
  layout = data_lib.make_layout(enough, T, 8, mode)
  assert layout.steps_per_epoch == 1
  with pytest.raises(data_lib.DataError) as e:
    data_lib.make_layout(enough - 1, T, 8, mode, 'validation')
  msg = str(e.value)
  assert 'validation split' in msg
  assert f'({enough - 1} chars)' in msg
  assert 'batch size' in msg


@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
@pytest.mark.parametrize('n,batch', [(1000, 8), (1003, 8), (97, 4), (50, 8)])
def test_validation_layout_scores_every_character_exactly_once(mode, n, batch):
  # Whole-split validation: the last partial batch is included and masked.
  ids = np.random.default_rng(n).integers(0, 7, n).astype(np.uint8)
  layout = data_lib.make_layout(n, T, batch, mode, 'validation', cover_all=True)
  assert layout.num_targets == n - 1
  ds = data_lib.make_dataset(ids, 7, layout, num_steps=layout.steps_per_epoch, shuffle=False)
  assert all(spec.shape.is_fully_defined() for spec in ds.element_spec.values())
  batches = _batches(ds)
  weights = np.stack([b['weights'] for b in batches])  # (steps, batch, T)
  targets = np.stack([b['targets'] for b in batches])
  assert weights.sum() == n - 1
  assert set(np.unique(weights)) <= {0.0, 1.0}
  if mode == 'stream':  # row r, read step by step, is one contiguous stream
    scored = np.concatenate([targets[:, r].reshape(-1)[weights[:, r].reshape(-1) > 0]
                             for r in range(batch)])
    assert all(b['reset'][0] == (k == 0) for k, b in enumerate(batches))
  else:  # windows in text order: step-major, then row
    scored = targets.reshape(-1)[weights.reshape(-1) > 0]
  np.testing.assert_array_equal(scored, ids[1:])
