"""Multi-worker training with real TensorFlow workers on 127.0.0.1, via launch.cluster.

Covers: identical weights on both workers, equality with one replica,
SIGTERM preemption + relaunch reproducing an uninterrupted run bit for bit in
both data modes (carried LSTM state included), and a SIGKILLed worker making
the cluster fail fast and the relaunch resume from the last checkpoint.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import config as config_lib
from pipeline import train
from tests.conftest import CHILD_ENV, ROOT

STEPS = 40
FLAGS = ['--config=configs/shakespeare.py:smoke', f'--config.train.num_steps={STEPS}',
         '--config.train.steps_per_loop=10', '--config.train.log_every=10',
         '--config.train.eval_every=20', '--config.train.checkpoint_every=20',
         '--config.train.export=false']


class Cluster:
  """`python -m launch.cluster` in the background, with its output collected line by line."""

  def __init__(self, workdir, *flags, restarts=0, timeout=240):
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'launch.cluster', '--num_workers=2', f'--restarts={restarts}',
         f'--timeout={timeout}', '--grace_seconds=5', '--', f'--workdir={workdir}', *flags],
        cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._cond = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line.rstrip('\n'))
        self._cond.notify_all()
    with self._cond:
      self._cond.notify_all()

  def wait_for(self, pattern, timeout=180):
    """Returns the first match of `pattern` in the output, waiting for it (bounded)."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    with self._cond:
      while True:
        for line in self.lines:
          m = rx.search(line)
          if m:
            return m
        left = deadline - time.monotonic()
        if left <= 0 or (self.proc.poll() is not None and not self._more()):
          raise AssertionError(f'{pattern!r} never appeared:\n' + '\n'.join(self.lines[-40:]))
        self._cond.wait(min(left, 1.0))

  def _more(self):
    return not self.proc.stdout.closed and self.proc.returncode is None

  def pid(self, worker):
    return int(self.wait_for(rf'\[cluster\] worker {worker} pid (\d+)').group(1))

  def finish(self, timeout=240):
    self.proc.wait(timeout=timeout)
    self.wait_for(r'\[cluster\] ', timeout=5)
    return self.proc.returncode

  def digests(self):
    return {int(w): d for w, d in re.findall(r'\[worker (\d)\].*weights digest (\w+)',
                                             '\n'.join(self.lines))}

  def text(self):
    return '\n'.join(self.lines)


def run_cluster(workdir, *flags, restarts=0):
  c = Cluster(workdir, *flags, restarts=restarts)
  assert c.finish() == 0, c.text()[-4000:]
  return c


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Uninterrupted 2-worker runs, one per data mode."""
  out = {}
  for mode in ('shuffle', 'stream'):
    workdir = tmp_path_factory.mktemp(f'ref_{mode}')
    c = run_cluster(workdir, *FLAGS, f'--config.data.mode={mode}')
    out[mode] = (workdir, c)
  return out


def test_two_workers_end_bit_identical_and_match_one_replica(reference, tmp_path):
  workdir, c = reference['stream']
  digests = c.digests()
  assert sorted(digests) == [0, 1] and digests[0] == digests[1], c.text()[-3000:]
  assert 'Strategy multi_worker with 2 replica(s)' in c.text()
  # Only the chief writes the run's files; the other worker's temp dir is gone.
  assert (workdir / 'checkpoints').is_dir() and (workdir / 'tb').is_dir()
  assert not list(workdir.glob('workertemp_*'))
  # Same global batch and seed on one replica: the same losses.
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  cfg = shakespeare.get_config('smoke')
  config_lib.override(cfg, **{'data.mode': 'stream', 'train.num_steps': STEPS,
                              'train.steps_per_loop': 10, 'train.log_every': 10,
                              'train.eval_every': 20, 'train.checkpoint_every': 20,
                              'train.export': False})
  one = train.train_and_evaluate(cfg, str(tmp_path / 'one'))
  hist = json.loads((workdir / 'history.json').read_text())
  assert hist['train'][-1][0] == STEPS
  assert hist['train'][-1][1] == pytest.approx(one['train_loss'], abs=2e-5)
  assert hist['val'][-1][1] == pytest.approx(one['val_loss'], abs=2e-5)


@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
def test_sigterm_to_one_worker_then_relaunch_matches_uninterrupted_run(reference, tmp_path, mode):
  c = Cluster(tmp_path, *FLAGS, f'--config.data.mode={mode}', restarts=1)
  victim = c.pid(1)
  c.wait_for(r'\[worker 1\].*step 10/')
  subprocess.run(['kill', '-TERM', str(victim)], check=True)
  assert c.finish() == 0, c.text()[-4000:]
  saved = int(c.wait_for(r'saved a checkpoint at step (\d+)').group(1))
  assert 10 <= saved < STEPS  # it really stopped mid-run ...
  c.wait_for(r'\[cluster\] preempted .*restart 1/1')
  c.wait_for(rf'Resumed from .*ckpt-{saved} at step {saved}')  # ... and resumed there
  want = reference[mode][1].digests()[0]
  assert c.digests() == {0: want, 1: want}


def test_sigkill_of_a_worker_fails_fast_and_relaunch_resumes(tmp_path):
  flags = [f for f in FLAGS if 'num_steps' not in f] + ['--config.train.num_steps=100000']
  c = Cluster(tmp_path, *flags)
  victim = c.pid(1)
  c.wait_for(r'\[worker 0\].*step 50/')  # checkpoints at 20 and 40 are on disk
  killed = time.monotonic()
  subprocess.run(['kill', '-KILL', str(victim)], check=True)
  code = c.finish(timeout=90)
  assert code != 0
  assert time.monotonic() - killed < 60
  c.wait_for(r'\[cluster\] worker 1 failed with signal SIGKILL')
  ckpts = sorted(int(p.name[5:-6]) for p in (tmp_path / 'checkpoints').glob('ckpt-*.index'))
  assert ckpts and ckpts[-1] >= 40
  last = ckpts[-1]
  again = run_cluster(tmp_path, *[f for f in flags if 'num_steps' not in f],
                      f'--config.train.num_steps={last + 20}')
  again.wait_for(rf'Resumed from .*ckpt-{last} at step {last}')
  assert again.digests()[0] == again.digests()[1]
