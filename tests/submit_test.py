"""launch.submit: exact gcloud commands per target, real staging, the remote scripts, errors.

The dry runs are checked as argument lists, parsed back from the printed
script with shlex. Real (non-dry) runs stage into fake-gcs-server
(tests/gcs_emulator.py) and call a recording stand-in for `gcloud` put first
on PATH: there is no cloud here, and the stand-in shows exactly what would
have run, in which order. The staged wheel is downloaded and installed into a
fresh venv, which then trains from it outside the checkout. Where the real
gcloud is installed, it parses every planned command (an empty gcloud config
makes each stop at "no active account" instead of doing anything).
"""

import concurrent.futures
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

from pipeline import accelerators
from pipeline import remote
from pipeline import submit
from tests import gcs_emulator
from tests.conftest import CHILD_ENV, ROOT, error_lines, run

BUCKET = 'charlstm-submit'
SCOPES = '--scopes=https://www.googleapis.com/auth/cloud-platform'
WHEEL = 'charlstm-0.1.0-py3-none-any.whl'
# Spaces, both quotes and shell syntax that must not be expanded on the VM.
PROMPT = 'It\'s a "test" here; $HOME `echo no` $(echo no) \\n'
SMOKE = ['--config=configs/shakespeare.py:smoke', '--config.train.num_steps=100']


def _commands(script):
  """The commands of a printed plan, as argv lists (comments and `wait` skipped, `&` dropped)."""
  commands, pending = [], ''
  for line in script.splitlines():
    if not pending and (not line or line.startswith('#') or line == 'wait'):
      continue
    pending = f'{pending}\n{line}' if pending else line
    try:
      argv = shlex.split(pending)
    except ValueError:  # a quoted --command=... spans several lines
      continue
    pending = ''
    commands.append(argv[:-1] if argv[-1] == '&' else argv)
  return commands


def _uploads(script):
  prefix = '#   upload '
  return [tuple(l[len(prefix):].split(' -> ')) for l in script.splitlines() if l.startswith(prefix)]


def _script(argv):
  """The --command=SCRIPT of a gcloud ssh argv, as its lines."""
  [command] = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):].split('\n')


def _train_argv(argv):
  """The launch.train argv inside a train command's script: TRAIN='...', shell-parsed twice."""
  [line] = [l for l in _script(argv) if l.startswith('TRAIN=')]
  [assignment] = shlex.split(line)
  return shlex.split(assignment[len('TRAIN='):])


def _dry_run(flags, train_flags):
  proc = run(['-m', 'launch.submit', *flags, '--dry_run', '--', *train_flags])
  return proc.stdout, _commands(proc.stdout)


def _install_lines(run_id, extra, links=''):
  url = f'gs://{BUCKET}/charlstm/{run_id}'
  return ['set -eu', f'mkdir -p charlstm/{run_id}', f'cd charlstm/{run_id}',
          f'gcloud storage cp {url}/{WHEEL} {url}/config.py .',
          'test -x ../venv/bin/pip || python3 -m venv ../venv || { rm -rf ../venv; sudo apt-get '
          'update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv ../venv; }',
          '../venv/bin/python -m pip install --quiet --upgrade pip',
          f"../venv/bin/python -m pip install --quiet './{WHEEL}[{extra}]'{links}",
          f'../venv/bin/python -m pip install --quiet --no-deps --force-reinstall ./{WHEEL}']


def _python_train(run_id, *flags):
  url = f'gs://{BUCKET}/charlstm/{run_id}'
  return ['../venv/bin/python', '-m', 'launch.train', '--config=config.py',
          '--config.train.num_steps=100', *flags,
          f'--config.data.corpus={url}/corpus/tinyshakespeare.txt.gz', f'--workdir={url}/workdir']


# --- dry runs: the exact commands for each target --------------------------------

