"""pipeline.steps' optimizer: Adam, and AdamW's decoupled weight decay."""

import numpy as np
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import model as model_lib
from pipeline import steps as steps_lib


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
