"""launch.cluster: ports, TF_CONFIG, log streaming, failure, preemption, timeout, signals.

Real processes on 127.0.0.1, but the workers are a tiny fake module written
into tmp_path (`--module=fakeworker`), not TensorFlow: this file tests the
supervision. Tests wait for output lines, never for a fixed time, and every
wait is bounded.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.cloud import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each worker takes its action from --actions=<action of worker 0>,<of worker 1>,...
#   exit:N        exit with code N
#   after:J:N     wait until worker J is ready (its ready file exists), then exit N
#   block         wait for a file that is never created (SIGTERM kills it)
#   stubborn      like block, but ignores SIGTERM (only SIGKILL stops it)
#   checkpoint    like block, but on SIGTERM prints which signal came and exits 75
#   preempt_once  exit 75 the first time this index runs, 0 after (counter file)
#   spam          print many long lines to stdout and stderr, then exit 0
# Every worker first prints its TF_CONFIG and argv, installs its signal
# handling, then prints `ready` and creates <state>/ready<index>.
FAKE_WORKER = textwrap.dedent('''
    import json, os, signal, sys, time

    args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if '=' in a)
    state = args['--state'[2:]]
    spec = json.loads(os.environ['TF_CONFIG'])
    index = spec['task']['index']
    action = args['actions'].split(',')[index]
    print('tf_config ' + json.dumps(spec))
    print('argv ' + json.dumps(sys.argv[1:]))
    print(f'hello from stderr of {index}', file=sys.stderr)

    def wait_for(path):
        while not os.path.exists(path):
            time.sleep(0.02)

    def on_sigterm(signum, frame):
        print(f'saving checkpoint on {signal.Signals(signum).name}')
        sys.exit(75)

    if action == 'stubborn':
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if action == 'checkpoint':
        signal.signal(signal.SIGTERM, on_sigterm)
    print('ready')
    open(os.path.join(state, f'ready{index}'), 'w').close()

    if action.startswith('exit:'):
        sys.exit(int(action.split(':')[1]))
    if action.startswith('after:'):
        _, other, code = action.split(':')
        wait_for(os.path.join(state, f'ready{other}'))
        sys.exit(int(code))
    if action in ('block', 'stubborn', 'checkpoint'):
        wait_for(os.path.join(state, 'never'))
    if action == 'preempt_once':
        counter = os.path.join(state, f'runs{index}')
        runs = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, 'w').write(str(runs + 1))
        sys.exit(75 if runs == 0 else 0)
    if action == 'spam':
        for k in range(300):
            stream = sys.stdout if k % 2 else sys.stderr
            print(f'line {k} of worker {index} ' + str(index) * 300, file=stream)
        sys.exit(0)
''')

START_LINE = re.compile(r'^\[cluster\] worker (\d+) pid (\d+) port (\d+)$')


class Launcher:
  """`python -m launch.cluster` with the fake worker; reads its output line by line."""

  def __init__(self, tmp_path, actions, *flags, extra=()):
    (tmp_path / 'fakeworker.py').write_text(FAKE_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    self.started = time.monotonic()
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'launch.cluster', '--module=fakeworker', *flags, '--',
         f'--actions={actions}', f'--state={tmp_path}', *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line.rstrip('\n'))
    self._queue.put(None)

  def _next(self, deadline):
    try:
      line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
      raise AssertionError('launcher output stalled; so far:\n' + self.output) from None
    if line is not None:
      self.lines.append(line)
    return line

  @property
  def output(self):
    return '\n'.join(self.lines)

  def wait_for(self, pattern, timeout=15):
    """Returns the match of the first line, read so far or next, that matches `pattern`."""
    for line in self.lines:
      match = re.search(pattern, line)
      if match:
        return match
    deadline = time.monotonic() + timeout
    while True:
      line = self._next(deadline)
      if line is None:
        raise AssertionError(f'launcher exited before {pattern!r}:\n{self.output}')
      match = re.search(pattern, line)
      if match:
        return match

  def finish(self, timeout=15):
    """Reads the rest of the output; returns (exit code, seconds since start)."""
    deadline = time.monotonic() + timeout
    while self._next(deadline) is not None:
      pass
    code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    return code, time.monotonic() - self.started

  def pids(self):
    return {int(m.group(1)): int(m.group(2))
            for m in map(START_LINE.match, self.lines) if m}

  def worker_lines(self, index):
    prefix = f'[worker {index}] '
    return [l[len(prefix):] for l in self.lines if l.startswith(prefix)]

  def cleanup(self):
    # Only after a failed test: a launcher still running still owns live workers.
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
      for pid in self.pids().values():
        try:
          os.killpg(pid, signal.SIGKILL)
        except OSError:
          pass


@pytest.fixture
def launch(tmp_path):
  launchers = []

  def start(actions, *flags, **kwargs):
    launchers.append(Launcher(tmp_path, actions, *flags, **kwargs))
    return launchers[-1]

  yield start
  for l in launchers:
    l.cleanup()


def _gone(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


def test_tf_config_and_free_ports():
  ports = cluster.free_ports(3)
  assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
  spec = json.loads(cluster.tf_config([1111, 2222], 1))
  assert spec == {'cluster': {'worker': ['127.0.0.1:1111', '127.0.0.1:2222']},
                  'task': {'type': 'worker', 'index': 1}}


@pytest.mark.parametrize('flags,expected', [
    ([], ['--config.runtime.strategy=multi_worker']),
    (['--config=c.py', '--workdir=w'],
     ['--config=c.py', '--workdir=w', '--config.runtime.strategy=multi_worker']),
    (['--config.runtime.strategy=cpu'], ['--config.runtime.strategy=cpu']),
    (['--config.runtime.strategy', 'cpu'], ['--config.runtime.strategy', 'cpu']),
    (['-config.runtime.strategy=cpu'], ['-config.runtime.strategy=cpu']),
    (['--config.runtime.strategy_x=1'],
     ['--config.runtime.strategy_x=1', '--config.runtime.strategy=multi_worker']),
    # After a bare '--' absl takes arguments as positional: insert before it.
    (['--a=1', '--', '--config.runtime.strategy=cpu'],
     ['--a=1', '--config.runtime.strategy=multi_worker', '--', '--config.runtime.strategy=cpu']),
])
def test_worker_args_add_multi_worker_strategy_unless_set(flags, expected):
  assert cluster.worker_args(flags) == expected


def test_workers_share_one_cluster_with_own_index_and_prefixed_logs(launch):
  run = launch('spam,spam,spam', '--num_workers=3', extra=['--config.x=1'])
  code, _ = run.finish()
  assert code == 0, run.output
  starts = [START_LINE.match(l) for l in run.lines if START_LINE.match(l)]
  assert [int(m.group(1)) for m in starts] == [0, 1, 2]
  ports = [int(m.group(3)) for m in starts]
  assert len(set(ports)) == 3
  for i in range(3):
    lines = run.worker_lines(i)
    spec = json.loads(next(l for l in lines if l.startswith('tf_config '))[len('tf_config '):])
    assert spec['task'] == {'type': 'worker', 'index': i}
    assert spec['cluster']['worker'] == [f'127.0.0.1:{p}' for p in ports]
    argv = json.loads(next(l for l in lines if l.startswith('argv '))[len('argv '):])
    assert argv[-2:] == ['--config.x=1', '--config.runtime.strategy=multi_worker']
    assert f'hello from stderr of {i}' in lines  # stderr is streamed too
    spam = [l for l in lines if l.startswith('line ')]
    ks = [int(l.split()[1]) for l in spam]
    # Every line arrives whole (concurrent writers never split one), and each
    # stream in order; stdout and stderr are separate pipes, so they may mix.
    assert sorted(ks) == list(range(300))
    assert spam == [f'line {k} of worker {i} ' + str(i) * 300 for k in ks]
    assert [k for k in ks if k % 2] == sorted(k for k in ks if k % 2)
    assert [k for k in ks if not k % 2] == sorted(k for k in ks if not k % 2)
  assert all(re.match(r'\[(cluster|worker [0-2])\] ', l) for l in run.lines), run.output
  assert run.lines[-1] == '[cluster] all 3 workers exited 0'


def test_failure_stops_a_blocked_worker_and_exits_with_its_code(launch):
  run = launch('exit:3,block')
  code, seconds = run.finish()
  assert code == 3, run.output
  assert seconds < 6, f'took {seconds:.1f}s; grace is 10s, timeout 3600s'
  assert run.lines[-1] == '[cluster] worker 0 failed with exit code 3; stopped the others'
  assert ('[cluster] worker 1 ended: signal SIGTERM (the launcher sent SIGTERM)'
          in run.lines), run.output
  assert _gone(run.pids()[1])


def test_worker_ignoring_sigterm_gets_sigkill_after_grace(launch):
  run = launch('after:1:4,stubborn', '--grace_seconds=1')
  code, seconds = run.finish()
  assert code == 4, run.output
  assert 1 <= seconds < 8
  assert '[cluster] worker 1 ended: signal SIGKILL (the launcher sent SIGKILL)' in run.lines
  # The root cause is reported, not the kill that followed it.
  assert run.lines[-1] == '[cluster] worker 0 failed with exit code 4; stopped the others'


def test_sigkilled_worker_stops_the_others(launch):
  run = launch('block,block')
  run.wait_for(r'^\[worker 0\] ready$')
  pids = run.pids()
  run.wait_for(r'^\[worker 1\] ready$')
  os.kill(pids[1], signal.SIGKILL)
  code, _ = run.finish()
  assert code == 1, run.output
  assert run.lines[-1] == '[cluster] worker 1 failed with signal SIGKILL; stopped the others'
  assert '[cluster] worker 0 ended: signal SIGTERM (the launcher sent SIGTERM)' in run.lines
  assert _gone(pids[0])


def test_all_workers_succeed(launch):
  run = launch('exit:0,exit:0')
  code, _ = run.finish()
  assert code == 0, run.output
  assert run.lines[-1] == '[cluster] all 2 workers exited 0'


def test_preemption_relaunches_the_cluster_once(launch, tmp_path):
  # Worker 0 exits 75 in the first launch only; worker 1 always exits 0.
  run = launch('preempt_once,exit:0', '--restarts=1')
  code, _ = run.finish()
  assert code == 0, run.output
  restarts = [l for l in run.lines if l.startswith('[cluster]') and 'restart' in l]
  assert restarts == ['[cluster] preempted (worker 0 exited 75); restart 1/1'] or (
      restarts == ['[cluster] preempted (worker 0 exited 75; stopped the others); restart 1/1'])
  assert sum(l.startswith('[cluster] starting 2 workers') for l in run.lines) == 2
  assert (tmp_path / 'runs0').read_text() == '2'
  assert run.lines[-1] == '[cluster] all 2 workers exited 0'


@pytest.mark.parametrize('restarts', [0, 1])
def test_preemption_without_restarts_left_exits_75(launch, restarts):
  run = launch('exit:75,block', f'--restarts={restarts}')
  code, _ = run.finish()
  assert code == 75, run.output
  assert sum(l.startswith('[cluster] starting') for l in run.lines) == restarts + 1
  assert run.lines[-1].startswith('[cluster] preempted (worker 0 exited 75; stopped the others)')
  assert 'the same command resumes' in run.lines[-1]


def test_timeout_stops_everything(launch):
  run = launch('block,block', '--timeout=1.5')
  code, seconds = run.finish()
  assert code == 124, run.output
  assert seconds < 8
  assert run.lines[-1] == '[cluster] timeout: workers still running after 1.5s; stopped them (exit 124)'
  assert all(_gone(pid) for pid in run.pids().values())


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_to_launcher_is_forwarded_as_sigterm(launch, sig):
  run = launch('checkpoint,checkpoint')
  run.wait_for(r'^\[worker 0\] ready$')
  run.wait_for(r'^\[worker 1\] ready$')
  run.proc.send_signal(sig)
  code, _ = run.finish()
  assert code == 75, run.output
  for i in range(2):
    assert 'saving checkpoint on SIGTERM' in run.worker_lines(i)
  assert run.lines[-1].startswith(f'[cluster] stopped by {sig.name}; all workers exited 0 or 75')


def test_second_signal_kills_workers_at_once(launch):
  run = launch('stubborn,stubborn', '--grace_seconds=60')
  run.wait_for(r'^\[worker 0\] ready$')
  run.wait_for(r'^\[worker 1\] ready$')
  run.proc.send_signal(signal.SIGTERM)
  run.wait_for(r'^\[cluster\] got SIGTERM')
  run.proc.send_signal(signal.SIGTERM)
  code, seconds = run.finish()
  assert code == 1, run.output
  assert seconds < 15
  assert 'signal SIGKILL' in run.lines[-1]
  assert all(_gone(pid) for pid in run.pids().values())