def test_dry_run_tpu_single_host(tmp_path):
  out, commands = _dry_run(
      ['--target=tpu-vm', '--name=tpu1', '--zone=us-west4-a', f'--bucket=gs://{BUCKET}',
       '--accelerator_type=v5litepod-8', '--create', '--delete_after', '--run_id=t1'],
      SMOKE + ['--config.runtime.precision=bfloat16'])
  url = f'gs://{BUCKET}/charlstm/t1'
  assert _uploads(out) == [('<wheel>', f'{url}/{WHEEL}'), ('<config.py>', f'{url}/config.py'),
                           (str(ROOT / 'data/tinyshakespeare.txt.gz'),
                            f'{url}/corpus/tinyshakespeare.txt.gz')]
  create, setup, train, delete = commands
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'tpu1', '--zone=us-west4-a',
                    '--accelerator-type=v5litepod-8', '--version=tpu-vm-tf-2.21.0-pjrt', SCOPES]
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1', '--zone=us-west4-a', '--worker=all']
  assert setup[:-1] == ssh and train[:-1] == ssh
  assert _script(setup) == _install_lines(
      't1', 'tpu', ' -f https://storage.googleapis.com/libtpu-tf-releases/index.html')
  assert _train_argv(train) == _python_train('t1', '--config.runtime.precision=bfloat16',
                                             '--config.runtime.strategy=tpu')
  assert 'export NEXT_PLUGGABLE_DEVICE_USE_C_API=true' in _script(train)
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=us-west4-a',
                    '--quiet']
  assert f'# TensorBoard: tensorboard --logdir {url}/workdir/tb' in out.splitlines()


def test_dry_run_tpu_pod_installs_on_all_workers_and_trains_from_worker_0():
  out, commands = _dry_run(
      ['--target=tpu-vm', '--name=pod1', '--zone=us-central2-b', f'--bucket=gs://{BUCKET}',
       '--accelerator_type=v4-32', '--create', '--spot', '--project=my-proj', '--run_id=p1'],
      SMOKE)
  create, setup, train = commands  # no --delete_after: no delete
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod1', '--zone=us-central2-b',
                    '--accelerator-type=v4-32', '--version=tpu-vm-tf-2.21.0-pod-pjrt', SCOPES,
                    '--spot', '--project=my-proj']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod1', '--zone=us-central2-b']
  assert setup[:-3] == ssh and setup[-3] == '--worker=all' and setup[-1] == '--project=my-proj'
  assert train[:-3] == ssh and train[-3] == '--worker=0' and train[-1] == '--project=my-proj'
  assert _script(setup) == _install_lines(
      'p1', 'tpu', ' -f https://storage.googleapis.com/libtpu-tf-releases/index.html')
  assert 'export TPU_LOAD_LIBRARY=0' in _script(train)
  assert _train_argv(train) == _python_train('p1', '--config.runtime.strategy=tpu',
                                             '--config.runtime.tpu=pod1')
  assert 'pod slice, driven from worker 0' in out.splitlines()[0]


def test_dry_run_one_gpu_vm():
  out, commands = _dry_run(
      ['--target=gpu-vm', '--name=gpu1', '--zone=us-central1-a', f'--bucket=gs://{BUCKET}',
       '--machine_type=g2-standard-8', '--create', '--delete_after', '--run_id=g1'], SMOKE)
  create, setup, train, delete = commands
  assert create == ['gcloud', 'compute', 'instances', 'create', 'gpu1', '--zone=us-central1-a',
                    '--machine-type=g2-standard-8', '--maintenance-policy=TERMINATE',
                    '--image-family=common-cu129-ubuntu-2204-nvidia-580',
                    '--image-project=deeplearning-platform-release', '--boot-disk-size=200GB',
                    SCOPES]
  ssh = ['gcloud', 'compute', 'ssh', 'gpu1', '--zone=us-central1-a']
  assert setup[:-1] == ssh and train[:-1] == ssh
  assert _script(setup) == _install_lines('g1', 'gpu')
  assert _train_argv(train) == _python_train('g1', '--config.runtime.strategy=gpu')
  assert not [l for l in _script(train) if l.startswith('export')]
  assert delete == ['gcloud', 'compute', 'instances', 'delete', 'gpu1', '--zone=us-central1-a',
                    '--quiet']
  assert '1 x nvidia-l4 each' in out.splitlines()[0]


