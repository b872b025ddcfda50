"""The sampler and decode loop: choose_rows' fast path, per-row seeds, the XLA chunks."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline import generate
from pipeline import model as model_lib


def reference_choose_rows(logits, temperature, top_k, seed, position, top_p=None):
  """choose_rows as it was before its no-sort fast path (issue #14): always two sorts."""
  v = tf.shape(logits)[-1]
  order = tf.math.top_k(logits, k=v).indices
  rank = tf.argsort(order, axis=1, stable=True)
  k = tf.where(top_k <= 0, v, tf.minimum(top_k, v))
  keep = rank < k[:, None]
  scaled = tf.cast(logits / tf.maximum(temperature, 1e-6)[:, None], tf.float64)
  if top_p is not None:
    cut = tf.where(keep, scaled, tf.constant(-float('inf'), tf.float64))
    keep = tf.logical_and(keep, tf.logical_or(top_p[:, None] >= 1.0,
                                              generate.nucleus_keep(cut, top_p)))
  gumbel = -tf.math.log(-tf.math.log(generate.row_uniform(seed, position, v)))
  score = tf.where(keep, scaled + gumbel, tf.constant(-float('inf'), tf.float64))
  sampled = tf.argmax(score, axis=1, output_type=tf.int32)
  return tf.where(temperature > 0, sampled, order[:, 0])


def test_choose_rows_draws_what_the_sorting_formulation_drew():
  rng = np.random.default_rng(0)
  b, v = 12, 65
  settings = [  # (top_k per row, top_p per row or None): fast path first, then cuts
      (np.zeros(b), None), (np.full(b, v), np.ones(b)), (np.r_[0, 0, 1, v + 5, -3] , None),
      (np.full(b, 3), None), (np.zeros(b), np.full(b, 0.7)),
      (rng.integers(-1, v + 2, b), rng.choice([0.3, 0.9, 1.0], b)), (np.zeros(b), np.ones(b))]
  fast = slow = 0
  for trial in range(6):
    # Few distinct values: many ties, between the greedy ids and at the top-k cut.
    logits = np.round(rng.normal(size=(b, v)) * 2) if trial % 2 else rng.normal(size=(b, v)) * 3
    if trial == 4:
      logits[:3] = 0.0  # flat rows: an empty prompt's logits
    logits = tf.constant(logits, tf.float32)
    temperature = tf.constant(rng.choice([0.0, -1.0, 1e-7, 0.8, 1.0, 2.5], b), tf.float32)
    for top_k, top_p in settings:
      top_k = tf.constant(np.resize(top_k, b), tf.int32)
      top_p = None if top_p is None else tf.constant(np.resize(top_p, b), tf.float32)
      cuts = bool(np.any((top_k.numpy() > 0) & (top_k.numpy() < v)) or
                  (top_p is not None and np.any(top_p.numpy() < 1)))
      fast, slow = fast + (not cuts), slow + cuts
      for position in range(4):
        args = (logits, temperature, top_k, tf.range(b, dtype=tf.int64) * 7 + trial,
                tf.fill([b], tf.constant(position, tf.int64)), top_p)
        np.testing.assert_array_equal(generate.choose_rows(*args),
                                      reference_choose_rows(*args))
  assert fast and slow


def test_row_seeds_are_distinct_and_independent_of_the_batch_size():
  seeds = generate.row_seeds(tf.constant(5, tf.int64), 1000).numpy()
  assert len(set(seeds.tolist())) == 1000
  np.testing.assert_array_equal(generate.row_seeds(tf.constant(5, tf.int64), 3), seeds[:3])
  assert generate.row_seeds(tf.constant(6, tf.int64), 3).numpy().tolist() != seeds[:3].tolist()
  negative = generate.row_seeds(tf.constant(-5, tf.int64), 3).numpy()
  assert not set(negative.tolist()) & set(seeds.tolist())


def small_models(layers=2, hidden=24, vocab=17, scale=0.3):
  models = model_lib.build(vocab, hidden, layers, 8, use_cudnn=False)
  rng = np.random.default_rng(3)
  for w in models.train.weights:  # larger than Keras's init: gates away from 0.5
    w.assign(rng.normal(0, scale, w.shape).astype(np.float32))
  return models


@pytest.mark.parametrize('transposed', [False, True])  # matrices above TRANSPOSE_BYTES
@pytest.mark.parametrize('jit', [False, True])
def test_weights_step_matches_the_keras_step_model(jit, transposed, monkeypatch):
  if transposed:  # every matrix the step multiplies is then read (4H, D)
    monkeypatch.setattr(generate, 'TRANSPOSE_BYTES', 0)
  models = small_models()
  rng = np.random.default_rng(4)
  v = models.dense.units
  ids = tf.constant([0, 3, 16, 3], tf.int32)
  h = tf.constant(rng.normal(size=(4, 2, 24)), tf.float32)
  c = tf.constant(rng.normal(size=(4, 2, 24)) * 2, tf.float32)
  step = tf.function(generate.weights_step(models.lstms, models.dense), jit_compile=jit)
  got = step(ids, h, c)
  want = models.step([tf.one_hot(ids[:, None], v), h, c], training=False)
  for g, w in zip(got, (want[0][:, 0], want[1], want[2])):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def keras_step_fn(models):
  return lambda x, h, c: models.step([x, h, c], training=False)


def test_xla_extend_gives_extends_ids_and_state_in_any_chunking():
  models = small_models(scale=0.15)
  v = models.dense.units
  chars = tf.constant([chr(ord('a') + i) for i in range(v)])
  b = 3
  rng = np.random.default_rng(5)
  h = tf.constant(rng.normal(size=(b, 2, 24)) * 0.3, tf.float32)
  c = tf.zeros([b, 2, 24])
  logits = tf.constant(rng.normal(size=(b, v)), tf.float32)
  rows = (tf.constant([0.0, 0.8, 1.3]), tf.constant([0, 0, 4]), tf.constant([1, 2, 3], tf.int64))
  top_p = tf.constant([1.0, 0.9, 1.0])
  chunk = generate.chunk_fn(generate.weights_step(models.lstms, models.dense), size=7)
  xla = lambda state, n, position: generate.xla_extend(
      chunk, chars, *state, tf.constant(n), *rows, tf.constant(position, tf.int64), top_p, size=7)
  plain = generate.extend(keras_step_fn(models), chars, h, c, logits, tf.constant(40), *rows,
                          tf.zeros([b], tf.int64), top_p)
  whole = xla((h, c, logits), 40, [0] * b)
  np.testing.assert_array_equal(whole[0], plain[0])
  assert whole[0].shape == (b, 40) and len(set(whole[1].numpy().tolist())) == b
  for got, want in zip(whole[2:], plain[2:]):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # Pieces of 0, 7 (one full chunk), 3 and 30 chars continue from each other's state.
  state, ids, done = (h, c, logits), [], 0
  for n in (0, 7, 3, 30):
    out = xla(state, n, [done] * b)
    assert out[0].shape == (b, n) and [len(t) for t in out[1].numpy()] == [n] * b
    ids.append(out[0].numpy())
    state, done = out[2:], done + n
  np.testing.assert_array_equal(np.concatenate(ids, axis=1), whole[0])
  for got, want in zip(state, whole[2:]):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('b', [6, 7])  # even and odd halves
def test_xla_extend_split_into_two_launches_gives_the_whole_batchs_text(b):
  models = small_models(scale=0.15)
  v = models.dense.units
  chars = tf.constant([chr(ord('a') + i) for i in range(v)])
  rng = np.random.default_rng(b)
  h = tf.constant(rng.normal(size=(b, 2, 24)) * 0.3, tf.float32)
  c = tf.constant(rng.normal(size=(b, 2, 24)) * 0.3, tf.float32)
  logits = tf.constant(rng.normal(size=(b, v)), tf.float32)
  rows = (tf.constant(rng.uniform(0.5, 1.5, b), tf.float32), tf.constant([0, 3] * 3 + [0])[:b],
          tf.range(b, dtype=tf.int64) + 11)
  top_p = tf.constant([1.0, 0.8] * 3 + [1.0])[:b]
  chunk = generate.chunk_fn(generate.weights_step(models.lstms, models.dense), size=7)
  run = lambda split_rows: generate.xla_extend(
      chunk, chars, h, c, logits, tf.constant(23), *rows, tf.zeros([b], tf.int64), top_p,
      size=7, split_rows=split_rows)
  split, whole = run(4), run(0)  # b >= 4: two launches of 3 and 3 (or 4) rows
  np.testing.assert_array_equal(split[0], whole[0])
  assert split[0].shape == (b, 23) and len(set(split[1].numpy().tolist())) == b
  for got, want in zip(split[2:], whole[2:]):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_generate_rows_sample_apart_and_ignore_batch_mates():
  models = small_models(scale=0.15)
  v = models.dense.units
  chars = tf.constant([chr(ord('a') + i) for i in range(v)])
  codepoints = tf.constant([ord('a') + i for i in range(v)])

  def text(prompts, temperature=1.0, top_k=0):
    return generate.generate(keras_step_fn(models), chars, codepoints, 2, 24,
                             tf.constant(prompts), tf.constant(60), tf.constant(temperature),
                             tf.constant(top_k), tf.constant(9, tf.int64)).numpy().tolist()
  four = text(['ab'] * 4)
  assert len(set(four)) == 4  # one seed per row
  assert text(['ab'] * 2) == four[:2]
  assert text(['ab', 'ca', 'b', ''])[0] == four[0]
  greedy = text(['ab', ''], temperature=0.0)
  assert text(['ab', ''], top_k=1) == greedy and greedy[0] == text(['ab'] * 3, 0.0)[1]
