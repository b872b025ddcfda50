"""pipeline.steps' optimizer (Adam, AdamW's decoupled weight decay) and its XLA choice."""

import types

import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import model as model_lib
from pipeline import steps as steps_lib
from tests.conftest import run


def _one_zero_gradient_update(weight_decay):
  config = config_lib.override(config_lib.base_config(), **{
      'train.weight_decay': weight_decay, 'train.warmup_steps': 0,
      'train.learning_rate': 0.01, 'train.lr_schedule': 'constant'})
  models = model_lib.build(11, 6, 2, 5, use_cudnn=False)
  variables = models.train.trainable_variables
  before = {v.path: v.numpy() for v in variables}
  optimizer, _ = steps_lib.make_optimizer(config.train)
  # Zero gradients: Adam's own step is 0/(0 + eps) = 0, so only the decay moves a weight.
  optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
  return before, {v.path: v.numpy() for v in variables}


def test_weight_decay_shrinks_kernels_and_leaves_biases():
  before, after = _one_zero_gradient_update(0.5)
  kernels = [p for p in before if 'kernel' in p]
  biases = [p for p in before if 'bias' in p]
  assert len(kernels) == 5 and len(biases) == 3  # 2 LSTMs (kernel, recurrent), Dense
  for p in kernels:  # w -= lr * wd * w
    np.testing.assert_allclose(after[p], before[p] * (1 - 0.01 * 0.5), rtol=1e-6)
  for p in biases:
    np.testing.assert_array_equal(after[p], before[p])


def test_no_weight_decay_is_plain_adam():
  before, after = _one_zero_gradient_update(0.0)
  for p, w in before.items():
    np.testing.assert_array_equal(after[p], w)


@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
def test_the_fused_adam_update_follows_keras_adam(weight_decay):
  """ResourceApplyAdam (make_optimizer) against Keras's own Adam/AdamW, 20 scheduled steps."""
  config = config_lib.override(config_lib.base_config(), **{
      'train.weight_decay': weight_decay, 'train.warmup_steps': 5, 'train.num_steps': 20,
      'train.learning_rate': 0.01, 'train.lr_schedule': 'cosine'})
  ours, schedule = steps_lib.make_optimizer(config.train)
  keras = tf.keras.optimizers.AdamW if weight_decay else tf.keras.optimizers.Adam
  theirs = keras(learning_rate=schedule, **({'weight_decay': weight_decay} if weight_decay else {}))
  rng = np.random.default_rng(0)
  start = rng.normal(size=(30, 7)).astype(np.float32)
  mine, reference = tf.Variable(start, name='kernel'), tf.Variable(start, name='kernel')
  ours.build([mine])
  theirs.build([reference])
  steps = [tf.function(lambda g, o=o, v=v: o.apply_gradients([(g, v)]))
           for o, v in ((ours, mine), (theirs, reference))]
  for _ in range(20):
    grad = tf.constant(rng.normal(size=start.shape).astype(np.float32))
    for step in steps:
      step(grad)
  moved = np.abs(reference.numpy() - start).max()
  assert moved > 0.05  # the comparison below is not of two unmoved copies
  np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=0, atol=1e-5)


def test_unset_jit_compile_means_xla_exactly_where_tensorflow_runs_without_onednn():
  one = tf.distribute.get_strategy()
  for env in ('0', '1'):  # TF_ENABLE_ONEDNN_OPTS forces TensorFlow's choice either way
    out = run(['-c', 'import tensorflow as tf; from pipeline import steps; '
               's = tf.distribute.get_strategy(); '
               'print(steps.onednn_enabled(), steps.auto_jit(None, s, False), '
               'steps.jit_mode(None, s, False))'], env={'TF_ENABLE_ONEDNN_OPTS': env})
    assert out.stdout.split() == (['False', 'True', 'loop'] if env == '0'
                                  else ['True', 'False', 'off']), out.stdout
  for explicit in (True, False):  # a value the user set is kept, whatever the CPU
    assert steps_lib.auto_jit(explicit, one, False) is explicit
  assert steps_lib.auto_jit(None, one, True) is False  # GPUs keep cuDNN
  # Several replicas (auto_jit reads only the count): unmeasured, so left uncompiled.
  assert steps_lib.auto_jit(None, types.SimpleNamespace(num_replicas_in_sync=2), False) is False


def test_jit_compile_takes_true_false_or_unset_from_the_command_line():
  config = config_lib.base_config()
  assert config.train.jit_compile is None
  config_lib.override(config, **{'train.jit_compile': True})
  assert config.train.jit_compile is True
  with pytest.raises(TypeError):
    config_lib.override(config, **{'train.jit_compile': 'sometimes'})
  saved = config_lib.to_json(config_lib.base_config())
  assert config_lib.from_dict(saved).train.jit_compile is None  # config.json round trip