def test_dry_run_two_gpu_hosts_each_get_their_tf_config():
  out, commands = _dry_run(
      ['--target=gpu-vm', '--name=mw', '--zone=us-central1-a', f'--bucket=gs://{BUCKET}',
       '--machine_type=n1-standard-8', '--gpu=nvidia-tesla-t4:2', '--num_workers=2', '--create',
       '--spot', '--run_id=m1'], SMOKE)
  create, setup0, setup1, train0, train1 = commands
  assert create == ['gcloud', 'compute', 'instances', 'create', 'mw-0', 'mw-1',
                    '--zone=us-central1-a', '--machine-type=n1-standard-8',
                    '--accelerator=type=nvidia-tesla-t4,count=2', '--maintenance-policy=TERMINATE',
                    '--image-family=common-cu129-ubuntu-2204-nvidia-580',
                    '--image-project=deeplearning-platform-release', '--boot-disk-size=200GB',
                    SCOPES, '--provisioning-model=SPOT', '--instance-termination-action=STOP']
  for i, (setup, train) in enumerate([(setup0, train0), (setup1, train1)]):
    ssh = ['gcloud', 'compute', 'ssh', f'mw-{i}', '--zone=us-central1-a']
    assert setup[:-1] == ssh and train[:-1] == ssh
    assert _script(setup) == _install_lines('m1', 'gpu')
    assert _train_argv(train) == _python_train('m1', '--config.runtime.strategy=multi_worker')
    [export] = [l for l in _script(train) if l.startswith('export TF_CONFIG=')]
    assert json.loads(shlex.split(export)[1][len('TF_CONFIG='):]) == {
        'cluster': {'worker': ['mw-0:2222', 'mw-1:2222']}, 'task': {'type': 'worker', 'index': i}}
  # Pasted as a script, the workers start together: both train lines end in `&`, then `wait`.
  lines = out.splitlines()
  assert lines[lines.index('# 4. train') + 1].startswith('gcloud compute ssh mw-0 ')
  assert lines[lines.index('wait', lines.index('# 4. train')) - 1].endswith("' &")


def test_machine_types_decide_gpus_and_strategy():
  assert accelerators.gpus_per_host('g2-standard-24') == ('nvidia-l4', 2, False)
  assert accelerators.gpus_per_host('a3-highgpu-8g') == ('nvidia-h100-80gb', 8, False)
  assert accelerators.gpus_per_host('n1-standard-8', 'nvidia-tesla-v100') == (
      'nvidia-tesla-v100', 1, True)
  plan = submit.make_plan(submit.Spec(target='gpu-vm', name='big', zone='z',
                                      bucket=f'gs://{BUCKET}', machine_type='a2-highgpu-4g',
                                      create=True, run_id='a1'), SMOKE)
  assert _train_argv(plan.train[0])[-3] == '--config.runtime.strategy=mirrored'
  assert plan.config['runtime']['strategy'] == 'mirrored'
  assert '--machine-type=a2-highgpu-4g' in plan.create[0]
  assert not [a for a in plan.create[0] if a.startswith('--accelerator')]  # comes with its GPUs


@pytest.mark.parametrize('accelerator_type, single, version', [
    ('v2-8', True, 'tpu-vm-tf-2.21.0-pjrt'), ('v3-32', False, 'tpu-vm-tf-2.21.0-pod-pjrt'),
    ('v4-8', True, 'tpu-vm-tf-2.21.0-pjrt'), ('v4-16', False, 'tpu-vm-tf-2.21.0-pod-pjrt'),
    ('v5p-8', True, 'tpu-vm-tf-2.21.0-pjrt'), ('v5litepod-4', True, 'tpu-vm-tf-2.21.0-pjrt'),
    ('v5litepod-16', False, 'tpu-vm-tf-2.21.0-pod-pjrt'), ('v6e-8', True, 'tpu-vm-tf-2.21.0-pjrt')])
