"""The half of launch.submit that acts: check, stage, create, install, doctor, train, delete.

`submit` is launch.submit's whole job: it makes the plan (pipeline/cloud/plan.py)
and prints it for --dry_run, or hands it to `execute`, which carries out a
`plan.Plan` in order. That checks gcloud, the credentials and (for a TPU
without --runtime_version) that the zone offers the planned runtime version
first, so each of those is one line before anything is uploaded. Commands
that target several hosts run at the same time, each output line prefixed
with its host. A spot TPU's queued resource is waited for, and deleted and
created again when preempted (pipeline/cloud/tpu.py says why).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pipeline
from pipeline import errors
from pipeline.cloud import accelerators
from pipeline.cloud import plan as plan_lib
from pipeline.cloud import remote
from pipeline.cloud import tpu as tpu_lib

# What a remote machine needs to `pip install` and run the jobs. README.md is
# included because pyproject.toml names it as the package readme.
CODE_PATHS = ('pipeline', 'launch', 'configs', 'data', 'pyproject.toml', 'README.md')
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
SSH_RETRIES = 5  # a VM that was just created may refuse ssh for a while (exit 255)
SSH_RETRY_SECONDS = 20


class CommandFailed(plan_lib.SubmitError):
  """A gcloud command failed; its own output is above the message."""
  exit_code = errors.EXIT_FAILED


class TpuUnavailable(CommandFailed):
  """A spot TPU's queued resource did not become ACTIVE, or was lost with no restarts left."""


def submit(spec, train_flags, dry_run=False, out=print):
  """launch.submit's whole job: plan, then print it (dry run) or execute it; returns the status."""
  plan = plan_lib.make_plan(spec, train_flags)
  if dry_run:
    out(plan_lib.describe(plan))
    return errors.EXIT_OK
  return execute(plan, out)


def preflight(spec):
  """Fails with one line, before anything is staged, if gcloud or credentials are missing.

  In order: gcloud on PATH, an active gcloud account (for the VMs),
  application-default credentials (for the uploads), the bucket.
  """
  if not shutil.which('gcloud'):
    raise plan_lib.SubmitError(
        'gcloud is not on PATH: install the Google Cloud CLI '
        '(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands '
        'without running them.')
  try:
    account = subprocess.run(['gcloud', 'auth', 'list', '--filter=status:ACTIVE',
                              '--format=value(account)'], capture_output=True, text=True,
                             check=False, timeout=120).stdout.strip()
  except subprocess.TimeoutExpired:
    raise plan_lib.SubmitError('`gcloud auth list` did not answer within 120 s; check that '
                               '`gcloud auth list` works in this shell.') from None
  if not account:
    raise plan_lib.SubmitError(
        'gcloud has no active account, so it cannot create or reach VMs: run `gcloud auth '
        'login` (and `gcloud config set project PROJECT`, or pass --project).')
  # Not imported at the top: both import TensorFlow, which a dry run does without.
  from pipeline import storage  # pylint: disable=g-import-not-at-top
  from pipeline.cloud import gcs  # pylint: disable=g-import-not-at-top
  if not os.environ.get('STORAGE_EMULATOR_HOST'):
    storage.gcs_credentials(spec.bucket)  # the uploads use application-default credentials
  gcs.check_bucket(spec.bucket)


def code_files():
  """The files of CODE_PATHS in this checkout, relative, sorted per path: what the wheel holds.

  Dot-names, __pycache__ and .pyc files are left out (see `gcs.local_files`).
  """
  from pipeline.cloud import gcs  # pylint: disable=g-import-not-at-top
  files = []
  for top in CODE_PATHS:
    path = os.path.join(pipeline.ROOT, top)
    if os.path.isdir(path):
      files.extend(os.path.join(top, rel) for rel in gcs.local_files(path))
    elif os.path.isfile(path):
      files.append(top)
    else:
      raise plan_lib.SubmitError(f'Cannot build the wheel: {path} is missing.')
  return files


def build_wheel(out_dir):
  """Builds the charlstm wheel from a copy of this checkout's code; returns its path.

  A copy, because an in-tree build writes build/ and *.egg-info into the
  working tree. No build isolation: the local setuptools builds it offline.
  """
  src = os.path.join(out_dir, 'src')
  for rel in code_files():
    os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
    shutil.copy2(os.path.join(pipeline.ROOT, rel), os.path.join(src, rel))
  proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
                         '--no-build-isolation', '--no-index', '-w', out_dir, src],
                        capture_output=True, text=True, check=False)
  wheels = glob.glob(os.path.join(out_dir, '*.whl'))
  if proc.returncode or len(wheels) != 1:
    detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no wheel written']
    raise plan_lib.SubmitError(
        f'Building the wheel failed ({detail[0]}); it needs setuptools>=64 and wheel in this '
        'python: `pip install "setuptools>=64" wheel`.')
  return wheels[0]


