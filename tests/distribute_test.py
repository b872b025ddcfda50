"""Strategy selection: clear errors when the hardware or cluster is missing."""

import importlib.util

import pytest

from pipeline import config as config_lib
from pipeline import distribute
from tests.conftest import error_lines, run


def runtime(**kw):
  r = config_lib.base_config().runtime
  r.update(kw)
  return r


def test_gpu_without_gpu_is_a_clear_error():
  with pytest.raises(distribute.StrategyError, match=r'sees no GPU.*strategy=cpu'):
    distribute.make_strategy(runtime(strategy='gpu'))


def test_multi_worker_without_tf_config_says_how_to_start_workers(monkeypatch):
  monkeypatch.delenv('TF_CONFIG', raising=False)
  with pytest.raises(distribute.StrategyError, match=r'TF_CONFIG.*launch.cluster'):
    distribute.make_strategy(runtime(strategy='multi_worker'))


def test_auto_on_a_cpu_only_machine_picks_one_cpu_replica():
  strategy = distribute.make_strategy(runtime(strategy='auto'))
  assert strategy.num_replicas_in_sync == 1
  assert distribute.worker(strategy) == distribute.Worker(index=0, count=1, is_chief=True)


def test_tpu_without_tpu_is_one_line_naming_the_flags_not_an_index_error(tmp_path):
  # In a subprocess: a failed TPU initialisation leaves the process's TF runtime unusable.
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path}', '--config.runtime.strategy=tpu'], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert 'no TPU devices were found' in lines[0]
  assert '--config.runtime.tpu' in lines[0] and '--config.runtime.strategy' in lines[0]
  assert 'IndexError' not in proc.stderr
  assert not list(tmp_path.glob('checkpoints/ckpt-*'))


def _fake_dev(tmp_path, *nodes):
  """A directory standing in for /dev, holding empty files named like device nodes."""
  dev = tmp_path / 'dev'
  for node in nodes:
    (dev / node).parent.mkdir(parents=True, exist_ok=True)
    (dev / node).touch()
  dev.mkdir(exist_ok=True)
  return str(dev)


def test_no_tpu_evidence_on_this_machine():
  assert importlib.util.find_spec('libtpu') is None  # what the fakes below rely on
  assert distribute.tpu_evidence(environ={}) == []


@pytest.mark.parametrize('nodes,env,found', [
    (('accel0',), {'TPU_ACCELERATOR_TYPE': 'v4-8'}, True),  # v2-v4 TPU VM
    (('vfio/vfio', 'vfio/0', 'vfio/1'), {'TPU_ACCELERATOR_TYPE': 'v5litepod-8'}, True),  # v5e
    (('vfio/vfio', 'vfio/3'), {'TPU_WORKER_ID': '0'}, True),  # v6e
    (('accel0',), {}, False),  # a device node alone may be something else
    (('vfio/vfio', 'vfio/0'), {}, False),  # a GPU passed through with VFIO
    (('vfio/vfio',), {'TPU_NAME': 'x'}, False),  # the VFIO control node is no device
    ((), {'TPU_ACCELERATOR_TYPE': 'v5litepod-8'}, False),  # env alone: no TPU on this host
])
def test_tpu_evidence_needs_device_nodes_and_tpu_environment(tmp_path, nodes, env, found):
  evidence = distribute.tpu_evidence(environ=env, dev_dir=_fake_dev(tmp_path, *nodes))
  assert bool(evidence) == found, evidence
  if found:
    assert str(tmp_path / 'dev') in evidence[0]
    assert any(k in ' '.join(evidence) for k in env)


def test_auto_on_a_host_that_looks_like_a_tpu_vm_fails_instead_of_training_on_cpu(tmp_path):
  # A v5e host whose TensorFlow has no TPU support: auto must not quietly use the CPU.
  dev = _fake_dev(tmp_path, 'vfio/vfio', 'vfio/0')
  env = {distribute.DEV_DIR_ENV: dev, 'TPU_ACCELERATOR_TYPE': 'v5litepod-8'}
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path / "w"}', '--config.runtime.strategy=auto'],
             check=False, env=env)
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert 'runtime.strategy=auto chose the TPU' in lines[0]
  assert f'{dev}/vfio/0' in lines[0] and 'TPU_ACCELERATOR_TYPE=v5litepod-8' in lines[0]
  assert not list((tmp_path / 'w').glob('checkpoints/ckpt-*'))