def test_tpu_types_decide_hosts_and_runtime_version(accelerator_type, single, version):
  assert accelerators.tpu_is_single_host(accelerator_type) is single
  assert accelerators.default_runtime_version(accelerator_type) == version
  plan = submit.make_plan(submit.Spec(target='tpu-vm', name='t', zone='z', bucket=f'gs://{BUCKET}',
                                      accelerator_type=accelerator_type, create=True,
                                      runtime_version='tpu-vm-tf-2.21.0-pjrt-v5e-and-v6'), SMOKE)
  assert '--version=tpu-vm-tf-2.21.0-pjrt-v5e-and-v6' in plan.create[0]  # --runtime_version wins


# --- quoting: a config value with spaces and quotes reaches launch.train intact --------

def test_quoted_config_value_survives_the_remote_command(tmp_path):
  """shlex-parsed, and run for real by sh with a stand-in venv python that records its argv."""
  flags = SMOKE + [f'--config.train.sample_prompt={PROMPT}']
  _, commands = _dry_run(['--target=gpu-vm', '--name=q', '--zone=z', f'--bucket=gs://{BUCKET}',
                          '--run_id=q1'], flags)
  train = commands[-1]
  expected = ['-m', 'launch.train', '--config=config.py', *flags[1:],
              '--config.runtime.strategy=gpu',
              f'--config.data.corpus=gs://{BUCKET}/charlstm/q1/corpus/tinyshakespeare.txt.gz',
              f'--workdir=gs://{BUCKET}/charlstm/q1/workdir']
  assert _train_argv(train) == ['../venv/bin/python', *expected]

  # The VM side: ~/charlstm/venv/bin/python records its argv, prints a line and exits 75.
  home = tmp_path / 'home'
  (home / 'charlstm' / 'q1').mkdir(parents=True)
  fake_python = home / 'charlstm' / 'venv' / 'bin' / 'python'
  fake_python.parent.mkdir(parents=True)
  fake_python.write_text(f'#!{sys.executable}\nimport json, sys\n'
                         'open("argv.json", "w").write(json.dumps(sys.argv[1:]))\n'
                         'print("fake launch.train ran", flush=True)\nsys.exit(75)\n')
  fake_python.chmod(0o755)
  bin_dir = _recording_gcloud(tmp_path)
  env = dict(CHILD_ENV, HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}',
             FAKE_GCLOUD_LOG=str(tmp_path / 'gcloud.jsonl'))
  proc = subprocess.run(['sh', '-c', '\n'.join(_script(train))], cwd=home, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 75, proc.stderr  # launch.train's exit status comes back over ssh
  assert json.loads((home / 'charlstm/q1/argv.json').read_text()) == expected
  assert 'fake launch.train ran' in proc.stdout  # the log was streamed
  assert _gcloud_calls(tmp_path) == [['storage', 'cp', 'train.log',
                                      f'gs://{BUCKET}/charlstm/q1/logs/q.log']]


def test_staged_config_py_rebuilds_the_resolved_config(tmp_path):
  plan = submit.make_plan(submit.Spec(target='gpu-vm', name='c', zone='z', bucket=f'gs://{BUCKET}',
                                      run_id='c1'),
                          SMOKE + [f'--config.train.sample_prompt={PROMPT}'])
  (tmp_path / 'config.py').write_text(remote.config_py(plan.config, plan.run_id))
  proc = run(['-c', textwrap.dedent(f'''
      import json, runpy
      print(json.dumps(runpy.run_path({str(tmp_path / 'config.py')!r})['get_config']().to_dict()))
      ''')])
  config = json.loads(proc.stdout)
  assert config == plan.config
  assert config['train']['sample_prompt'] == PROMPT and config['train']['num_steps'] == 100
  assert config['data']['corpus'] == f'gs://{BUCKET}/charlstm/c1/corpus/tinyshakespeare.txt.gz'


# --- real runs: staging into a local GCS, gcloud recorded -------------------------------

def _recording_gcloud(tmp_path):
  """A `gcloud` that records its argv (FAKE_GCLOUD_LOG) and succeeds.

  `auth list` prints FAKE_GCLOUD_ACCOUNT; train commands (ssh running
  launch.train) exit with the next code of FAKE_GCLOUD_TRAIN_CODES (default 0).
  """
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'#!{sys.executable}\n' + textwrap.dedent('''
      import json, os, sys
      args, log = sys.argv[1:], os.environ['FAKE_GCLOUD_LOG']
      earlier = sum('launch.train' in l for l in open(log)) if os.path.exists(log) else 0
      with open(log, 'a') as f:
        f.write(json.dumps(args) + '\\n')
      if args[:2] == ['auth', 'list']:
        print(os.environ.get('FAKE_GCLOUD_ACCOUNT', ''))
      if any('launch.train' in a for a in args):
        codes = os.environ.get('FAKE_GCLOUD_TRAIN_CODES', '0').split(',')
        sys.exit(int(codes[earlier]) if earlier < len(codes) else 0)
      '''))
  gcloud.chmod(0o755)
  return bin_dir


