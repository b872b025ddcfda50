"""The VM-side shell scripts (pipeline/cloud/remote.py), run here by sh.

(The quoting of the train script is checked end to end, from the printed
plan, in tests/plan_test.py.)
"""

import json
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



def test_doctor_script_runs_the_doctor_with_the_train_env_and_returns_its_status(tmp_path):
  home = tmp_path / 'home'
  (home / 'charlstm' / 'r2').mkdir(parents=True)
  python = home / 'charlstm' / 'venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(f'#!{sys.executable}\nimport json, os, sys\n'
                    'json.dump([sys.argv[1:], os.environ["TPU_LOAD_LIBRARY"], os.getcwd()], '
                    'open("doctor.json", "w"))\nsys.exit(3)\n')
  python.chmod(0o755)
  script = remote.doctor_script('r2', 'gs://b/charlstm/r2/workdir', remote.tpu_env(False))
  proc = subprocess.run(['sh', '-c', script], cwd=home, env=dict(CHILD_ENV, HOME=str(home)),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr  # a failing doctor fails the step
  assert json.loads((home / 'charlstm/r2/doctor.json').read_text()) == [
      ['-m', 'launch.doctor', '--config=config.py', '--workdir=gs://b/charlstm/r2/workdir'], '0',
      str(home / 'charlstm' / 'r2')]
