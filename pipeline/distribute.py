"""Strategy selection: one place decides where the replicas run.

`runtime.strategy`:
  auto          a TPU if one is attached, else GPUs (mirrored if several), else the CPU
                (mirrored over `runtime.cpu_devices` logical devices if > 1);
  cpu / gpu     one replica on that device;
  mirrored      MirroredStrategy over all local GPUs, or the logical CPU devices;
  multi_worker  MultiWorkerMirroredStrategy over the hosts listed in TF_CONFIG;
  tpu           TPUStrategy on `runtime.tpu` ('local' on a TPU VM).
"""

import dataclasses
import glob
import json
import os

import tensorflow as tf
from absl import logging

from pipeline import errors


class StrategyError(errors.Error):
  """The requested strategy cannot run here; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Worker:
  """This process's place in the cluster."""
  index: int = 0
  count: int = 1
  is_chief: bool = True


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


def _tpu_attached():
  """Whether this host looks like a TPU VM (devices may only be listed after init)."""
  return bool(tf.config.list_logical_devices('TPU') or glob.glob('/dev/accel*')
              or os.environ.get('TPU_NAME') or os.environ.get('TPU_ACCELERATOR_TYPE'))


def _tpu_strategy(tpu):
  # Without a TPU, TF 2.21 fails deep inside TPUStrategy with a bare IndexError,
  # so initialise first and check the devices, and name the flags on failure.
  hint = ('Run on a Cloud TPU VM with tensorflow-tpu installed, set '
          '--config.runtime.tpu=<name> for a TPU reached over the network, or pick '
          '--config.runtime.strategy=cpu|gpu|auto.')
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu not in ('', 'local'):
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, tf.errors.OpError) as e:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise StrategyError(f'runtime.strategy=tpu, but no TPU devices were found '
                        f'(runtime.tpu={tpu!r}: {first}). {hint}') from None
  if not tf.config.list_logical_devices('TPU'):
    raise StrategyError(f'runtime.strategy=tpu, but no TPU devices were found after '
                        f'initialising runtime.tpu={tpu!r}. {hint}')
  return tf.distribute.TPUStrategy(resolver)


def _multi_worker_strategy():
  if 'TF_CONFIG' not in os.environ:
    raise StrategyError(
        'runtime.strategy=multi_worker needs TF_CONFIG in the environment. Start '
        'local workers with `python -m launch.cluster --num_workers=N -- <train flags>`, '
        'or export TF_CONFIG on each host (see BUILD.md).')
  try:
    spec = json.loads(os.environ['TF_CONFIG'])
    spec['cluster']['worker']  # pylint: disable=pointless-statement
  except (ValueError, KeyError, TypeError):
    raise StrategyError('TF_CONFIG is not valid JSON with cluster.worker and task '
                        '(see BUILD.md).') from None
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver())


def make_strategy(runtime):
  """Returns the tf.distribute strategy for a `runtime` config section."""
  name = runtime.strategy
  if name == 'multi_worker':
    # MultiWorkerMirroredStrategy must be created before any other TF op runs.
    strategy = _multi_worker_strategy()
  else:
    configure_devices(runtime.cpu_devices)
    gpus = tf.config.list_logical_devices('GPU')
    if name == 'auto':
      if _tpu_attached():
        name = 'tpu'
      elif gpus:
        name = 'mirrored' if len(gpus) > 1 else 'gpu'
      else:
        name = 'mirrored' if runtime.cpu_devices > 1 else 'cpu'
    if name == 'gpu' and not gpus:
      raise StrategyError(
          'runtime.strategy=gpu, but TensorFlow sees no GPU (is the tensorflow[and-cuda] '
          'wheel installed and nvidia-smi working?). Use --config.runtime.strategy=cpu '
          'or auto.')
    if name == 'cpu':
      strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
    elif name == 'gpu':
      strategy = tf.distribute.OneDeviceStrategy('/gpu:0')
    elif name == 'mirrored':
      devices = [d.name for d in gpus] or [
          d.name for d in tf.config.list_logical_devices('CPU')]
      strategy = tf.distribute.MirroredStrategy(
          devices, cross_device_ops=None if gpus else tf.distribute.ReductionToOneDevice())
    elif name == 'tpu':
      strategy = _tpu_strategy(runtime.tpu)
    else:
      raise StrategyError(f'Unknown runtime.strategy {name!r}.')
  logging.info('Strategy %s with %d replica(s): %s', name,
               strategy.num_replicas_in_sync, type(strategy).__name__)
  return strategy


def worker(strategy):
  """Returns this process's Worker: index, count, and whether it is the chief."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
    return Worker()
  jobs = resolver.cluster_spec().as_dict()
  count = sum(len(v) for k, v in jobs.items() if k in ('chief', 'worker'))
  task_type, index = resolver.task_type, resolver.task_id or 0
  is_chief = task_type == 'chief' or (task_type == 'worker' and index == 0 and 'chief' not in jobs)
  return Worker(index=index if task_type == 'worker' else 0, count=count, is_chief=is_chief)


def has_gpu():
  return bool(tf.config.list_logical_devices('GPU'))


def check_batch(global_batch, strategy, what='data.batch_size'):
  """Raises unless the global batch divides evenly across replicas."""
  n = strategy.num_replicas_in_sync
  if global_batch % n:
    lo = max(n, global_batch // n * n)
    raise StrategyError(
        f'{what}={global_batch} does not divide across {n} replicas. Use a '
        f'multiple of {n}, e.g. --config.{what}={lo} or {lo + n}.')