def _gcloud_calls(tmp_path):
  path = tmp_path / 'gcloud.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """fake-gcs-server with the bucket; this process reaches it through the client env."""
  with gcs_emulator.serving(tmp_path_factory.mktemp('gcs'), BUCKET) as emulator:
    yield emulator


def _blobs(prefix):
  from pipeline import storage  # pylint: disable=g-import-not-at-top
  return sorted(b.name for b in storage.gcs_client().list_blobs(BUCKET, prefix=prefix))


def _submit(tmp_path, flags, train_flags, env=None, path=None):
  """Runs launch.submit for real, as a user would, with the recording gcloud first on PATH."""
  bin_dir = _recording_gcloud(tmp_path)
  full = dict(CHILD_ENV, PATH=path if path is not None else f'{bin_dir}:{os.environ["PATH"]}',
              FAKE_GCLOUD_LOG=str(tmp_path / 'gcloud.jsonl'), FAKE_GCLOUD_ACCOUNT='tester@example.com')
  full.update(env or {})
  return subprocess.run([sys.executable, '-m', 'launch.submit', *flags, '--', *train_flags],
                        cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def test_submit_runs_what_the_dry_run_prints_and_the_staged_wheel_trains(gcs, tmp_path):
  flags = ['--target=tpu-vm', '--name=pod2', '--zone=us-central2-b', f'--bucket=gs://{BUCKET}',
           '--accelerator_type=v4-32', '--create', '--delete_after', '--run_id=real1']
  proc = _submit(tmp_path, flags, SMOKE, env=gcs.client_env())
  assert proc.returncode == 0, proc.stdout + proc.stderr
  planned = _commands(run(['-m', 'launch.submit', *flags, '--dry_run', '--', *SMOKE]).stdout)
  assert _gcloud_calls(tmp_path) == (
      [['auth', 'list', '--filter=status:ACTIVE', '--format=value(account)']] +
      [argv[1:] for argv in planned])  # create, install on all workers, train on 0, delete
  url = f'gs://{BUCKET}/charlstm/real1'
  assert f'# uploaded {ROOT / "data/tinyshakespeare.txt.gz"} -> {url}/corpus/tinyshakespeare.txt.gz' \
      in proc.stdout.splitlines()
  assert _blobs('charlstm/real1/') == sorted([
      'charlstm/real1/config.py', f'charlstm/real1/{WHEEL}',
      'charlstm/real1/corpus/tinyshakespeare.txt.gz'])

  # What the VM does, here: a fresh venv, the staged wheel, the staged config.py.
  from pipeline import storage  # pylint: disable=g-import-not-at-top
  bucket = storage.gcs_client().bucket(BUCKET)
  vm = tmp_path / 'vm'
  vm.mkdir()
  for name in (WHEEL, 'config.py'):
    bucket.blob(f'charlstm/real1/{name}').download_to_filename(str(vm / name))
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  subprocess.run([sys.executable, '-m', 'pip', '--python', str(venv / 'bin' / 'python'),
                  'install', '--quiet', '--no-deps', '--no-index', str(vm / WHEEL)], check=True)
  site = pathlib.Path(subprocess.run(
      [str(venv / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True, capture_output=True, text=True).stdout.strip())
  wanted = {p for p in storage.code_files() if p.endswith(('.py', '.txt.gz'))}
  installed = {str(p.relative_to(site)) for p in site.rglob('*')
               if p.is_file() and p.suffix in ('.py', '.gz') and '__pycache__' not in p.parts
               and not p.parts[len(site.parts)].endswith('.dist-info')}
  assert installed == wanted  # every module, config and bundled corpus; nothing else
  # The TensorFlow and other dependencies come from the dev venv (no network here), added
  # after the fresh site-packages and without its .pth files, so its editable charlstm stays out.
  (site / 'deps.pth').write_text(sysconfig.get_path('purelib') + '\n')
  env = {k: v for k, v in CHILD_ENV.items() if k != 'PYTHONPATH'}
  probe = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                          'import pipeline, launch.train, configs; print(pipeline.__file__)'],
                         cwd=vm, env=env, capture_output=True, text=True, check=True)
  assert probe.stdout.strip() == str(site / 'pipeline' / '__init__.py')
  # The remote launch.train command, with a local corpus (the wheel's own copy), CPU and a
  # local workdir instead of the TPU and the bucket, and 4 steps.
  [train] = [argv for argv in planned if any('launch.train' in a for a in argv)]
  args = [a for a in _train_argv(train)[3:] if not a.startswith(('--workdir', '--config.data.corpus',
                                                                  '--config.runtime'))]
  assert args == ['--config=config.py', '--config.train.num_steps=100']
  trained = subprocess.run(
      [str(venv / 'bin' / 'python'), '-m', 'launch.train', *args,
       f'--config.data.corpus={site / "data" / "tinyshakespeare.txt.gz"}',
       '--config.runtime.strategy=cpu', '--config.train.num_steps=4', '--config.train.log_every=2',
       '--config.train.eval_every=4', '--config.train.checkpoint_every=4',
       '--config.train.export=False', f'--workdir={tmp_path / "workdir"}'],
      cwd=vm, env=env, capture_output=True, text=True, timeout=240)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'Done at step 4: ' in trained.stdout
  saved = json.loads((tmp_path / 'workdir' / 'config.json').read_text())
  assert saved['model']['hidden_size'] == 64  # the smoke preset, rebuilt from the staged config.py


def test_restarts_relaunch_after_lost_ssh_and_preemption_on_a_spot_vm(gcs, tmp_path):
  # The train step: ssh lost the VM (255), then the job saved and stopped (75), then done.
  proc = _submit(tmp_path, ['--target=gpu-vm', '--name=spot', '--zone=z', f'--bucket=gs://{BUCKET}',
                            '--spot', '--restarts=2', '--run_id=spot1'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_TRAIN_CODES='255,75,0'))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  calls = [c[:3] if c[0] == 'compute' else c[:2] for c in _gcloud_calls(tmp_path)]
  ssh, start = ['compute', 'ssh', 'spot'], ['compute', 'instances', 'start']
  assert calls == [['auth', 'list'], ssh, ssh, start, ssh, start, ssh]  # install, then train x3
  assert _gcloud_calls(tmp_path)[3] == ['compute', 'instances', 'start', 'spot', '--zone=z']
  lines = [l for l in proc.stdout.splitlines() if 'relaunch' in l]
  assert [l.split(':')[0] for l in lines] == [
      '# the job lost its ssh connection (exit 255; a spot VM may have been preempted)',
      '# the job was preempted after saving a checkpoint']
  assert proc.stdout.splitlines()[-1] == '# the job ended with exit code 0'


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


# --- errors: one line, before anything is staged ----------------------------------------

def test_missing_gcloud_is_one_line_before_staging(gcs, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc = _submit(tmp_path, ['--target=tpu-vm', '--name=t', '--zone=z', f'--bucket=gs://{BUCKET}',
                            '--accelerator_type=v4-8', '--run_id=nogcloud'], SMOKE,
                 env=gcs.client_env(), path=str(empty))
  assert proc.returncode == 2, proc.stderr
  assert error_lines(proc.stderr) == [
      'charlstm: error: gcloud is not on PATH: install the Google Cloud CLI '
      '(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands '
      'without running them.']
  assert _blobs('charlstm/nogcloud') == []


def test_gcloud_without_an_account_is_one_line_before_staging(gcs, tmp_path):
  """With the real gcloud if installed (an empty config has no account), else the stand-in."""
  env = dict(gcs.client_env(), FAKE_GCLOUD_ACCOUNT='')
  path = None
  if shutil.which('gcloud'):
    env.update(CLOUDSDK_CONFIG=str(tmp_path / 'gcloud-config'), CLOUDSDK_CORE_DISABLE_PROMPTS='1',
               CLOUDSDK_CORE_CHECK_GCE_METADATA='false')
    path = os.environ['PATH']
  proc = _submit(tmp_path, ['--target=gpu-vm', '--name=g', '--zone=z', f'--bucket=gs://{BUCKET}',
                            '--run_id=noaccount'], SMOKE, env=env, path=path)
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith('charlstm: error: gcloud has no active account')
  assert '`gcloud auth login`' in lines[0]
  assert _blobs('charlstm/noaccount') == []


def test_missing_credentials_is_one_line_before_staging(tmp_path):
  with socket.socket() as silent:  # a metadata "server" that never answers
    silent.bind(('127.0.0.1', 0))
    silent.listen(4)
    env = {k: v for k, v in CHILD_ENV.items()
           if not k.startswith(('GOOGLE_', 'GCE_', 'STORAGE_EMULATOR', 'CLOUDSDK', 'CHARLSTM_GCS'))
           and k.upper() != 'NO_GCE_CHECK'}
    env.update(HOME=str(tmp_path), GCE_METADATA_HOST=f'127.0.0.1:{silent.getsockname()[1]}',
               GCE_METADATA_TIMEOUT='1')
    bin_dir = _recording_gcloud(tmp_path)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, '-m', 'launch.submit', '--target=gpu-vm', '--name=g', '--zone=z',
         f'--bucket=gs://{BUCKET}', '--', *SMOKE], cwd=ROOT, capture_output=True, text=True,
        env=dict(env, PATH=f'{bin_dir}:{env["PATH"]}', FAKE_GCLOUD_LOG=str(tmp_path / 'gcloud.jsonl'),
                 FAKE_GCLOUD_ACCOUNT='tester@example.com'), timeout=60)
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith(
      f'charlstm: error: gs://{BUCKET} needs Google Cloud credentials and none were found')
  assert 'gcloud auth application-default login' in lines[0]
  assert time.monotonic() - start < 30
  assert 'uploaded' not in proc.stdout and 'upload' not in proc.stdout
  assert [c[:2] for c in _gcloud_calls(tmp_path)] == [['auth', 'list']]  # nothing else ran


