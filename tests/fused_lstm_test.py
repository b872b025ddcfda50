"""pipeline.fused_lstm computes what the Keras LSTM layers compute, values and gradients."""

import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend import AutocastScope

from pipeline import config as config_lib
from pipeline import data as data_lib
from pipeline import distribute
from pipeline import fused_lstm
from pipeline import model as model_lib
from pipeline import source
from pipeline import steps as steps_lib

B, T, V, H = 5, 7, 11, 6


def _inputs(layers, seed=0, b=B):
  rng = np.random.default_rng(seed)
  x = tf.one_hot(rng.integers(V, size=(b, T)), V)
  h = tf.constant(rng.normal(size=(b, layers, H)), tf.float32)
  c = tf.constant(rng.normal(size=(b, layers, H)), tf.float32)
  y = tf.constant(rng.integers(V, size=(b, T)), tf.int32)
  return x, h, c, y


KERNELS = pytest.mark.parametrize('kernels', ['xla', 'cc'], indirect=True)  # conftest.kernels


def _loss_and_grads(models, fused, x, h, c, y, noise=(), chains=1, kernels='xla'):
  """Loss on the logits and on both returned states, so every gradient path is used."""

  @tf.function
  def run():
    with tf.GradientTape() as tape, fused_lstm.swap_in(models.lstms, fused, chains,
                                                       kernels) as swapped:
      logits, h2, c2 = models.train([x, h, c, *noise], training=True)
      loss = (tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
              + 0.3 * tf.reduce_sum(h2 * h2) + 0.1 * tf.reduce_sum(c2))
    assert swapped == (len(models.lstms) if fused else 0)
    return [loss, logits, h2, c2] + tape.gradient(loss, models.train.trainable_variables)
  return [t.numpy() for t in run()]


@KERNELS
@pytest.mark.parametrize('layers,dropout', [(1, 0.0), (2, 0.0), (2, 0.4)])
def test_values_and_gradients_match_keras(layers, dropout, kernels):
  models = model_lib.build(V, H, layers, T, dropout=dropout)
  args = _inputs(layers)
  noise = [tf.random.stateless_uniform([B, layers, H], seed=[1, 2])] if dropout else []
  keras_out = _loss_and_grads(models, False, *args, noise)
  fused_out = _loss_and_grads(models, True, *args, noise, kernels=kernels)
  assert len(fused_out) == len(keras_out) == 4 + 3 * layers + 2
  for k, f in zip(keras_out, fused_out):
    np.testing.assert_allclose(f, k, rtol=1e-5, atol=1e-6)


@KERNELS
@pytest.mark.parametrize('chains', [1, 2])
def test_first_layer_inputs_that_are_not_one_hot_still_match_keras(chains, kernels):
  # One-hot first-layer rows are projected by a row gather; any other input
  # (here a single entry of one window halved) must take the matmul instead.
  models = model_lib.build(V, H, 1, T)
  x, h, c, y = _inputs(1, seed=5, b=6)
  x = tf.tensor_scatter_nd_update(x, [[5, T - 1, 0]], [0.5])
  keras_out = _loss_and_grads(models, False, x, h, c, y)
  fused_out = _loss_and_grads(models, True, x, h, c, y, chains=chains, kernels=kernels)
  for k, f in zip(keras_out, fused_out):
    np.testing.assert_allclose(f, k, rtol=1e-5, atol=1e-6)


@KERNELS
@pytest.mark.parametrize('chains', [2, 3])
def test_split_batch_recurrences_match_keras(chains, kernels):
  models = model_lib.build(V, H, 2, T)
  args = _inputs(2, seed=3, b=6)
  keras_out = _loss_and_grads(models, False, *args)
  fused_out = _loss_and_grads(models, True, *args, chains=chains, kernels=kernels)
  assert [f.shape for f in fused_out] == [k.shape for k in keras_out]
  for k, f in zip(keras_out, fused_out):
    np.testing.assert_allclose(f, k, rtol=1e-5, atol=1e-6)


