"""gcloud in the launch.submit tests: a recording stand-in, and printed plans parsed back.

There is no cloud here. `recording_gcloud` writes a `gcloud` that records
its argv and succeeds, to be put first on PATH; a real (non-dry) submission
then shows exactly what would have run, in which order. `plan_commands`
turns a printed plan (launch.submit --dry_run) back into the argv lists it
prints, so the tests compare argument lists, not text.
"""

import json
import shlex
import sys
import textwrap


def plan_commands(script):
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


def ssh_script(argv):
  """The --command=SCRIPT of a gcloud ssh argv, as its lines."""
  [command] = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):].split('\n')


def train_argv(argv):
  """The launch.train argv inside a train command's script: TRAIN='...', shell-parsed twice."""
  [line] = [l for l in ssh_script(argv) if l.startswith('TRAIN=')]
  [assignment] = shlex.split(line)
  return shlex.split(assignment[len('TRAIN='):])


# What `gcloud compute tpus tpu-vm versions list --format=value(version)` prints: the kinds of
# names a zone lists (TF runtimes single-host and pod, JAX/PyTorch base images).
VERSIONS = ('tpu-ubuntu2204-base', 'tpu-vm-tf-2.18.0-pjrt', 'tpu-vm-tf-2.18.0-pod-pjrt',
            'tpu-vm-tf-2.20.0-pjrt', 'tpu-vm-tf-2.20.0-pod-pjrt', 'v2-alpha-tpuv5-lite',
            'v2-alpha-tpuv6e')


def recording_gcloud(tmp_path):
  """A `gcloud` that records its argv (FAKE_GCLOUD_LOG) and succeeds.

  `auth list` prints FAKE_GCLOUD_ACCOUNT; `tpu-vm versions list` prints
  FAKE_GCLOUD_VERSIONS (comma-separated; default VERSIONS), one a line;
  `queued-resources describe` prints the next state of FAKE_GCLOUD_QR_STATES
  (comma-separated, the last one repeats; default ACTIVE); launch.doctor
  commands exit with FAKE_GCLOUD_DOCTOR_CODE (default 0), after a line;
  train commands (ssh running launch.train) exit with the next code of
  FAKE_GCLOUD_TRAIN_CODES (default 0).
  """
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'#!{sys.executable}\n' + textwrap.dedent('''
      import json, os, sys
      args, log = sys.argv[1:], os.environ['FAKE_GCLOUD_LOG']
      calls = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
      earlier = sum(any('launch.train' in a for a in c) for c in calls)
      with open(log, 'a') as f:
        f.write(json.dumps(args) + '\\n')
      if args[:2] == ['auth', 'list']:
        print(os.environ.get('FAKE_GCLOUD_ACCOUNT', ''))
      if args[:5] == ['compute', 'tpus', 'tpu-vm', 'versions', 'list']:
        print('\\n'.join(os.environ.get('FAKE_GCLOUD_VERSIONS', %r).split(',')))
      if args[:4] == ['compute', 'tpus', 'queued-resources', 'describe']:
        states = os.environ.get('FAKE_GCLOUD_QR_STATES', 'ACTIVE').split(',')
        asked = sum(c[:4] == args[:4] for c in calls)
        print(states[min(asked, len(states) - 1)])
      if any('launch.doctor' in a for a in args):
        print('fake launch.doctor ran')
        sys.exit(int(os.environ.get('FAKE_GCLOUD_DOCTOR_CODE', '0')))
      if any('launch.train' in a for a in args):
        codes = os.environ.get('FAKE_GCLOUD_TRAIN_CODES', '0').split(',')
        sys.exit(int(codes[earlier]) if earlier < len(codes) else 0)
      ''') % ','.join(VERSIONS))
  gcloud.chmod(0o755)
  return bin_dir


def gcloud_calls(tmp_path):
  path = tmp_path / 'gcloud.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