@pytest.mark.parametrize('flags, train_flags, message', [
    (['--target=cpu-vm', '--accelerator_type=v4-8'], SMOKE,
     'FATAL Flags parsing error: flag --target=cpu-vm: value should be one of <tpu-vm|gpu-vm>'),
    (['--target=tpu-vm', '--accelerator_type=v9-8'], SMOKE,
     "charlstm: error: Unknown --accelerator_type 'v9-8': expected a Cloud TPU type such as v4-8, "
     'v5litepod-8, v5p-8 or v6e-8 (`gcloud compute tpus accelerator-types list --zone=ZONE` '
     'lists those of a zone).'),
    (['--target=gpu-vm', '--machine_type=n1-standard-8', '--gpu=nvidia-rtx-9090:1'], SMOKE,
     "charlstm: error: Unknown GPU type 'nvidia-rtx-9090' in --gpu=nvidia-rtx-9090:1: use one of "
     + ', '.join(accelerators.GPU_TYPES) + ', as TYPE:COUNT (e.g. nvidia-l4:1).'),
    (['--target=gpu-vm', '--machine_type=e2-standard-8'], SMOKE,
     'charlstm: error: --machine_type=e2-standard-8 has no GPUs and cannot take any: use a '
     'g2/a2/a3 type (GPUs included, e.g. g2-standard-8 with one L4) or an n1 type with --gpu '
     '(e.g. --machine_type=n1-standard-8 --gpu=nvidia-tesla-t4:1).'),
    (['--target=gpu-vm'], SMOKE + ['--workdir=/tmp/x'],
     'charlstm: error: Do not pass --workdir: launch.submit trains in '
     'gs://BUCKET/charlstm/<run-id>/workdir (pass --run_id=ID to resume a run).'),
    (['--target=tpu-vm', '--accelerator_type=v4-32'], SMOKE + ['--config.runtime.strategy=auto'],
     'charlstm: error: --config.runtime.strategy=auto cannot run on TPU VM t (v4-32, pod slice, '
     'driven from worker 0); use tpu, or leave it out.'),
])
def test_bad_target_accelerator_or_flags_are_one_line(flags, train_flags, message):
  proc = run(['-m', 'launch.submit', '--name=t', '--zone=z', f'--bucket=gs://{BUCKET}', *flags,
              '--dry_run', '--', *train_flags], check=False)
  assert proc.returncode in (1, 2), proc.stderr
  assert error_lines(proc.stderr) == [message]
  assert proc.stdout == ''