def stage(plan, out=print):
  """Builds the wheel and config.py, uploads them and the corpus; returns the URLs written."""
  from pipeline.cloud import gcs  # pylint: disable=g-import-not-at-top  # imports TensorFlow
  written = []
  with tempfile.TemporaryDirectory(prefix='charlstm-submit-') as tmp:
    wheel = build_wheel(tmp)
    if os.path.basename(wheel) != plan.wheel_name:
      raise plan_lib.SubmitError(
          f'Built {os.path.basename(wheel)}, but planned {plan.wheel_name}.')
    config_py = os.path.join(tmp, 'config.py')
    with open(config_py, 'w', encoding='utf-8') as f:
      f.write(remote.config_py(plan.config, plan.run_id))
    for src, url in plan.uploads:
      local = {'<wheel>': wheel, '<config.py>': config_py}.get(src, src)
      gcs.upload_file(local, url)
      out(f'# uploaded {local} -> {url}')
      written.append(url)
  return written


def _run(argv, out, retry_ssh=False, prefix=None):
  """Runs one command; with a prefix its output is piped and each line prefixed. Returns the code."""
  for attempt in range(SSH_RETRIES if retry_ssh else 1):
    if prefix is None:
      code = subprocess.run(argv, check=False).returncode
    else:
      with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors='replace') as proc:
        for line in proc.stdout:
          out(prefix + line.rstrip('\n'))
      code = proc.returncode
    if code != errors.EXIT_SSH or not retry_ssh or attempt == SSH_RETRIES - 1:
      return code
    out(f'# ssh failed (exit 255); the VM may still be booting: retry in {SSH_RETRY_SECONDS} s')
    time.sleep(SSH_RETRY_SECONDS)
  return code


def _run_all(commands, hosts, out, retry_ssh=False):
  """Runs `commands` (one per host) at the same time if there are several; returns their codes."""
  for argv in commands:
    out(f'$ {shlex.join(argv)}' + (' &' if len(commands) > 1 else ''))
  if len(commands) == 1:
    return [_run(commands[0], out, retry_ssh)]
  codes = [None] * len(commands)

  def one(i):
    codes[i] = _run(commands[i], out, retry_ssh, prefix=f'[{hosts[i]}] ')

  threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(commands))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return codes


def _checked(commands, hosts, out, retry_ssh=False):
  for argv, code in zip(commands, _run_all(commands, hosts, out, retry_ssh)):
    if code:
      raise CommandFailed(f'`{shlex.join(argv[:6])} ...` failed with exit code {code} '
                          '(its output is above).')


def _job_status(codes):
  """One exit status for a job on several hosts: 0; the first real failure; else 255 or 75."""
  bad = [c for c in codes if c != 0]
  for c in bad:
    if c not in (errors.EXIT_PREEMPTED, errors.EXIT_SSH):
      return c
  return errors.EXIT_SSH if errors.EXIT_SSH in bad else bad[0] if bad else errors.EXIT_OK


def _answer(argv, out):
  """Runs a gcloud command whose output is an answer; its stdout (stderr shown on failure)."""
  try:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False, timeout=300)
  except subprocess.TimeoutExpired:
    raise CommandFailed(f'`{shlex.join(argv[:6])} ...` did not answer within 300 s.') from None
  if proc.returncode:
    for line in proc.stderr.splitlines():
      out(line)
    raise CommandFailed(f'`{shlex.join(argv[:6])} ...` failed with exit code {proc.returncode} '
                        '(its output is above).')
  return proc.stdout


def check_runtime_version(plan, out=print):
  """Fails with one line, before staging, if the zone does not list the planned TPU runtime."""
  if not plan.versions:
    return
  out(f'$ {shlex.join(plan.versions)}')
  listed = _answer(plan.versions, out).splitlines()
  picked = accelerators.pick_runtime_version(plan.spec.accelerator_type, listed, plan.spec.zone)
  out(f'# runtime version {picked}: listed in {plan.spec.zone}')


def _wait(plan, out):
  """Polls the queued resource until it is ACTIVE, SUSPENDED or FAILED; returns that state.

  Other states (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ...) mean
  it is still coming; after tpu.WAIT_SECONDS that is a one-line error.
  """
  name, deadline, last = plan.spec.name, time.monotonic() + tpu_lib.WAIT_SECONDS, None
  out(f'$ {shlex.join(plan.wait)}  # until {tpu_lib.READY}, every {tpu_lib.POLL_SECONDS} s')
  while True:
    state = _answer(plan.wait, out).strip() or '(no state)'
    if state != last:
      out(f'# queued resource {name}: {state}')
      last = state
    if state == tpu_lib.READY or state in tpu_lib.LOST:
      return state
    if time.monotonic() >= deadline:
      raise TpuUnavailable(
          f'Queued resource {name} is still {state} after {tpu_lib.WAIT_SECONDS // 60} min '
          f'(no spot capacity yet?). It stays queued unless --delete_after deletes it; '
          f'submit again with --run_id={plan.run_id} later, or try another zone.')
    time.sleep(tpu_lib.POLL_SECONDS)


