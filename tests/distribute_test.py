"""Strategy selection: clear errors when the hardware or cluster is missing."""

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
