"""launch.submit's plan (pipeline/cloud/plan.py): exact gcloud commands per target, errors.

The dry runs are checked as argument lists, parsed back from the printed
script with shlex (tests/fake_gcloud.py). A quoted config value is followed
into the VM-side script and run there by sh. Where the real gcloud is
installed, it parses every planned command (an empty gcloud config makes
each stop at "no active account" instead of doing anything).
"""

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from pipeline.cloud import accelerators
from pipeline.cloud import plan as plan_lib
from pipeline.cloud import remote
from tests.conftest import CHILD_ENV, ROOT, error_lines, run
from tests.fake_gcloud import VERSIONS as ZONE_VERSIONS
from tests.fake_gcloud import gcloud_calls, plan_commands, recording_gcloud, ssh_script, train_argv

BUCKET = 'charlstm-submit'
SCOPES = '--scopes=https://www.googleapis.com/auth/cloud-platform'
WHEEL = 'charlstm-0.1.0-py3-none-any.whl'
# Spaces, both quotes and shell syntax that must not be expanded on the VM.
PROMPT = 'It\'s a "test" here; $HOME `echo no` $(echo no) \\n'
SMOKE = ['--config=configs/shakespeare.py:smoke', '--config.train.num_steps=100']


def _uploads(script):
  prefix = '#   upload '
  return [tuple(l[len(prefix):].split(' -> ')) for l in script.splitlines() if l.startswith(prefix)]


def _dry_run(flags, train_flags):
  proc = run(['-m', 'launch.submit', *flags, '--dry_run', '--', *train_flags])
  return proc.stdout, plan_commands(proc.stdout)


def _install_lines(run_id, extra, links=''):
  url = f'gs://{BUCKET}/charlstm/{run_id}'
  return ['set -eu', f'mkdir -p charlstm/{run_id}', f'cd charlstm/{run_id}',
          f'gcloud storage cp {url}/{WHEEL} {url}/config.py .',
          'test -x ../venv/bin/pip || python3 -m venv ../venv || { rm -rf ../venv; sudo apt-get '
          'update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv ../venv; }',
          '../venv/bin/python -m pip install --quiet --upgrade pip',
          f"../venv/bin/python -m pip install --quiet './{WHEEL}[{extra}]'{links}",
          f'../venv/bin/python -m pip install --quiet --no-deps --force-reinstall ./{WHEEL}']


def _doctor_lines(run_id, *exports):
  return ['set -eu', f'cd charlstm/{run_id}', *exports,
          '../venv/bin/python -m launch.doctor --config=config.py '
          f'--workdir=gs://{BUCKET}/charlstm/{run_id}/workdir']


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
  versions, create, setup, doctor, train, delete = commands
  assert versions == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'versions', 'list',
                      '--zone=us-west4-a', '--format=value(version)']
  assert ('# 2. runtime version: list the zone\'s versions; picks tpu-vm-tf-2.20.0-pjrt (for '
          'tensorflow-tpu 2.20.0) if the zone lists it, else stops, naming the TF versions it '
          'offers') in out.splitlines()
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'tpu1', '--zone=us-west4-a',
                    '--accelerator-type=v5litepod-8', '--version=tpu-vm-tf-2.20.0-pjrt', SCOPES]
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1', '--zone=us-west4-a', '--worker=all']
  assert setup[:-1] == ssh and doctor[:-1] == ssh and train[:-1] == ssh
  assert ssh_script(setup) == _install_lines(
      't1', 'tpu', ' -f https://storage.googleapis.com/libtpu-tf-releases/index.html')
  # launch.doctor with launch.train's environment, before it.
  assert ssh_script(doctor) == _doctor_lines('t1', *ssh_script(train)[2:4])
  assert ssh_script(train)[2] == 'export NEXT_PLUGGABLE_DEVICE_USE_C_API=true'
  assert train_argv(train) == _python_train('t1', '--config.runtime.precision=bfloat16',
                                             '--config.runtime.strategy=tpu')
  assert 'export NEXT_PLUGGABLE_DEVICE_USE_C_API=true' in ssh_script(train)
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=us-west4-a',
                    '--quiet']
  assert f'# TensorBoard: tensorboard --logdir {url}/workdir/tb' in out.splitlines()


