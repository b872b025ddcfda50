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
import importlib.util
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


# Set on Cloud TPU VMs (by the VM image or the TPU runtime); any of them says
# the host was made as a TPU host.
TPU_ENV_VARS = ('TPU_NAME', 'TPU_ACCELERATOR_TYPE', 'TPU_WORKER_ID', 'TPU_WORKER_HOSTNAMES',
                'TPU_CHIPS_PER_HOST_BOUNDS', 'TPU_HOST_BOUNDS', 'TPU_SKIP_MDS_QUERY')
DEV_DIR_ENV = 'CHARLSTM_DEV_DIR'  # where device nodes are looked for (default /dev; tests)


def tpu_evidence(environ=None, dev_dir=None):
  """What says this host has a TPU: a list of reasons, empty if nothing does.

  TensorFlow's own discovery is the surest sign, but the TPU platform only
  lists its devices once it is initialised, so the host is also read
  directly. v2-v4 TPU VMs expose /dev/accel*; v5e and v6e expose VFIO groups
  (/dev/vfio/<n>), which passthrough GPUs have too, so device nodes count only
  together with a TPU environment variable or an installed libtpu.
  """
  environ = os.environ if environ is None else environ
  dev = dev_dir or environ.get(DEV_DIR_ENV) or '/dev'
  reasons = [f'TensorFlow lists {d.name}' for d in
             tf.config.list_physical_devices('TPU') + tf.config.list_logical_devices('TPU')]
  if reasons:
    return reasons[:1]
  nodes = sorted(glob.glob(os.path.join(dev, 'accel*')) + [
      p for p in glob.glob(os.path.join(dev, 'vfio', '*')) if os.path.basename(p).isdigit()])
  env = [f'{k}={environ[k]}' for k in TPU_ENV_VARS if environ.get(k)]
  libtpu = importlib.util.find_spec('libtpu') is not None
  if nodes and (env or libtpu):
    return [', '.join(nodes[:2]) + ('...' if len(nodes) > 2 else '')] + env[:2] + (
        ['libtpu installed'] if libtpu else [])
  return []


def _tpu_strategy(tpu, found=None):
  # Without a TPU, TF 2.21 fails deep inside TPUStrategy with a bare IndexError,
  # so initialise first and check the devices, and name the flags on failure.
  hint = ('Run on a Cloud TPU VM with tensorflow-tpu installed, set '
          '--config.runtime.tpu=<name> for a TPU reached over the network, or pick '
          '--config.runtime.strategy=cpu|gpu|auto.')
  if found:  # auto chose the TPU; say why, so a host that only looks like one is clear
    hint = (f'runtime.strategy=auto chose the TPU because of: {"; ".join(found)}. '
            'Is tensorflow-tpu installed (pip install -e .[tpu])? Or pick '
            '--config.runtime.strategy=cpu|gpu.')
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
    found = None
    if name == 'auto':
      found = tpu_evidence()
      if found:  # never fall back to the host CPU in silence on a TPU VM
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
      strategy = _tpu_strategy(runtime.tpu, found)
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


CPUINFO = '/proc/cpuinfo'
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16', 'bf16')  # x86 (AVX512-BF16, AMX), Arm (FEAT_BF16)


def cpu_bf16_flags(cpuinfo=None):
  """The CPU's bfloat16 matmul features (a subset of BF16_CPU_FLAGS); None if unknown.

  oneDNN runs bfloat16 matmuls natively only with these; elsewhere TensorFlow
  converts them to float32 and back, slower than float32 itself.
  """
  try:
    with open(cpuinfo or CPUINFO, encoding='utf-8', errors='replace') as f:
      text = f.read()
  except OSError:
    return None  # not Linux: cannot tell
  flags = set()
  for line in text.splitlines():
    key, _, value = line.partition(':')
    if key.strip() in ('flags', 'Features'):
      flags.update(value.split())
  return sorted(flags.intersection(BF16_CPU_FLAGS))


def precision_for(precision, strategy, fallback=True):
  """The precision to train in: bfloat16 falls back to float32, loudly, on a CPU without bf16.

  fallback=False keeps bfloat16 anyway (launch.bench's numerics check, which
  runs it under XLA: bfloat16 operands, float32 products, at float32 speed).
  """
  if (not fallback or precision != 'bfloat16' or has_gpu()
      or isinstance(strategy, tf.distribute.TPUStrategy)):
    return precision
  found = cpu_bf16_flags()
  if found is None or found:
    return precision
  logging.warning(
      'runtime.precision=bfloat16, but this CPU has none of %s in %s: TensorFlow would '
      'emulate bfloat16 matmuls, slower than float32. Training in float32 instead; set '
      '--config.runtime.precision=float32 to say so, or run on a CPU with AVX512-BF16 or '
      'AMX (e.g. Intel Cooper Lake, Sapphire Rapids or later), Arm BF16, or a TPU.',
      ', '.join(BF16_CPU_FLAGS), CPUINFO)
  return 'float32'


def check_batch(global_batch, strategy, what='data.batch_size'):
  """Raises unless the global batch divides evenly across replicas."""
  n = strategy.num_replicas_in_sync
  if global_batch % n:
    lo = max(n, global_batch // n * n)
    raise StrategyError(
        f'{what}={global_batch} does not divide across {n} replicas. Use a '
        f'multiple of {n}, e.g. --config.{what}={lo} or {lo + n}.')


def check_chains(global_batch, chains, strategy):
  """Raises unless train.lstm_chains (if set) divides each replica's batch."""
  per_replica = global_batch // strategy.num_replicas_in_sync
  if chains and per_replica % chains:
    raise StrategyError(
        f'train.lstm_chains={chains} does not divide the {per_replica} rows each replica '
        f'trains on. Use a divisor of {per_replica}, or --config.train.lstm_chains=0 '
        '(one per CPU core).')
