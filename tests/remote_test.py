"""The VM-side shell scripts (pipeline/cloud/remote.py), run here by sh.

(The quoting of the train script is checked end to end, from the printed
plan, in tests/plan_test.py.)
"""

import os
import subprocess
import sys

from pipeline.cloud import remote
from tests.conftest import CHILD_ENV


def test_train_script_follows_a_job_that_already_runs(tmp_path):
  """A second submission of a running job (reconnect, relaunch) follows it, never starts another."""
  home = tmp_path / 'home'
  run_dir = home / 'charlstm' / 'r1'
  run_dir.mkdir(parents=True)
  # The running "job": its command line names launch.train; it exits when its stdin closes.
  job = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read(); '
                          'open("train.exit", "w").write("0\\n")', 'launch.train'],
                         cwd=run_dir, stdin=subprocess.PIPE)
  (run_dir / 'train.pid').write_text(f'{job.pid}\n')
  script = remote.train_script('gs://b/charlstm/r1', 'r1', ['--config=config.py'], [], 'h')
  follower = subprocess.Popen(['sh', '-c', script], cwd=home, env=dict(CHILD_ENV, PATH=os.environ['PATH'],
                              HOME=str(home)), stdout=subprocess.PIPE, text=True)
  first = follower.stdout.readline()
  assert first == f'charlstm: launch.train already runs here (pid {job.pid}); following it\n'
  job.stdin.close()  # the job ends; the follower sees it and takes its exit status
  job.wait(timeout=30)
  assert follower.wait(timeout=30) == 0
  assert (run_dir / 'train.pid').read_text() == f'{job.pid}\n'  # no second job was started