def test_dry_run_tpu_pod_installs_on_all_workers_and_trains_from_worker_0():
  out, commands = _dry_run(
      ['--target=tpu-vm', '--name=pod1', '--zone=us-central2-b', f'--bucket=gs://{BUCKET}',
       '--accelerator_type=v4-32', '--create', '--project=my-proj', '--run_id=p1'],
      SMOKE)
  _, create, setup, doctor, train = commands  # no --delete_after: no delete
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod1', '--zone=us-central2-b',
                    '--accelerator-type=v4-32', '--version=tpu-vm-tf-2.20.0-pod-pjrt', SCOPES,
                    '--project=my-proj']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod1', '--zone=us-central2-b']
  assert setup[:-3] == ssh and setup[-3] == '--worker=all' and setup[-1] == '--project=my-proj'
  # launch.doctor where launch.train runs: worker 0 drives the slice; it is its only process.
  assert doctor[:-3] == ssh and doctor[-3] == '--worker=0' and doctor[-1] == '--project=my-proj'
  assert ssh_script(doctor) == _doctor_lines('p1', 'export TPU_LOAD_LIBRARY=0')
  assert train[:-3] == ssh and train[-3] == '--worker=0' and train[-1] == '--project=my-proj'
  assert ssh_script(setup) == _install_lines(
      'p1', 'tpu', ' -f https://storage.googleapis.com/libtpu-tf-releases/index.html')
  assert 'export TPU_LOAD_LIBRARY=0' in ssh_script(train)
  assert train_argv(train) == _python_train('p1', '--config.runtime.strategy=tpu',
                                             '--config.runtime.tpu=pod1')
  assert 'pod slice, driven from worker 0' in out.splitlines()[0]


def test_dry_run_spot_tpu_is_a_queued_resource_recreated_when_preempted():
  """The whole loop in order: lookup, queued create, wait, install, doctor, train, restarts."""
  out, commands = _dry_run(
      ['--target=tpu-vm', '--name=spot1', '--zone=us-central2-b', f'--bucket=gs://{BUCKET}',
       '--accelerator_type=v4-8', '--create', '--delete_after', '--spot', '--restarts=2',
       '--run_id=s1'], SMOKE)
  versions, create, setup, doctor, train, delete = commands
  qr = ['gcloud', 'compute', 'tpus', 'queued-resources']
  assert versions[-1] == '--format=value(version)'
  assert create == [*qr, 'create', 'spot1', '--node-id=spot1', '--zone=us-central2-b',
                    '--accelerator-type=v4-8', '--runtime-version=tpu-vm-tf-2.20.0-pjrt', '--spot',
                    SCOPES]
  assert delete == [*qr, 'delete', 'spot1', '--zone=us-central2-b', '--force', '--quiet']
  assert [c[4:6] for c in (setup, doctor, train)] == [['ssh', 'spot1']] * 3
  lines = out.splitlines()
  assert 'spot: queued resource spot1' in lines[0]
  titles = [l for l in lines if l.startswith(('# 2.', '# 3.', '# 4.', '# 5.', '# 6.', '# 7.',
                                              '# wait', '# restarts'))]
  assert [t.split(':')[0].split(' (')[0] for t in titles] == [
      '# 2. runtime version', '# 3. create', '# wait until the queued resource is ACTIVE',
      '# 4. install the wheel on every host',
      '# 5. check with launch.doctor where training runs; a failure stops the run here',
      '# 6. train', '# restarts, up to 2 in all', '# 7. delete']
  wait = lines[lines.index(titles[2]) + 1]
  assert shlex.split(wait[len('#   '):]) == [*qr, 'describe', 'spot1', '--zone=us-central2-b',
                                           '--format=value(state.state)']
  restart = lines.index(titles[6])
  assert 'SUSPENDED or FAILED' in titles[6] and f'gs://{BUCKET}/charlstm/s1/workdir/checkpoints' \
      in titles[6]
  # On SUSPENDED/FAILED: delete --force, then the same create again.
  assert [shlex.split(l[len('#   '):]) for l in lines[restart + 1:restart + 3]] == [delete, create]