def test_chain_count_divides_the_batch_and_follows_the_cores(monkeypatch):
  monkeypatch.setattr(fused_lstm.os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
  assert fused_lstm.chains_for(64) == 2  # one per core
  assert fused_lstm.chains_for(64, 4) == 4  # asked for
  with pytest.raises(ValueError, match='does not divide the batch of 64'):
    fused_lstm.chains_for(64, 3)  # asked for, and 3 does not divide 64
  monkeypatch.setattr(fused_lstm.os, 'sched_getaffinity', lambda pid: {0, 1, 2})
  assert fused_lstm.chains_for(64) == 1  # 3 cores: 3 does not divide 64
  monkeypatch.setattr(fused_lstm.os, 'sched_getaffinity', lambda pid: {0, 1})
  assert fused_lstm.chains_for(20) == 1  # fewer than 16 rows per chain
  monkeypatch.setattr(fused_lstm.os, 'sched_getaffinity', lambda pid: set(range(8)))
  assert fused_lstm.chains_for(64) == 4  # 16 rows each at most


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
  models = model_lib.build(V, H, 1, T, precision='float16')
  with fused_lstm.swap_in(models.lstms) as swapped:
    assert swapped == 0
  assert not fused_lstm.supported(models.lstms[0])
  assert fused_lstm.supported(model_lib.build(V, H, 1, T).lstms[0])


def _matmul_dtypes(fn):
  """The T attrs of every MatMul in fn's graph and the graphs of the functions it calls."""
  graph = fn.get_concrete_function().graph.as_graph_def()
  nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
  return {tf.dtypes.as_dtype(n.attr['T'].type).name for n in nodes
          if n.op in ('MatMul', 'BatchMatMulV2')}


@KERNELS
def test_bfloat16_multiplies_in_bfloat16_and_tracks_float32(kernels):
  f32 = model_lib.build(V, H, 2, T)
  bf16 = model_lib.build(V, H, 2, T, precision='bfloat16')
  for w, w16 in zip(f32.train.weights, bf16.train.weights):
    w16.assign(w)
  assert fused_lstm.supported(bf16.lstms[0])
  args = _inputs(2)
  ref = _loss_and_grads(f32, False, *args)

  @tf.function
  def run16():
    x, h, c, y = args
    with tf.GradientTape() as tape, fused_lstm.swap_in(bf16.lstms, kernels=kernels) as swapped:
      logits, h2, c2 = bf16.train([x, h, c], training=True)
      loss = (tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
              + 0.3 * tf.reduce_sum(h2 * h2) + 0.1 * tf.reduce_sum(c2))
    assert swapped == 2
    return [loss, logits, h2, c2] + tape.gradient(loss, bf16.train.trainable_variables)
  # The LSTM matmuls on bfloat16 operands, but for the first layer's float32
  # input projection (tested below); the Dense (logits) layer stays float32 by design.
  assert _matmul_dtypes(run16) == {'bfloat16', 'float32'}
  out = [t.numpy() for t in run16()]
  assert len(out) == len(ref)
  for got, want in zip(out, ref):
    assert got.dtype == np.float32  # the state, logits and weight gradients reach float32
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-6)
    assert err < 2e-2, err  # bfloat16 keeps 8 significant bits: ~0.4% per operand
    assert not np.array_equal(got, want) or not np.any(want)  # it did round


@pytest.mark.parametrize('chars', [T, 1])  # the fused loop, and the sampler's one-char step
def test_bfloat16_first_layer_adds_unrounded_input_weights_and_bias(chars):
  # The one-hot layer's x W_x + b runs in float32 from the float32 variables:
  # rounding W_x and b to bfloat16 cost 0.034 nats after 300 steps at H=512.
  # With W_h = 0 and a zero state every pre-activation is exactly x W_x + b, so
  # the bfloat16 model's float32 state must equal float32's to float32 rounding.
  f32 = model_lib.build(V, H, 1, T)
  bf16 = model_lib.build(V, H, 1, T, precision='bfloat16')
  kernel = np.random.default_rng(3).normal(size=(V, 4 * H)) * 0.7 + 1 / 3  # not bf16 values
  for model in (f32, bf16):
    cell = model.lstms[0].cell
    cell.kernel.assign(kernel)
    cell.bias.assign(np.full(cell.bias.shape, 1 + 2 ** -10))  # rounds to 1.0 in bfloat16
    cell.recurrent_kernel.assign(np.zeros(cell.recurrent_kernel.shape))
  x = _inputs(1)[0][:, :chars]
  zeros = tf.zeros([B, H])

  def state(model):
    # As the Keras layer calls it: inputs in, and variables read under, its compute dtype
    # (the layer then rounds the returned state to it, so the state is read here).
    lstm = model.lstms[0]
    with AutocastScope(lstm.compute_dtype):
      _, _, (h, c) = tf.function(lambda: fused_lstm._inner_loop(  # pylint: disable=protected-access
          lstm, False, 1, 'xla', tf.cast(x, lstm.compute_dtype), [zeros, zeros], None))()
    return np.concatenate([h.numpy().ravel(), c.numpy().ravel()])
  want, got = state(f32), state(bf16)
  assert np.max(np.abs(got - want)) < 1e-5, np.max(np.abs(got - want))  # bf16 rounding: ~1e-3


