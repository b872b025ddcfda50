"""Strategy selection: one place decides where the replicas run.

`runtime.strategy`: auto | cpu | mirrored. `runtime.cpu_devices=N` splits the
host CPU into N logical devices, so MirroredStrategy really runs N replicas on
a laptop or in CI.
"""

import tensorflow as tf
from absl import logging

from pipeline import errors


class StrategyError(errors.Error):
  """The requested strategy cannot run here; the message says what to change."""


def configure_devices(cpu_devices):
  """Splits the CPU into logical devices; must run before TF initialises devices."""
  cpus = tf.config.list_physical_devices('CPU')
  if cpu_devices > 1:
    try:
      tf.config.set_logical_device_configuration(
          cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    except RuntimeError:
      existing = len(tf.config.list_logical_devices('CPU'))
      if existing != cpu_devices:
        raise StrategyError(
            f'runtime.cpu_devices={cpu_devices}, but TensorFlow already started '
            f'with {existing} CPU device(s) in this process. Set it in a fresh '
            'process.') from None


def make_strategy(runtime):
  """Returns the tf.distribute strategy for a `runtime` config section."""
  configure_devices(runtime.cpu_devices)
  name = runtime.strategy
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'auto':
    if gpus:
      name = 'mirrored' if len(gpus) > 1 else 'gpu'
    else:
      name = 'mirrored' if runtime.cpu_devices > 1 else 'cpu'
  if name == 'cpu':
    strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  elif name == 'gpu':
    strategy = tf.distribute.OneDeviceStrategy('/gpu:0')
  elif name == 'mirrored':
    devices = [d.name for d in gpus] or [
        d.name for d in tf.config.list_logical_devices('CPU')]
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=None if gpus else
        tf.distribute.ReductionToOneDevice())
  else:
    raise StrategyError(f'Unknown runtime.strategy {name!r}.')
  logging.info('Strategy %s with %d replica(s): %s', name,
               strategy.num_replicas_in_sync, type(strategy).__name__)
  return strategy


def check_batch(global_batch, strategy, what='data.batch_size'):
  """Raises unless the global batch divides evenly across replicas."""
  n = strategy.num_replicas_in_sync
  if global_batch % n:
    lo = max(n, global_batch // n * n)
    raise StrategyError(
        f'{what}={global_batch} does not divide across {n} replicas. Use a '
        f'multiple of {n}, e.g. --config.{what}={lo} or {lo + n}.')