def test_dry_run_one_gpu_vm():
  out, commands = _dry_run(
      ['--target=gpu-vm', '--name=gpu1', '--zone=us-central1-a', f'--bucket=gs://{BUCKET}',
       '--machine_type=g2-standard-8', '--create', '--delete_after', '--run_id=g1'], SMOKE)
  create, setup, doctor, train, delete = commands
  assert create == ['gcloud', 'compute', 'instances', 'create', 'gpu1', '--zone=us-central1-a',
                    '--machine-type=g2-standard-8', '--maintenance-policy=TERMINATE',
                    '--image-family=common-cu129-ubuntu-2204-nvidia-580',
                    '--image-project=deeplearning-platform-release', '--boot-disk-size=200GB',
                    SCOPES]
  ssh = ['gcloud', 'compute', 'ssh', 'gpu1', '--zone=us-central1-a']
  assert setup[:-1] == ssh and doctor[:-1] == ssh and train[:-1] == ssh
  assert ssh_script(setup) == _install_lines('g1', 'gpu')
  assert ssh_script(doctor) == _doctor_lines('g1')
  assert train_argv(train) == _python_train('g1', '--config.runtime.strategy=gpu')
  assert not [l for l in ssh_script(train) if l.startswith('export')]
  assert delete == ['gcloud', 'compute', 'instances', 'delete', 'gpu1', '--zone=us-central1-a',
                    '--quiet']
  assert '1 x nvidia-l4 each' in out.splitlines()[0]


def test_dry_run_two_gpu_hosts_each_get_their_tf_config():
  out, commands = _dry_run(
      ['--target=gpu-vm', '--name=mw', '--zone=us-central1-a', f'--bucket=gs://{BUCKET}',
       '--machine_type=n1-standard-8', '--gpu=nvidia-tesla-t4:2', '--num_workers=2', '--create',
       '--spot', '--run_id=m1'], SMOKE)
  create, setup0, setup1, doctor0, doctor1, train0, train1 = commands
  assert create == ['gcloud', 'compute', 'instances', 'create', 'mw-0', 'mw-1',
                    '--zone=us-central1-a', '--machine-type=n1-standard-8',
                    '--accelerator=type=nvidia-tesla-t4,count=2', '--maintenance-policy=TERMINATE',
                    '--image-family=common-cu129-ubuntu-2204-nvidia-580',
                    '--image-project=deeplearning-platform-release', '--boot-disk-size=200GB',
                    SCOPES, '--provisioning-model=SPOT', '--instance-termination-action=STOP']
  for i, (setup, doctor, train) in enumerate([(setup0, doctor0, train0),
                                              (setup1, doctor1, train1)]):
    ssh = ['gcloud', 'compute', 'ssh', f'mw-{i}', '--zone=us-central1-a']
    assert setup[:-1] == ssh and doctor[:-1] == ssh and train[:-1] == ssh
    assert ssh_script(setup) == _install_lines('m1', 'gpu')
    assert train_argv(train) == _python_train('m1', '--config.runtime.strategy=multi_worker')
    [export] = [l for l in ssh_script(train) if l.startswith('export TF_CONFIG=')]
    # launch.doctor on every host with its TF_CONFIG (a multi_worker strategy needs them all).
    assert ssh_script(doctor) == _doctor_lines('m1', export)
    assert json.loads(shlex.split(export)[1][len('TF_CONFIG='):]) == {
        'cluster': {'worker': ['mw-0:2222', 'mw-1:2222']}, 'task': {'type': 'worker', 'index': i}}
  # Pasted as a script, the workers start together: both train lines end in `&`, then `wait`.
  lines = out.splitlines()
  assert lines[lines.index('# 5. train') + 1].startswith('gcloud compute ssh mw-0 ')
  assert lines[lines.index('wait', lines.index('# 5. train')) - 1].endswith("' &")
  assert ('# restarts, up to' not in out)  # no --restarts