def _train_losses(precision, steps=120):
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  c = config_lib.override(shakespeare.get_config('smoke'), **{
      'runtime.precision': precision, 'runtime.strategy': 'cpu', 'train.fused_lstm': True,
      'train.num_steps': steps, 'train.steps_per_loop': 20, 'data.mode': 'shuffle',
      'model.hidden_size': 64, 'data.batch_size': 16, 'data.seq_length': 50})
  c = config_lib.finalize(c)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  corpus = source.open_corpus(c.data)
  # The arithmetic is the subject here: keep bfloat16 on a CPU without bf16 too
  # (TensorFlow emulates it there, slowly), instead of the training fallback.
  training = steps_lib.setup(c, strategy, corpus.vocab.size, bf16_fallback=False)
  assert training.loops.fused and training.models.lstms[0].compute_dtype == precision
  layout = data_lib.make_layout(len(corpus.train), c.data.seq_length, c.data.batch_size,
                                'shuffle')
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_dataset(corpus.train, corpus.vocab.size, layout, ctx,
                                        seed=c.seed)))
  return [float(training.loops.train(iterator, 20)) for _ in range(steps // 20)]


def test_bfloat16_training_follows_float32():
  f32, bf16 = _train_losses('float32'), _train_losses('bfloat16')
  assert f32[-1] < f32[0] - 0.5  # it learned: the comparison below means something
  # The same batches from the same weights: the mean loss of the last 20
  # steps agrees within 0.02 nats/char (launch.bench checks 300 steps at H=512).
  assert abs(bf16[-1] - f32[-1]) < 0.02, (f32, bf16)


def test_bfloat16_falls_back_to_float32_loudly_on_a_cpu_without_it(tmp_path, monkeypatch,
                                                                   caplog):
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  old = tmp_path / 'cpuinfo-old'
  old.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f fma\n\n'
                 'processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f fma\n')
  new = tmp_path / 'cpuinfo-new'
  new.write_text('processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n')
  arm = tmp_path / 'cpuinfo-arm'
  arm.write_text('processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n')
  assert distribute.cpu_bf16_flags(str(old)) == []
  assert distribute.cpu_bf16_flags(str(new)) == ['amx_bf16', 'avx512_bf16']
  assert distribute.cpu_bf16_flags(str(arm)) == ['bf16']
  assert distribute.cpu_bf16_flags(str(tmp_path / 'missing')) is None
  monkeypatch.setattr(distribute, 'CPUINFO', str(old))
  with caplog.at_level('WARNING'):
    assert distribute.precision_for('bfloat16', strategy) == 'float32'
  assert 'none of avx512_bf16, amx_bf16, bf16' in caplog.text
  assert 'Training in float32 instead' in caplog.text
  assert distribute.precision_for('float32', strategy) == 'float32'
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  c = config_lib.finalize(config_lib.override(
      shakespeare.get_config('smoke'), **{'runtime.precision': 'bfloat16'}))
  training = steps_lib.setup(c, strategy, 65)  # what pipeline.train builds
  assert training.models.lstms[0].compute_dtype == 'float32'
  monkeypatch.setattr(distribute, 'CPUINFO', str(new))
  assert distribute.precision_for('bfloat16', strategy) == 'bfloat16'
