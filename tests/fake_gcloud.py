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


def recording_gcloud(tmp_path):
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


def gcloud_calls(tmp_path):
  path = tmp_path / 'gcloud.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