# --- the real gcloud parses every planned command ----------------------------------------

def _plan(**kw):
  return submit.make_plan(submit.Spec(zone='us-central1-a', bucket=f'gs://{BUCKET}',
                                      project='charlstm-test', create=True, delete_after=True,
                                      spot=True, run_id='parse', **kw), SMOKE)


@pytest.mark.skipif(not shutil.which('gcloud'), reason='the Google Cloud CLI is not installed')
def test_real_gcloud_parses_the_planned_commands(tmp_path):
  """Every flag launch.submit uses, through the installed gcloud's own parser.

  gcloud takes about a second of CPU a call, so this runs the four commands
  with more than a name and a zone: TPU create (--spot, a pod runtime), TPU
  ssh (--worker, a multi-line --command), GCE create (--accelerator, spot)
  and GCE ssh. The deletes, `instances start` and the VM side's
  `gcloud storage cp` were run by hand the same way.
  """
  tpu = _plan(target='tpu-vm', name='t2', accelerator_type='v4-32')
  gpu = _plan(target='gpu-vm', name='g2', machine_type='n1-standard-8', gpu='nvidia-tesla-t4:2',
              num_workers=2)
  commands = [tpu.create[0], tpu.train[0], gpu.create[0], gpu.train[1]]
  assert [c[1:5] for c in commands] == [
      ['compute', 'tpus', 'tpu-vm', 'create'], ['compute', 'tpus', 'tpu-vm', 'ssh'],
      ['compute', 'instances', 'create', 'g2-0'], ['compute', 'ssh', 'g2-1', '--zone=us-central1-a']]
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path), CLOUDSDK_CORE_DISABLE_PROMPTS='1',
             CLOUDSDK_CORE_CHECK_GCE_METADATA='false')

  def check(argv):
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    return argv, proc.returncode, proc.stderr

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for argv, code, stderr in pool.map(check, commands):
      # A parse error would exit 2 ("unrecognized arguments", "Invalid value"); these got
      # past parsing, to where gcloud needs an account.
      assert code == 1 and 'You do not currently have an active account selected' in stderr, (
          shlex.join(argv)[:300], stderr[:500])
