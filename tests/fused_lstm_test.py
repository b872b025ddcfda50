"""pipeline.fused_lstm computes what the Keras LSTM layers compute, values and gradients."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline import fused_lstm
from pipeline import model as model_lib

B, T, V, H = 5, 7, 11, 6


def _inputs(layers, seed=0):
  rng = np.random.default_rng(seed)
  x = tf.one_hot(rng.integers(V, size=(B, T)), V)
  h = tf.constant(rng.normal(size=(B, layers, H)), tf.float32)
  c = tf.constant(rng.normal(size=(B, layers, H)), tf.float32)
  y = tf.constant(rng.integers(V, size=(B, T)), tf.int32)
  return x, h, c, y


def _loss_and_grads(models, fused, x, h, c, y, noise=()):
  """Loss on the logits and on both returned states, so every gradient path is used."""

  @tf.function
  def run():
    with tf.GradientTape() as tape, fused_lstm.swap_in(models.lstms, fused) as swapped:
      logits, h2, c2 = models.train([x, h, c, *noise], training=True)
      loss = (tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
              + 0.3 * tf.reduce_sum(h2 * h2) + 0.1 * tf.reduce_sum(c2))
    assert swapped == (len(models.lstms) if fused else 0)
    return [loss, logits, h2, c2] + tape.gradient(loss, models.train.trainable_variables)
  return [t.numpy() for t in run()]


@pytest.mark.parametrize('layers,dropout', [(1, 0.0), (2, 0.0), (2, 0.4)])
def test_values_and_gradients_match_keras(layers, dropout):
  models = model_lib.build(V, H, layers, T, dropout=dropout)
  args = _inputs(layers)
  noise = [tf.random.stateless_uniform([B, layers, H], seed=[1, 2])] if dropout else []
  keras_out = _loss_and_grads(models, False, *args, noise)
  fused_out = _loss_and_grads(models, True, *args, noise)
  assert len(fused_out) == len(keras_out) == 4 + 3 * layers + 2
  for k, f in zip(keras_out, fused_out):
    np.testing.assert_allclose(f, k, rtol=1e-5, atol=1e-6)


def test_one_char_step_matches_keras_and_leaves_the_layers_as_they_were():
  models = model_lib.build(V, H, 2, T)
  x, h, c, _ = _inputs(2)
  step = tf.function(lambda x, h, c: models.step([x, h, c], training=False))
  plain = [t.numpy() for t in step(x[:, :1], h, c)]

  @tf.function
  def fused_step(x, h, c):
    with fused_lstm.swap_in(models.lstms):
      return models.step([x, h, c], training=False)
  fast = [t.numpy() for t in fused_step(x[:, :1], h, c)]
  for p, f in zip(plain, fast):
    np.testing.assert_array_equal(f, p)  # the same ops in the same order
  assert all('inner_loop' not in vars(lstm) for lstm in models.lstms)


def test_layers_it_cannot_reproduce_keep_keras():
  models = model_lib.build(V, H, 1, T, precision='bfloat16')
  with fused_lstm.swap_in(models.lstms) as swapped:
    assert swapped == 0
  assert not fused_lstm.supported(models.lstms[0])
  assert fused_lstm.supported(model_lib.build(V, H, 1, T).lstms[0])
