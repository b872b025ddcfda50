"""The shell scripts launch.submit runs on a VM over ssh (`gcloud ... ssh --command=SCRIPT`).

Each is POSIX sh, one statement per line, every value quoted with
`shlex.quote`/`shlex.join`, so a config value with spaces or quotes reaches
launch.train unchanged. On the VM a run lives in ~/charlstm/<run-id>/:
the staged wheel and config.py, and train.log. Every run shares the venv
~/charlstm/venv, so TensorFlow is downloaded once per VM.

  install_script  copy the wheel and config.py from the bucket, make the venv,
                  pip install the wheel with its TensorFlow extra
  doctor_script   run launch.doctor on the staged config and the run's workdir,
                  with launch.train's environment, before training starts
  train_script    start launch.train under nohup (it survives a lost ssh
                  connection) or follow the one already running, stream its
                  log, exit with its status, copy the log to the bucket
"""

import json
import pprint
import shlex

VENV = '../venv'  # relative to the run directory: ~/charlstm/venv


def run_dir(run_id):
  """The run's directory on the VM, relative to the home directory ssh starts in."""
  return f'charlstm/{run_id}'


def install_script(run_url, run_id, wheel, extra, find_links=None):
  """Installs the staged wheel, with the `extra` (tpu or gpu) TensorFlow, into ~/charlstm/venv.

  The wheel is installed twice: with its dependencies (pip skips the ones
  already there), then alone with --force-reinstall, because every staged
  wheel has the same version and pip would otherwise keep the old code.
  """
  pip = [f'{VENV}/bin/python', '-m', 'pip', 'install', '--quiet']
  links = ['-f', find_links] if find_links else []
  venv = shlex.join(['python3', '-m', 'venv', VENV])
  return '\n'.join([
      'set -eu',
      f'mkdir -p {shlex.quote(run_dir(run_id))}',
      f'cd {shlex.quote(run_dir(run_id))}',
      shlex.join(['gcloud', 'storage', 'cp', f'{run_url}/{wheel}', f'{run_url}/config.py', '.']),
      # Ubuntu images may lack the venv module (ensurepip); a failed venv is removed first.
      f'test -x {VENV}/bin/pip || {venv} || {{ rm -rf {VENV}; sudo apt-get update -qq && '
      f'sudo apt-get install -y -qq python3-venv && {venv}; }}',
      shlex.join(pip + ['--upgrade', 'pip']),
      shlex.join(pip + [f'./{wheel}[{extra}]', *links]),
      shlex.join(pip + ['--no-deps', '--force-reinstall', f'./{wheel}']),
  ])


def tpu_env(single_host):
  """Environment for launch.train on a TPU VM, as (name, value) pairs.

  One host: the PJRT plugin variables Google's TF-on-TPU tests export after
  a pip install of tensorflow-tpu (libtpu.so from the libtpu wheel, else the
  image's /lib/libtpu.so). A pod slice: TPU_LOAD_LIBRARY=0, because the
  process on worker 0 connects to the slice's TPU runtime instead of
  loading libtpu itself.
  """
  if not single_host:
    return [('TPU_LOAD_LIBRARY', '0')]
  find = ('import importlib.util as u, os; s = u.find_spec("libtpu"); '
          'print(os.path.join(s.submodule_search_locations[0], "libtpu.so") '
          'if s else "/lib/libtpu.so")')
  return [('NEXT_PLUGGABLE_DEVICE_USE_C_API', 'true'),
          ('TF_PLUGGABLE_DEVICE_LIBRARY_PATH',
           '$(' + shlex.join([f'{VENV}/bin/python', '-c', find]) + ')')]


def tf_config_env(workers, index):
  """TF_CONFIG for worker `index` of `workers` (host:port each); worker 0 is the chief."""
  return [('TF_CONFIG', json.dumps({'cluster': {'worker': list(workers)},
                                    'task': {'type': 'worker', 'index': index}}))]


def _exports(env):
  """`export NAME=value` lines; values are quoted, except `$(...)` ones (run on the VM)."""
  return [f'export {name}="{value}"' if value.startswith('$(') else
          f'export {name}={shlex.quote(value)}' for name, value in env]


def doctor_script(run_id, workdir, env):
  """Runs launch.doctor with the staged config.py, the run's workdir and launch.train's `env`.

  Its own step before training, not part of train_script: it runs once per
  install, not again on each relaunch of a job that is already running, and
  a failure (set -e: its exit status) stops the submission before training.
  """
  return '\n'.join(['set -eu', f'cd {shlex.quote(run_dir(run_id))}', *_exports(env),
                    shlex.join([f'{VENV}/bin/python', '-m', 'launch.doctor', '--config=config.py',
                                f'--workdir={workdir}'])])


def train_script(run_url, run_id, train_args, env, host):
  """Runs launch.train in the run directory, or follows it if it already runs there.

  The job runs under nohup, so a dropped ssh connection does not stop it,
  inside `sh -c '<train>; echo $? > train.exit'`, so its exit status
  survives this shell. train.pid names the wrapper: a second submission of
  the same run (a reconnect, or --restarts after ssh failed) follows the
  running job instead of starting a second one in the same workdir. The
  script streams train.log from where this attempt starts, exits with the
  job's status (1 if it left none: killed, or the VM stopped) and copies
  the log to the bucket. `env` values are quoted, except `$(...)` ones.
  """
  train = shlex.join([f'{VENV}/bin/python', '-m', 'launch.train', *train_args])
  lines = ['set -u', f'cd {shlex.quote(run_dir(run_id))}', *_exports(env)]
  lines += [
      f'TRAIN={shlex.quote(train)}',
      'touch train.log',
      'start=$(($(wc -l < train.log) + 1))',
      'if [ -s train.pid ] && grep -qs launch.train "/proc/$(cat train.pid)/cmdline"; then',
      '  echo "charlstm: launch.train already runs here (pid $(cat train.pid)); following it"',
      'else',
      '  rm -f train.exit',
      '  nohup sh -c "$TRAIN"\'; echo $? > train.exit\' >> train.log 2>&1 < /dev/null &',
      '  echo $! > train.pid',
      'fi',
      'tail -n "+$start" -f --pid="$(cat train.pid)" train.log',
      'code=$(cat train.exit 2>/dev/null || echo 1)',
      shlex.join(['gcloud', 'storage', 'cp', 'train.log', f'{run_url}/logs/{host}.log']) +
      ' || true',
      'exit "$code"',
  ]
  return '\n'.join(lines)


def follow_script(run_id):
  """Tails a run's log on the VM (from another terminal, or after this one stopped)."""
  return shlex.join(['tail', '-n', '+1', '-f', f'{run_dir(run_id)}/train.log'])


def config_py(config, run_id):
  """A config file (for --config=) that rebuilds the resolved config `config` (a dict) exactly.

  The dict is written as a Python literal: repr() round-trips str, int,
  float and bool values exactly.
  """
  return (f'"""The resolved config of charlstm run {run_id}, staged by launch.submit.\n\n'
          'Train with it: python -m launch.train --config=config.py --workdir=...\n"""\n\n'
          'from pipeline import config as config_lib\n\n'
          f'RESOLVED = {pprint.pformat(config, width=100, sort_dicts=True)}\n\n\n'
          'def get_config():\n  return config_lib.from_dict(RESOLVED)\n')
