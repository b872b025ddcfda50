"""The TPU proxy: XLA compiles exactly the train step a TPU runs, and it trains as the uncompiled step does.

What TPUStrategy runs: the train loop pulls one batch per step from a
distributed iterator on the host, and the whole replica step (forward through
Keras's LSTM, backward, all-reduce, clipping, Adam, carried state) is one XLA
program. `train.tpu_proxy` runs that on one CPU replica (jit mode 'replica').
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import data as data_lib
from pipeline import source
from pipeline import steps as steps_lib
from tests.conftest import run

STEPS, PER_LOOP = 6, 3


def _config(precision, tpu_proxy, mode='shuffle'):
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  c = shakespeare.get_config('smoke')
  config_lib.override(c, **{
      'runtime.precision': precision, 'runtime.strategy': 'cpu', 'train.tpu_proxy': tpu_proxy,
      'train.fused_lstm': False, 'train.steps_per_loop': PER_LOOP, 'train.num_steps': STEPS,
      'data.mode': mode, 'model.num_layers': 2, 'model.hidden_size': 32, 'data.batch_size': 8})
  return config_lib.finalize(c)


def _train(config):
  """Losses of STEPS steps, PER_LOOP per loop call, fed by a distributed iterator."""
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  corpus = source.open_corpus(config.data)
  training = steps_lib.setup(config, strategy, corpus.vocab.size)
  d = config.data
  layout = data_lib.make_layout(len(corpus.train), d.seq_length, d.batch_size, d.mode)
  # Both runs get the TPU's bfloat16 inputs: 0 and 1 are exact in any dtype.
  dtype = steps_lib.input_dtype(strategy, tpu_proxy=True)
  make = lambda ctx: data_lib.make_dataset(
      corpus.train, corpus.vocab.size, layout, ctx, seed=config.seed, num_steps=STEPS,
      reset_prob=d.state_reset_prob if d.mode == 'stream' else 0.0, input_dtype=dtype)
  dist = strategy.distribute_datasets_from_function(make)
  assert all(s.shape.is_fully_defined() for s in tf.nest.flatten(dist.element_spec))
  iterator = iter(dist)
  losses = [float(training.loops.train(iterator, PER_LOOP)) for _ in range(STEPS // PER_LOOP)]
  return training, losses, make(None)


@pytest.mark.parametrize('precision,rtol', [('float32', 1e-5), ('bfloat16', 2e-2)])
@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
def test_xla_compiled_tpu_step_matches_uncompiled_step(precision, rtol, mode):
  proxy, proxy_losses, ds = _train(_config(precision, True, mode))
  assert proxy.jit_mode == 'replica'
  assert not proxy.loops.fused  # Keras's LSTM, as on a TPU, not the CPU's fused path
  # The step XLA compiled: its HLO exists only if every op and shape compiled.
  batch = next(iter(ds))
  hlo = proxy.loops.step.experimental_get_compiler_ir(batch)(stage='hlo')
  assert 'while' in hlo  # Keras's LSTM recurrence, inside the one program
  ref, ref_losses, _ = _train(_config(precision, False, mode))
  assert ref.jit_mode == 'off' and not ref.loops.fused
  assert all(math.isfinite(l) for l in proxy_losses)
  np.testing.assert_allclose(proxy_losses, ref_losses, rtol=rtol)
  # The losses above are means; the weights after training must agree too.
  for a, b in zip(proxy.models.variables, ref.models.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=10 * rtol, atol=10 * rtol)


def test_tpu_proxy_trains_evaluates_checkpoints_and_exports(tmp_path):
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path}', '--config.train.tpu_proxy=True',
              '--config.runtime.precision=bfloat16', '--config.train.num_steps=20',
              '--config.train.eval_every=10', '--config.train.checkpoint_every=10'])
  assert 'one compiled replica step per batch' in proc.stderr
  assert (tmp_path / 'export' / 'saved_model.pb').exists()
  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('-20')


def test_tpu_proxy_on_several_replicas_is_a_config_error(tmp_path):
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path}', '--config.train.tpu_proxy=True',
              '--config.runtime.cpu_devices=2', '--config.runtime.strategy=mirrored'],
             check=False)
  assert proc.returncode == 2
  assert 'train.tpu_proxy compiles the TPU step on one CPU replica' in proc.stderr