def test_machine_types_decide_gpus_and_strategy():
  assert accelerators.gpus_per_host('g2-standard-24') == ('nvidia-l4', 2, False)
  assert accelerators.gpus_per_host('a3-highgpu-8g') == ('nvidia-h100-80gb', 8, False)
  assert accelerators.gpus_per_host('n1-standard-8', 'nvidia-tesla-v100') == (
      'nvidia-tesla-v100', 1, True)
  plan = plan_lib.make_plan(plan_lib.Spec(target='gpu-vm', name='big', zone='z',
                                          bucket=f'gs://{BUCKET}', machine_type='a2-highgpu-4g',
                                          create=True, run_id='a1'), SMOKE)
  assert train_argv(plan.train[0])[-3] == '--config.runtime.strategy=mirrored'
  assert plan.config['runtime']['strategy'] == 'mirrored'
  assert '--machine-type=a2-highgpu-4g' in plan.create[0]
  assert not [a for a in plan.create[0] if a.startswith('--accelerator')]  # comes with its GPUs


@pytest.mark.parametrize('accelerator_type, single, version', [
    ('v2-8', True, 'tpu-vm-tf-2.20.0-pjrt'), ('v3-32', False, 'tpu-vm-tf-2.20.0-pod-pjrt'),
    ('v4-8', True, 'tpu-vm-tf-2.20.0-pjrt'), ('v4-16', False, 'tpu-vm-tf-2.20.0-pod-pjrt'),
    ('v5p-8', True, 'tpu-vm-tf-2.20.0-pjrt'), ('v5litepod-4', True, 'tpu-vm-tf-2.20.0-pjrt'),
    ('v5litepod-16', False, 'tpu-vm-tf-2.20.0-pod-pjrt'), ('v6e-8', True, 'tpu-vm-tf-2.20.0-pjrt')])
def test_tpu_types_decide_hosts_and_runtime_version(accelerator_type, single, version):
  assert accelerators.tpu_is_single_host(accelerator_type) is single
  assert accelerators.default_runtime_version(accelerator_type) == version
  assert accelerators.pick_runtime_version(accelerator_type, ZONE_VERSIONS, 'z') == version
  spec = plan_lib.Spec(target='tpu-vm', name='t', zone='z', bucket=f'gs://{BUCKET}',
                       accelerator_type=accelerator_type, create=True,
                       runtime_version='tpu-vm-tf-2.20.0-pjrt-custom')
  plan = plan_lib.make_plan(spec, SMOKE)
  assert '--version=tpu-vm-tf-2.20.0-pjrt-custom' in plan.create[0]  # --runtime_version wins
  assert plan.versions == []  # and is not looked up


def test_tpu_tf_version_is_what_the_tpu_extra_installs():
  """The runtime is named after the TF on the VM: the `tpu` extra's tensorflow-tpu pin."""
  with open(ROOT / 'pyproject.toml', encoding='utf-8') as f:
    [pin] = re.findall(r'"tensorflow-tpu==([0-9.*]+)"', f.read())
  assert accelerators.TPU_TF_VERSION.startswith(pin.rstrip('*'))