def _until_active(plan, hosts, out, used, state=None):
  """Waits for the queued resource; deletes and recreates it while it is lost. Returns `used`.

  Each recreation spends one of --restarts; with none left, a lost
  resource is a one-line error.
  """
  state = state or _wait(plan, out)
  while state != tpu_lib.READY:
    if used == plan.spec.restarts:
      raise TpuUnavailable(
          f'Queued resource {plan.spec.name} is {state}: a preempted spot TPU cannot be '
          f'restarted, and no --restarts are left ({plan.spec.restarts}). Submit again with '
          f'--restarts=N --run_id={plan.run_id}: it deletes and recreates it, and training '
          'resumes from the checkpoints in the bucket.')
    used += 1
    out(f'# queued resource {plan.spec.name} is {state} (a preempted spot TPU cannot be '
        f'restarted): delete it and create it again, restart {used}/{plan.spec.restarts}; the '
        f'job resumes from {plan.workdir}/checkpoints')
    for argv in plan.recreate:
      _checked([argv], hosts, out)
    state = _wait(plan, out)
  return used


def _install(plan, hosts, out):
  """Installs on every host, then runs launch.doctor where training runs; it must pass."""
  _checked(plan.setup, hosts, out, retry_ssh=True)
  for argv, code in zip(plan.doctor, _run_all(plan.doctor, hosts, out, retry_ssh=True)):
    if code:
      raise CommandFailed(f'launch.doctor failed with exit code {code} on `{shlex.join(argv[:6])} '
                          '...` (its output is above), so training was not started.')


def execute(plan, out=print):
  """Checks, stages, creates, installs, runs the doctor, trains, deletes; returns the status.

  --restarts=K relaunches the train step up to K times after exit 75 (the
  job saved a checkpoint and stopped) or 255 (ssh lost the VM), first
  starting stopped spot GPU VMs. A spot TPU's queued resource found
  SUSPENDED or FAILED (while waiting for it, or after such an exit) is
  deleted and created again instead, then installed and checked again;
  each recreation spends one of the K. With --delete_after the VMs are
  deleted once the job has ended, also when it failed (its log and
  checkpoints are in the bucket), but not when this process is
  interrupted: the job then keeps running on the VM.
  """
  preflight(plan.spec)
  check_runtime_version(plan, out)
  out(f'# {plan.summary}')
  stage(plan, out)
  out(f'# staged in {plan.run_url}/')
  hosts = plan.hosts  # labels the output when one command per host runs at the same time
  vm_exists = not plan.create  # without --create the VMs were there before
  try:
    for argv in plan.create:
      _checked([argv], hosts, out)
    vm_exists = True
    used = _until_active(plan, hosts, out, 0) if plan.wait else 0
    _install(plan, hosts, out)
    for line in plan_lib.outputs(plan):
      out(line)
    while True:
      # A relaunch waits for ssh (a restarted VM boots) and follows the job if it still runs.
      code = _job_status(_run_all(plan.train, hosts, out, retry_ssh=used > 0))
      if code not in (errors.EXIT_PREEMPTED, errors.EXIT_SSH) or used == plan.spec.restarts:
        break
      if plan.wait:  # a spot TPU: a preempted one is SUSPENDED, and only recreating helps
        state = _wait(plan, out)
        if state != tpu_lib.READY:
          used = _until_active(plan, hosts, out, used, state)
          _install(plan, hosts, out)
          continue
      used += 1
      why = ('was preempted after saving a checkpoint' if code == errors.EXIT_PREEMPTED else
             'lost its ssh connection (exit 255; a spot VM may have been preempted)')
      out(f'# the job {why}: relaunch {used}/{plan.spec.restarts}; it resumes from '
          f'{plan.workdir}/checkpoints, or is followed if it still runs')
      for argv in plan.before_restart:
        _checked([argv], hosts, out)
  except KeyboardInterrupt:
    out('# interrupted: the job keeps running on the VM. Follow it with: ' +
        shlex.join(plan.follow))
    for argv in plan.delete:
      out(f'# not deleted; when the job is done: {shlex.join(argv)}')
    return EXIT_INTERRUPTED
  except CommandFailed:
    if vm_exists:
      _delete(plan, out)  # with --delete_after a failed install must not leave VMs running
    raise
  out(f'# the job ended with exit code {code}' +
      (f'; resume it with the same command and --run_id={plan.run_id} (plus --create if '
       'the VM is gone)' if code in (errors.EXIT_PREEMPTED, errors.EXIT_SSH) else ''))
  _delete(plan, out)
  return code


def _delete(plan, out):
  for argv in plan.delete:
    out(f'$ {shlex.join(argv)}')
    _run(argv, out)
