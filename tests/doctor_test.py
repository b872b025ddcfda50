"""launch.doctor, run as an operator runs it: `python -m launch.doctor` in a fresh process.

Every check passes on this CPU machine within the two-minute budget and leaves
the workdir as it found it; bad input is one line and exit 2; a check that
cannot do its job prints FAILED and the doctor exits 1; a gs:// workdir works
against the local GCS emulator (tests/gcs_emulator.py) and is left empty.
"""

import re
import subprocess
import sys
import time

import pytest

from tests import gcs_emulator
from tests.conftest import CHILD_ENV, ROOT, error_lines

CHECKS = ('devices', 'corpus', 'train', 'checkpoint', 'export')
SMOKE = '--config=configs/shakespeare.py:smoke'
BUDGET_S = 120  # the "under two minutes on the target machine"
BUCKET = 'charlstm-doctor-test'


def _lines(stdout):
  """{check name: its line} of the doctor's per-check lines."""
  found = {}
  for line in stdout.splitlines():
    m = re.match(r'^(ok|FAILED) +(\w+): .* \[\d+\.\d s\]$', line)
    if m:
      found[m.group(2)] = line
  return found


def _doctor(workdir, *flags, env=None, check=False):
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.doctor', SMOKE, f'--workdir={workdir}', *flags],
      cwd=ROOT, env=env or CHILD_ENV, capture_output=True, text=True, timeout=2 * BUDGET_S)
  elapsed = time.monotonic() - start
  print(proc.stdout, f'launch.doctor took {elapsed:.1f} s')  # shown with -s or on failure
  if check and proc.returncode != 0:
    raise AssertionError(f'exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}')
  return proc, elapsed


def _assert_all_ok(proc):
  lines = _lines(proc.stdout)
  assert list(lines) == list(CHECKS), proc.stdout
  for name in CHECKS:
    assert lines[name].startswith(f'ok      {name}: '), lines[name]
  assert lines['devices'].startswith('ok      devices: CPU:0 (strategy auto -> cpu, 1 replica)')
  assert re.search(r'3 steps, loss \d\.\d+ nats/char', lines['train']), lines['train']
  assert proc.stdout.splitlines()[-1].startswith('doctor: all 5 checks ok in ')


def test_smoke_config_passes_every_check_in_budget_and_leaves_the_workdir_alone(tmp_path):
  workdir = tmp_path / 'run'
  # A workdir holding a run already: the doctor must neither read nor touch it.
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'checkpoints' / 'ckpt-7.index').write_text('not a checkpoint')
  before = sorted(p.relative_to(workdir) for p in workdir.rglob('*'))
  proc, elapsed = _doctor(workdir, check=True)
  _assert_all_ok(proc)
  assert elapsed < BUDGET_S, f'took {elapsed:.1f} s'
  assert sorted(p.relative_to(workdir) for p in workdir.rglob('*')) == before
  assert (workdir / 'checkpoints' / 'ckpt-7.index').read_text() == 'not a checkpoint'


def test_missing_tpu_is_one_line_and_exit_2(tmp_path):
  proc, _ = _doctor(tmp_path / 'run', '--config.runtime.strategy=tpu')
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('charlstm: error: devices: runtime.strategy=tpu, but no TPU '
                             'devices were found'), lines[0]
  assert _lines(proc.stdout) == {}  # nothing ran after the devices
  assert not (tmp_path / 'run').exists()


def test_gs_workdir_without_credentials_is_one_line_before_any_check(tmp_path):
  env = {k: v for k, v in CHILD_ENV.items()
         if not k.startswith(('GOOGLE_', 'GCE_', 'STORAGE_EMULATOR', 'CLOUDSDK', 'CHARLSTM_GCS'))
         and k.upper() not in ('HTTPS_PROXY', 'CURL_CA_BUNDLE')}
  env.update(HOME=str(tmp_path), NO_GCE_CHECK='true')
  proc, elapsed = _doctor('gs://some-bucket/runs/r1', env=env)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('charlstm: error: gs://some-bucket/runs/r1 needs Google Cloud '
                             'credentials and none were found'), lines[0]
  assert _lines(proc.stdout) == {}
  assert elapsed < 30, f'took {elapsed:.1f} s'


def test_unwritable_workdir_fails_the_checkpoint_and_export_checks_with_exit_1(tmp_path):
  (tmp_path / 'file').write_text('a regular file, not a directory')
  proc, _ = _doctor(tmp_path / 'file' / 'run')
  assert proc.returncode == 1, proc.stdout + proc.stderr
  lines = _lines(proc.stdout)
  assert list(lines) == list(CHECKS), proc.stdout
  for name in ('devices', 'corpus', 'train'):
    assert lines[name].startswith(f'ok      {name}: '), lines[name]
  for name in ('checkpoint', 'export'):
    # Why, in one line: TensorFlow's error names the file in the way.
    assert lines[name].startswith(f'FAILED  {name}: FailedPreconditionError: '), lines[name]
    assert 'is not a directory' in lines[name], lines[name]
  assert proc.stdout.splitlines()[-1].startswith(
      'doctor: 2 of 5 checks FAILED (checkpoint, export) in ')
  assert error_lines(proc.stderr) == []  # a failed check is a finding, not a crash


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  with gcs_emulator.serving(tmp_path_factory.mktemp('gcs'), BUCKET) as emulator:
    yield emulator


def test_gs_workdir_passes_and_is_left_empty(gcs):
  from pipeline.cloud import gcs as gcs_lib  # pylint: disable=g-import-not-at-top
  client = gcs_lib.gcs_client()
  client.bucket(BUCKET).blob('runs/r1/config.json').upload_from_string('{}')
  env = dict(CHILD_ENV, **gcs.tf_env())
  proc, elapsed = _doctor(f'gs://{BUCKET}/runs/r1', env=env, check=True)
  _assert_all_ok(proc)
  lines = _lines(proc.stdout)
  assert f'gs://{BUCKET}/runs/r1/doctor-' in lines['checkpoint'], lines['checkpoint']
  assert elapsed < BUDGET_S, f'took {elapsed:.1f} s'
  # Written, read and deleted over gs://: only the run's own file is left.
  assert sorted(b.name for b in client.list_blobs(BUCKET, prefix='runs/')) == [
      'runs/r1/config.json']