def test_no_listed_runtime_for_the_tpu_tf_is_one_line_naming_what_the_zone_offers():
  listed = ['tpu-ubuntu2204-base', 'tpu-vm-tf-2.18.0-pjrt', 'tpu-vm-tf-2.18.0-pod-pjrt',
            'tpu-vm-tf-2.9.1', 'tpu-vm-tf-2.17.1-pjrt', 'tpu-vm-tf-2.20.0-pod-pjrt',
            'v2-alpha-tpuv6e', '']
  with pytest.raises(accelerators.AcceleratorError) as e:
    accelerators.pick_runtime_version('v4-8', listed, 'us-east1-d')  # a pod runtime only
  assert str(e.value) == (
      'Zone us-east1-d lists no TPU runtime tpu-vm-tf-2.20.0-pjrt (for tensorflow-tpu 2.20.0, '
      'which the install puts on the VM); its TensorFlow runtimes are for TF 2.9.1, 2.17.1, '
      '2.18.0, 2.20.0. Use a zone that offers it, or pass --runtime_version=NAME from `gcloud '
      'compute tpus tpu-vm versions list --zone=us-east1-d` knowingly.')
  with pytest.raises(accelerators.AcceleratorError, match='for TF no version at all'):
    accelerators.pick_runtime_version('v4-32', ['tpu-ubuntu2204-base', 'v2-alpha-tpuv6e'], 'z')


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
  assert train_argv(train) == ['../venv/bin/python', *expected]

  # The VM side: ~/charlstm/venv/bin/python records its argv, prints a line and exits 75.
  home = tmp_path / 'home'
  (home / 'charlstm' / 'q1').mkdir(parents=True)
  fake_python = home / 'charlstm' / 'venv' / 'bin' / 'python'
  fake_python.parent.mkdir(parents=True)
  fake_python.write_text(f'#!{sys.executable}\nimport json, sys\n'
                         'open("argv.json", "w").write(json.dumps(sys.argv[1:]))\n'
                         'print("fake launch.train ran", flush=True)\nsys.exit(75)\n')
  fake_python.chmod(0o755)
  bin_dir = recording_gcloud(tmp_path)
  env = dict(CHILD_ENV, HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}',
             FAKE_GCLOUD_LOG=str(tmp_path / 'gcloud.jsonl'))
  proc = subprocess.run(['sh', '-c', '\n'.join(ssh_script(train))], cwd=home, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 75, proc.stderr  # launch.train's exit status comes back over ssh
  assert json.loads((home / 'charlstm/q1/argv.json').read_text()) == expected
  assert 'fake launch.train ran' in proc.stdout  # the log was streamed
  assert gcloud_calls(tmp_path) == [['storage', 'cp', 'train.log',
                                      f'gs://{BUCKET}/charlstm/q1/logs/q.log']]


def test_staged_config_py_rebuilds_the_resolved_config(tmp_path):
  plan = plan_lib.make_plan(plan_lib.Spec(target='gpu-vm', name='c', zone='z',
                                          bucket=f'gs://{BUCKET}', run_id='c1'),
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

def _plan(spot=True, **kw):
  return plan_lib.make_plan(plan_lib.Spec(zone='us-central1-a', bucket=f'gs://{BUCKET}',
                                          project='charlstm-test', create=True, delete_after=True,
                                          spot=spot, run_id='parse', **kw), SMOKE)


@pytest.mark.skipif(not shutil.which('gcloud'), reason='the Google Cloud CLI is not installed')
def test_real_gcloud_parses_the_planned_commands(tmp_path):
  """Every flag launch.submit uses, through the installed gcloud's own parser.

  gcloud takes about a second of CPU a call, so this runs the commands with
  more than a name and a zone: the runtime-version lookup (--format), TPU
  create (a pod runtime), the spot TPU's queued-resource create, describe
  (--format) and delete (--force), TPU ssh (--worker, a multi-line
  --command), GCE create (--accelerator, spot) and GCE ssh. The other
  deletes, `instances start` and the VM side's `gcloud storage cp` were run
  by hand the same way.
  """
  tpu = _plan(target='tpu-vm', name='t2', accelerator_type='v4-32', spot=False)
  spot = _plan(target='tpu-vm', name='t3', accelerator_type='v4-8', restarts=1)
  gpu = _plan(target='gpu-vm', name='g2', machine_type='n1-standard-8', gpu='nvidia-tesla-t4:2',
              num_workers=2)
  commands = [tpu.versions, tpu.create[0], spot.create[0], spot.wait, spot.recreate[0],
              tpu.train[0], gpu.create[0], gpu.train[1]]
  assert spot.recreate == [spot.delete[0], spot.create[0]]
  assert [c[1:5] for c in commands] == [
      ['compute', 'tpus', 'tpu-vm', 'versions'], ['compute', 'tpus', 'tpu-vm', 'create'],
      ['compute', 'tpus', 'queued-resources', 'create'],
      ['compute', 'tpus', 'queued-resources', 'describe'],
      ['compute', 'tpus', 'queued-resources', 'delete'], ['compute', 'tpus', 'tpu-vm', 'ssh'],
      ['compute', 'instances', 'create', 'g2-0'],
      ['compute', 'ssh', 'g2-1', '--zone=us-central1-a']]
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
