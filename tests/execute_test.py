"""launch.submit for real (pipeline/cloud/execute.py): staging, gcloud in order, restarts, errors.

Real (non-dry) runs stage into fake-gcs-server (tests/gcs_emulator.py) and
call a recording stand-in for `gcloud` put first on PATH
(tests/fake_gcloud.py): there is no cloud here, and the stand-in shows
exactly what would have run, in which order. The staged wheel is downloaded
and installed into a fresh venv, which then trains from it outside the
checkout. Where the real gcloud is installed, it is the one that finds no
account.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

from pipeline.cloud import execute
from pipeline.cloud import plan as plan_lib
from pipeline.cloud import tpu as tpu_lib
from tests import gcs_emulator
from tests.conftest import CHILD_ENV, ROOT, error_lines, run
from tests.fake_gcloud import gcloud_calls, plan_commands, recording_gcloud, train_argv

BUCKET = 'charlstm-submit'
WHEEL = 'charlstm-0.1.0-py3-none-any.whl'
SMOKE = ['--config=configs/shakespeare.py:smoke', '--config.train.num_steps=100']


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """fake-gcs-server with the bucket; this process reaches it through the client env."""
  with gcs_emulator.serving(tmp_path_factory.mktemp('gcs'), BUCKET) as emulator:
    yield emulator


def _blobs(prefix):
  from pipeline.cloud import gcs as gcs_lib  # pylint: disable=g-import-not-at-top
  return sorted(b.name for b in gcs_lib.gcs_client().list_blobs(BUCKET, prefix=prefix))


def _submit(tmp_path, flags, train_flags, env=None, path=None):
  """Runs launch.submit for real, as a user would, with the recording gcloud first on PATH."""
  bin_dir = recording_gcloud(tmp_path)
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
  planned = plan_commands(run(['-m', 'launch.submit', *flags, '--dry_run', '--', *SMOKE]).stdout)
  assert gcloud_calls(tmp_path) == (
      [['auth', 'list', '--filter=status:ACTIVE', '--format=value(account)']] +
      [argv[1:] for argv in planned])  # lookup, create, install on all, doctor and train on 0, delete
  assert [c[:5] for c in gcloud_calls(tmp_path)[1:3]] == [
      ['compute', 'tpus', 'tpu-vm', 'versions', 'list'], ['compute', 'tpus', 'tpu-vm', 'create', 'pod2']]
  assert '# runtime version tpu-vm-tf-2.20.0-pod-pjrt: listed in us-central2-b' in proc.stdout
  assert 'fake launch.doctor ran' in proc.stdout
  url = f'gs://{BUCKET}/charlstm/real1'
  assert f'# uploaded {ROOT / "data/tinyshakespeare.txt.gz"} -> {url}/corpus/tinyshakespeare.txt.gz' \
      in proc.stdout.splitlines()
  assert _blobs('charlstm/real1/') == sorted([
      'charlstm/real1/config.py', f'charlstm/real1/{WHEEL}',
      'charlstm/real1/corpus/tinyshakespeare.txt.gz'])

  # What the VM does, here: a fresh venv, the staged wheel, the staged config.py.
  from pipeline.cloud import gcs as gcs_lib  # pylint: disable=g-import-not-at-top
  bucket = gcs_lib.gcs_client().bucket(BUCKET)
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
  wanted = {p for p in execute.code_files() if p.endswith(('.py', '.txt.gz', '.cc', '.h'))}
  installed = {str(p.relative_to(site)) for p in site.rglob('*')
               if p.is_file() and p.suffix in ('.py', '.gz', '.cc', '.h') and '__pycache__' not in p.parts
               and not p.parts[len(site.parts)].endswith('.dist-info')}
  assert installed == wanted  # every module, config, bundled corpus and C++ op; nothing else
  assert {'pipeline/kernels/cell.cc', 'pipeline/kernels/sequence.cc',
          'pipeline/kernels/sequence_ops.cc',
          'pipeline/kernels/packets.h', 'pipeline/kernels/panels.h',
          'pipeline/kernels/amx.h', 'pipeline/kernels/tiles.h'} <= installed
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
  args = [a for a in train_argv(train)[3:] if not a.startswith(('--workdir', '--config.data.corpus',
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
  # A CPU VM builds the C++ ops from the wheel's source into its own venv.
  assert 'fused_lstm: C++ recurrence op.' in trained.stderr, trained.stderr[-3000:]
  assert list((venv / 'charlstm-ops').glob('cell-*.so'))
  saved = json.loads((tmp_path / 'workdir' / 'config.json').read_text())
  assert saved['model']['hidden_size'] == 64  # the smoke preset, rebuilt from the staged config.py


def test_restarts_relaunch_after_lost_ssh_and_preemption_on_a_spot_vm(gcs, tmp_path):
  # The train step: ssh lost the VM (255), then the job saved and stopped (75), then done.
  proc = _submit(tmp_path, ['--target=gpu-vm', '--name=spot', '--zone=z', f'--bucket=gs://{BUCKET}',
                            '--spot', '--restarts=2', '--run_id=spot1'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_TRAIN_CODES='255,75,0'))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  calls = [c[:3] if c[0] == 'compute' else c[:2] for c in gcloud_calls(tmp_path)]
  ssh, start = ['compute', 'ssh', 'spot'], ['compute', 'instances', 'start']
  # install, doctor, then train x3 (the doctor runs once: a relaunch only trains)
  assert calls == [['auth', 'list'], ssh, ssh, ssh, start, ssh, start, ssh]
  assert gcloud_calls(tmp_path)[4] == ['compute', 'instances', 'start', 'spot', '--zone=z']
  lines = [l for l in proc.stdout.splitlines() if 'relaunch' in l]
  assert [l.split(':')[0] for l in lines] == [
      '# the job lost its ssh connection (exit 255; a spot VM may have been preempted)',
      '# the job was preempted after saving a checkpoint']
  assert proc.stdout.splitlines()[-1] == '# the job ended with exit code 0'


# --- spot TPUs: a queued resource, waited for, deleted and created again when preempted -------

SPOT_TPU = ['--target=tpu-vm', '--name=spot-tpu', '--zone=us-central2-b',
            f'--bucket=gs://{BUCKET}', '--accelerator_type=v4-8', '--create', '--spot']
QR = ['compute', 'tpus', 'queued-resources']


def _steps(calls):
  """The calls as short names: versions, create, describe, delete, install, doctor, train."""
  names = []
  for c in calls[1:]:  # after `auth list`
    script = ' '.join(c)
    names.append('train' if 'launch.train' in script else 'doctor' if 'launch.doctor' in script
                 else 'install' if 'pip install' in script else c[3] if c[:3] == QR else c[3])
  return names


def test_spot_tpu_suspended_while_waiting_is_deleted_and_created_again(gcs, tmp_path):
  proc = _submit(tmp_path, [*SPOT_TPU, '--restarts=2', '--run_id=qr1'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_QR_STATES='SUSPENDED,ACTIVE'))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  calls = gcloud_calls(tmp_path)
  assert _steps(calls) == ['versions', 'create', 'describe', 'delete', 'create', 'describe',
                           'install', 'doctor', 'train']
  create = [*QR, 'create', 'spot-tpu', '--node-id=spot-tpu', '--zone=us-central2-b',
            '--accelerator-type=v4-8', '--runtime-version=tpu-vm-tf-2.20.0-pjrt', '--spot',
            '--scopes=https://www.googleapis.com/auth/cloud-platform']
  assert calls[2] == calls[5] == create  # the same create again
  assert calls[4] == [*QR, 'delete', 'spot-tpu', '--zone=us-central2-b', '--force', '--quiet']
  assert calls[3] == [*QR, 'describe', 'spot-tpu', '--zone=us-central2-b',
                      '--format=value(state.state)']
  assert ('# queued resource spot-tpu is SUSPENDED (a preempted spot TPU cannot be restarted): '
          'delete it and create it again, restart 1/2; the job resumes from '
          f'gs://{BUCKET}/charlstm/qr1/workdir/checkpoints') in proc.stdout.splitlines()
  assert proc.stdout.splitlines()[-1] == '# the job ended with exit code 0'


def test_spot_tpu_preempted_during_training_is_recreated_reinstalled_and_resumed(gcs, tmp_path):
  # ACTIVE; the job loses ssh (255); the TPU is SUSPENDED; recreated, ACTIVE; the job finishes.
  proc = _submit(tmp_path, [*SPOT_TPU, '--delete_after', '--restarts=2', '--run_id=qr2'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_QR_STATES='ACTIVE,SUSPENDED,ACTIVE',
                          FAKE_GCLOUD_TRAIN_CODES='255,0'))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  calls = gcloud_calls(tmp_path)
  assert _steps(calls) == ['versions', 'create', 'describe', 'install', 'doctor', 'train',
                           'describe', 'delete', 'create', 'describe', 'install', 'doctor',
                           'train', 'delete']
  trains = [c for c in calls if any('launch.train' in a for a in c)]
  assert trains[0] == trains[1]  # the same run, same workdir: it resumes from its checkpoints
  assert calls[-1] == [*QR, 'delete', 'spot-tpu', '--zone=us-central2-b', '--force', '--quiet']


def test_spot_tpu_suspended_without_restarts_is_one_line(gcs, tmp_path):
  proc = _submit(tmp_path, [*SPOT_TPU, '--delete_after', '--run_id=qr3'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_QR_STATES='SUSPENDED'))
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert error_lines(proc.stderr) == [
      'charlstm: error: Queued resource spot-tpu is SUSPENDED: a preempted spot TPU cannot be '
      'restarted, and no --restarts are left (0). Submit again with --restarts=N --run_id=qr3: '
      'it deletes and recreates it, and training resumes from the checkpoints in the bucket.']
  # Nothing was installed or trained; --delete_after still deletes the queued resource.
  assert _steps(gcloud_calls(tmp_path)) == ['versions', 'create', 'describe', 'delete']


def test_waiting_for_a_queued_resource_is_bounded(tmp_path, monkeypatch):
  bin_dir = recording_gcloud(tmp_path)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_GCLOUD_LOG', str(tmp_path / 'gcloud.jsonl'))
  monkeypatch.setattr(tpu_lib, 'POLL_SECONDS', 0)
  plan = plan_lib.make_plan(plan_lib.Spec(target='tpu-vm', name='q', zone='z',
                                          bucket=f'gs://{BUCKET}', accelerator_type='v4-8',
                                          create=True, spot=True, run_id='w1'), SMOKE)
  lines = []
  monkeypatch.setenv('FAKE_GCLOUD_QR_STATES', 'ACCEPTED,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE')
  assert execute._wait(plan, lines.append) == 'ACTIVE'
  assert [l for l in lines if l.startswith('# queued')] == [
      '# queued resource q: ACCEPTED', '# queued resource q: WAITING_FOR_RESOURCES',
      '# queued resource q: PROVISIONING', '# queued resource q: ACTIVE']
  monkeypatch.setenv('FAKE_GCLOUD_QR_STATES', 'FAILED')
  (tmp_path / 'gcloud.jsonl').unlink()
  assert execute._wait(plan, lines.append) == 'FAILED'  # for the restart loop to recreate
  monkeypatch.setenv('FAKE_GCLOUD_QR_STATES', 'WAITING_FOR_RESOURCES')
  monkeypatch.setattr(tpu_lib, 'WAIT_SECONDS', 0)
  with pytest.raises(execute.TpuUnavailable, match=r'^Queued resource q is still '
                     'WAITING_FOR_RESOURCES after 0 min'):
    execute._wait(plan, lines.append)


# --- errors: one line, before anything is staged ----------------------------------------

def test_a_zone_without_the_tpu_runtime_is_one_line_before_staging(gcs, tmp_path):
  proc = _submit(tmp_path, ['--target=tpu-vm', '--name=t', '--zone=europe-west4-a',
                            f'--bucket=gs://{BUCKET}', '--accelerator_type=v5litepod-8', '--create',
                            '--run_id=noversion'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_VERSIONS='tpu-ubuntu2204-base,'
                          'tpu-vm-tf-2.17.0-pjrt,tpu-vm-tf-2.18.0-pjrt,v2-alpha-tpuv5-lite'))
  assert proc.returncode == 2, proc.stderr
  assert error_lines(proc.stderr) == [
      'charlstm: error: Zone europe-west4-a lists no TPU runtime tpu-vm-tf-2.20.0-pjrt (for '
      'tensorflow-tpu 2.20.0, which the install puts on the VM); its TensorFlow runtimes are for '
      'TF 2.17.0, 2.18.0. Use a zone that offers it, or pass --runtime_version=NAME from `gcloud '
      'compute tpus tpu-vm versions list --zone=europe-west4-a` knowingly.']
  assert [c[:5] for c in gcloud_calls(tmp_path)] == [
      ['auth', 'list', '--filter=status:ACTIVE', '--format=value(account)'],
      ['compute', 'tpus', 'tpu-vm', 'versions', 'list']]  # nothing created
  assert _blobs('charlstm/noversion') == []


def test_a_failing_doctor_stops_the_run_before_training(gcs, tmp_path):
  proc = _submit(tmp_path, ['--target=gpu-vm', '--name=doc', '--zone=z', f'--bucket=gs://{BUCKET}',
                            '--run_id=doc1'], SMOKE,
                 env=dict(gcs.client_env(), FAKE_GCLOUD_DOCTOR_CODE='2'))
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'fake launch.doctor ran' in proc.stdout  # its output is shown
  [line] = error_lines(proc.stderr)
  assert line.startswith('charlstm: error: launch.doctor failed with exit code 2 on `gcloud '
                         'compute ssh doc --zone=z')
  assert line.endswith('(its output is above), so training was not started.')
  assert _steps(gcloud_calls(tmp_path)) == ['install', 'doctor']



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
    bin_dir = recording_gcloud(tmp_path)
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
  assert [c[:2] for c in gcloud_calls(tmp_path)] == [['auth', 'list']]  # nothing else ran

