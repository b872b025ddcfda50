"""launch.submit: a training run on a Cloud TPU VM or GPU VMs, planned as exact gcloud commands.

`make_plan` turns the flags into a `Plan`: the files to stage in
gs://BUCKET/charlstm/<run-id>/ and every gcloud command, each an argument
list. Nothing runs while planning, so `--dry_run` prints the plan with
`shlex.join` (copy-pasteable) and stops. Otherwise `execute.execute`
really does it:

  1. stage: build a wheel of this checkout, resolve the config (a config.py
     that rebuilds it exactly), upload both and any local corpus with
     google-cloud-storage (pipeline/cloud/gcs.py);
  2. TPU without --runtime_version: pick the runtime for the TPU's TF from
     the zone's `tpu-vm versions list`;
  3. create the VM(s) if asked (a spot TPU: a queued resource, waited for);
  4. install the wheel on every host (`--worker=all` on a TPU), check with
     launch.doctor where training runs, then run launch.train, following its
     log; the run keeps going on the VM if this process stops (nohup), and
     its log is copied to the bucket at the end;
  5. with --restarts, relaunch a preempted job (a preempted spot TPU is
     deleted and created again first);
  6. with --delete_after, delete the VM(s) once the job has ended.

The gcloud argument lists are built here (the TPU ones in
pipeline/cloud/tpu.py), the shell scripts they run on the VMs in
pipeline/cloud/remote.py, and pipeline/cloud/execute.py carries a plan out
(this module never imports it).
BUILD.md ("Submit a run") says where TPU and GPU runs differ, and why.
"""

import dataclasses
import glob
import os
import re
import shlex
import time

import pipeline
from pipeline import errors
from pipeline.cloud import accelerators
from pipeline.cloud import remote
from pipeline.cloud import tpu as tpu_lib

TARGETS = ('tpu-vm', 'gpu-vm')
LIBTPU_INDEX = 'https://storage.googleapis.com/libtpu-tf-releases/index.html'
SCOPES = 'https://www.googleapis.com/auth/cloud-platform'  # the VMs write checkpoints to the bucket
# Deep Learning VM base image: Ubuntu 22.04 with the NVIDIA driver, no framework (pip brings TF).
DEFAULT_IMAGE_FAMILY = 'common-cu129-ubuntu-2204-nvidia-580'
DEFAULT_IMAGE_PROJECT = 'deeplearning-platform-release'
_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$')  # GCE names, with room for -<i>
_RUN_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$')


class SubmitError(errors.Error):
  """launch.submit cannot go on; the message says why and what to do."""


@dataclasses.dataclass
class Spec:
  """What launch.submit was asked to do (its flags)."""
  target: str
  name: str
  zone: str
  bucket: str
  project: str = ''
  accelerator_type: str = ''
  runtime_version: str = ''
  machine_type: str = 'g2-standard-8'
  gpu: str = ''
  image_family: str = DEFAULT_IMAGE_FAMILY
  image_project: str = DEFAULT_IMAGE_PROJECT
  boot_disk_size: str = '200GB'
  num_workers: int = 1
  port: int = 2222
  create: bool = False
  delete_after: bool = False
  spot: bool = False
  restarts: int = 0
  run_id: str = ''


@dataclasses.dataclass
class Plan:
  """Everything a submission uploads and runs, as data; `describe` prints it."""
  spec: Spec
  run_id: str
  run_url: str  # gs://B/charlstm/<run-id>
  workdir: str
  hosts: list  # the VM names, or the TPU's name
  summary: str  # one line: what runs where
  wheel_name: str
  config: dict  # the resolved config the run trains with
  uploads: list  # (local source, gs:// url); '<wheel>' and '<config.py>' are made when staging
  create: list  # gcloud argv lists
  setup: list
  doctor: list  # launch.doctor where launch.train runs, one argv per such host
  train: list  # one argv per host; several run at the same time
  delete: list
  before_restart: list  # run before relaunching a preempted job (exit 75)
  follow: list  # the command that tails the log on the VM
  runtime_version: str = ''  # TPU: the planned name (the zone's list confirms it, see `versions`)
  versions: list = dataclasses.field(default_factory=list)  # TPU: argv listing the zone's runtimes
  wait: list = dataclasses.field(default_factory=list)  # spot TPU: argv printing its state
  recreate: list = dataclasses.field(default_factory=list)  # spot TPU: delete, create again


def _gcloud(spec, *args):
  argv = ['gcloud', *args]
  if spec.project:
    argv.append(f'--project={spec.project}')
  return argv


def _check_spec(spec):
  if spec.target not in TARGETS:
    raise SubmitError(f'Unknown --target={spec.target!r}: use tpu-vm or gpu-vm.')
  if not _NAME.match(spec.name or ''):
    raise SubmitError(f'--name={spec.name!r} is not a VM name: lowercase letters, digits and '
                      '"-", starting with a letter, at most 52 characters.')
  if not spec.zone:
    raise SubmitError('--zone is required, e.g. --zone=us-central2-b.')
  if not re.match(r'^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/?$', spec.bucket or ''):
    raise SubmitError(f'--bucket={spec.bucket!r} must be a bucket, gs://NAME; runs go to '
                      'gs://NAME/charlstm/<run-id>/.')
  if spec.run_id and not _RUN_ID.match(spec.run_id):
    raise SubmitError(f'--run_id={spec.run_id!r}: use letters, digits, ".", "_" and "-".')
  if spec.target == 'tpu-vm':
    if not spec.accelerator_type:
      raise SubmitError('--target=tpu-vm needs --accelerator_type, e.g. v5litepod-8 or v4-8.')
    accelerators.tpu_is_single_host(spec.accelerator_type)  # raises for an unknown type
    if spec.gpu or spec.num_workers != 1:
      raise SubmitError('--gpu and --num_workers are for --target=gpu-vm; a TPU slice has the '
                        'hosts of its --accelerator_type.')
  else:
    if spec.accelerator_type or spec.runtime_version:
      raise SubmitError('--accelerator_type and --runtime_version are for --target=tpu-vm; '
                        'GPU VMs take --machine_type and --gpu.')
    if spec.num_workers < 1:
      raise SubmitError('--num_workers must be >= 1.')
    accelerators.gpus_per_host(spec.machine_type, spec.gpu)


def _flag_name(arg):
  return arg.lstrip('-').split('=', 1)[0] if arg.startswith('-') else None


def _split_train_flags(train_flags):
  """(the flags the VM passes on, the config keys they override).

  The VM gets every launch.train flag but --config (it trains with the
  staged config.py) and --config.data.corpus (replaced by the staged copy).
  The keys are e.g. {'runtime.strategy'}.
  """
  rest, keys, skip = [], set(), False
  for i, arg in enumerate(train_flags):
    if skip:
      skip = False
      continue
    name = _flag_name(arg)
    if name and name.startswith(('config.', 'noconfig.')):
      keys.add(name.split('.', 1)[1])
    if name in ('config', 'config.data.corpus'):
      skip = '=' not in arg  # `--config FILE`: the value is the next argument
      continue
    rest.append(arg)
  return rest, keys


def resolve_config(train_flags):
  """Parses the launch.train flags exactly as launch.train does; returns the locked config.

  Raises SubmitError for a missing --config, a --workdir (launch.submit
  sets it) or any flag launch.train would refuse.
  """
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  values = absl_flags.FlagValues()
  argv = ['launch.train', *train_flags]
  # sys_argv: the config flag registers the --config.* override flags it finds in
  # it, and would otherwise look in sys.argv (launch.submit's own command line).
  holder = config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                           lock_config=True, sys_argv=argv)
  absl_flags.DEFINE_string('workdir', None, 'workdir', flag_values=values)
  try:
    extra = values(argv)
  except (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    text = ' '.join(str(e.args[0] if e.args else e).replace('\\n', ' ').split())
    raise SubmitError(f'launch.train would refuse the flags after --: {text}') from None
  if len(extra) > 1:
    raise SubmitError(f'Unexpected arguments after --: {extra[1:]}; pass launch.train flags.')
  if values['workdir'].present:
    raise SubmitError('Do not pass --workdir: launch.submit trains in '
                      'gs://BUCKET/charlstm/<run-id>/workdir (pass --run_id=ID to resume a run).')
  if not values['config'].present:
    raise SubmitError('Pass the launch.train flags after --, with a config, e.g. '
                      '-- --config=configs/shakespeare.py --config.train.num_steps=5000.')
  return config_lib.from_flag(holder)


def _local_corpus_files(corpus):
  """(files, the directory their upload paths are relative to) of a local file, directory or glob.

  Dot-names are skipped, as pipeline.storage skips them when reading a corpus.
  """
  if any(ch in corpus for ch in '*?['):
    files = sorted(f for f in glob.glob(corpus)
                   if os.path.isfile(f) and not os.path.basename(f).startswith('.'))
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if files else ''
  elif os.path.isdir(corpus):
    base = os.path.dirname(os.path.abspath(corpus.rstrip('/')))
    files = []
    for root, dirs, names in os.walk(corpus):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith('.'))
  elif os.path.isfile(corpus):
    files, base = [corpus], os.path.dirname(os.path.abspath(corpus))
  else:
    raise SubmitError(f'data.corpus {corpus!r} does not exist here, so it cannot be staged. '
                      'Pass an existing file, directory or glob, or a gs:// corpus.')
  if not files:
    raise SubmitError(f'data.corpus {corpus!r} holds no files to stage.')
  return [os.path.abspath(f) for f in files], base


def _stage_corpus(config, run_url):
  """Uploads for a local corpus and the corpus URL the VM reads; ([], None) if nothing to stage."""
  corpus = config.data.corpus
  if corpus.startswith('tfds:'):
    if not config.data.tfds_data_dir.startswith('gs://'):
      raise SubmitError(
          f'data.corpus={corpus} needs data.tfds_data_dir on gs:// for a run on a VM: prepare '
          f'it into the bucket with `python -m launch.prepare --dataset={corpus[5:]} '
          '--data_dir=gs://BUCKET/tfds` and pass --config.data.tfds_data_dir=gs://BUCKET/tfds.')
    return [], None
  if corpus.startswith('gs://'):
    return [], None
  files, base = _local_corpus_files(corpus)
  uploads = [(f, f'{run_url}/corpus/' + os.path.relpath(f, base).replace(os.sep, '/'))
             for f in files]
  if os.path.isfile(corpus):
    return uploads, uploads[0][1]
  if os.path.isdir(corpus):
    return uploads, f'{run_url}/corpus/{os.path.basename(os.path.abspath(corpus.rstrip("/")))}'
  return uploads, f'{run_url}/corpus'


def wheel_name(root=None):
  """charlstm-<version>-py3-none-any.whl, from pyproject.toml (what `execute.build_wheel` makes)."""
  root = root or pipeline.ROOT
  with open(os.path.join(root, 'pyproject.toml'), encoding='utf-8') as f:
    text = f.read()
  name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
  version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
  return f'{name.replace("-", "_")}-{version}-py3-none-any.whl'


def _gpu_commands(spec, hosts, gpus, run_url, run_id, wheel, train_args, workdir):
  """gcloud commands for GPU VMs: one install and one train command per host.

  With several hosts each gets TF_CONFIG naming every host by its VM name
  (GCE's internal DNS resolves it inside the VPC) and its own index.
  """
  z = f'--zone={spec.zone}'
  kind, count, attach = gpus

  def ssh(host, command):
    return _gcloud(spec, 'compute', 'ssh', host, z, f'--command={command}')

  workers = [f'{h}:{spec.port}' for h in hosts]
  envs = [remote.tf_config_env(workers, i) if len(hosts) > 1 else [] for i in range(len(hosts))]
  install = remote.install_script(run_url, run_id, wheel, 'gpu')
  return dict(
      create=[_gcloud(spec, 'compute', 'instances', 'create', *hosts, z,
                      f'--machine-type={spec.machine_type}',
                      *([f'--accelerator=type={kind},count={count}'] if attach else []),
                      '--maintenance-policy=TERMINATE', f'--image-family={spec.image_family}',
                      f'--image-project={spec.image_project}',
                      f'--boot-disk-size={spec.boot_disk_size}', f'--scopes={SCOPES}',
                      *(['--provisioning-model=SPOT', '--instance-termination-action=STOP']
                        if spec.spot else []))],
      setup=[ssh(h, install) for h in hosts],
      # launch.doctor as launch.train runs: on every host with its TF_CONFIG, at the same time
      # (a multi_worker strategy needs all its workers up).
      doctor=[ssh(h, remote.doctor_script(run_id, workdir, env)) for h, env in zip(hosts, envs)],
      train=[ssh(h, remote.train_script(run_url, run_id, train_args, env, h))
             for h, env in zip(hosts, envs)],
      follow=ssh(hosts[0], remote.follow_script(run_id)),
      delete=[_gcloud(spec, 'compute', 'instances', 'delete', *hosts, z, '--quiet')],
      # A preempted spot VM is stopped, not gone: start it again before relaunching.
      before_restart=[_gcloud(spec, 'compute', 'instances', 'start', *hosts, z)] if spec.spot
      else [])


def make_plan(spec, train_flags):
  """The whole submission as data (uploads and gcloud argv lists); runs and uploads nothing."""
  _check_spec(spec)
  config = resolve_config(train_flags)
  passed, overridden = _split_train_flags(train_flags)
  run_id = spec.run_id or time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  run_url = f'{spec.bucket.rstrip("/")}/charlstm/{run_id}'
  workdir = f'{run_url}/workdir'
  wheel = wheel_name()
  corpus_uploads, corpus_url = _stage_corpus(config, run_url)

  tpu = spec.target == 'tpu-vm'
  if tpu:
    single = accelerators.tpu_is_single_host(spec.accelerator_type)
    hosts, strategy, allowed = [spec.name], 'tpu', ('tpu', 'auto') if single else ('tpu',)
    where = (f'TPU VM {spec.name} ({spec.accelerator_type}, '
             f'{"one host" if single else "pod slice, driven from worker 0"})')
  else:
    gpus = accelerators.gpus_per_host(spec.machine_type, spec.gpu)
    hosts = ([spec.name] if spec.num_workers == 1 else
             [f'{spec.name}-{i}' for i in range(spec.num_workers)])
    strategy = 'multi_worker' if len(hosts) > 1 else 'mirrored' if gpus[1] > 1 else 'gpu'
    allowed = ('multi_worker',) if len(hosts) > 1 else ('gpu', 'mirrored', 'auto')
    where = (f'{len(hosts)} GPU VM(s) {", ".join(hosts)} ({spec.machine_type}, '
             f'{gpus[1]} x {gpus[0]} each)')
  extra = []
  if 'runtime.strategy' in overridden:
    if config.runtime.strategy not in allowed:
      raise SubmitError(f'--config.runtime.strategy={config.runtime.strategy} cannot run on '
                        f'{where}; use {" or ".join(allowed)}, or leave it out.')
    strategy = config.runtime.strategy
  else:
    config.runtime.strategy = strategy
    extra.append(f'--config.runtime.strategy={strategy}')
  if tpu and not single and 'runtime.tpu' not in overridden:
    config.runtime.tpu = spec.name  # worker 0 reaches the slice's other hosts by the TPU's name
    extra.append(f'--config.runtime.tpu={spec.name}')
  if corpus_url:
    config.data.corpus = corpus_url
    extra.append(f'--config.data.corpus={corpus_url}')
  train_args = ['--config=config.py', *passed, *extra, f'--workdir={workdir}']
  commands = (tpu_lib.commands(spec, single, run_url, run_id, wheel, train_args, workdir,
                               lambda *args: _gcloud(spec, *args), SCOPES, LIBTPU_INDEX) if tpu else
              _gpu_commands(spec, hosts, gpus, run_url, run_id, wheel, train_args, workdir))
  if not spec.create:
    commands['create'] = []
  if not commands['create'] and not commands.get('recreate'):
    commands['versions'] = []  # nothing to create: no runtime version needed
  if not spec.delete_after:
    commands['delete'] = []
  if tpu and spec.spot:
    where += f', spot: queued resource {spec.name}'
  return Plan(spec=spec, run_id=run_id, run_url=run_url, workdir=workdir, hosts=hosts,
              summary=f'charlstm run {run_id} on {where} in {spec.zone}, strategy {strategy}',
              wheel_name=wheel, config=config.to_dict(),
              uploads=[('<wheel>', f'{run_url}/{wheel}'), ('<config.py>', f'{run_url}/config.py'),
                       *corpus_uploads],
              **commands)


def outputs(plan):
  """Comment lines saying where the run's files appear."""
  w = plan.workdir
  return [f'# workdir:     {w}',
          f'# checkpoints: {w}/checkpoints (lowest validation loss: {w}/best)',
          f'# TensorBoard: tensorboard --logdir {w}/tb',
          f'# SavedModel:  {w}/export (when training ends; then: python -m launch.sample '
          f'--saved_model={w}/export --prompt=ROMEO:)',
          f'# log:         {remote.run_dir(plan.run_id)}/train.log on the VM, copied to '
          f'{plan.run_url}/logs/<host>.log when the job ends',
          f'# follow it:   {shlex.join(plan.follow)}']


def _restart_lines(plan):
  """Comment lines describing --restarts: what a relaunch runs, in order."""
  n, resume = plan.spec.restarts, f'the job resumes from {plan.workdir}/checkpoints'
  if not n:
    return []
  if plan.recreate:
    return ([f'# restarts, up to {n} in all: the queued resource found SUSPENDED or FAILED (a '
             'preempted spot TPU cannot be restarted), while waiting or after the job exits 75 '
             'or 255, is deleted and created again, then waited for, installed, checked and '
             f'trained again ({resume}); if it is still ACTIVE, only the train step is relaunched:']
            + [f'#   {shlex.join(c)}' for c in plan.recreate])
  first = ''.join(f'{shlex.join(c)}; ' for c in plan.before_restart)
  return [f'# restarts, up to {n}: after exit 75 or 255, {first}relaunch the train step; {resume}']


def describe(plan):
  """The plan as a shell script: comments, uploads as comments, gcloud commands exactly.

  The steps launch.submit decides at run time (the runtime version picked
  from the zone's list, waiting for a queued resource, restarts) are
  comments beside the commands they run.
  """
  lines = [f'# {plan.summary}',
           f'# 1. stage: build {plan.wheel_name} from this checkout; upload with '
           'google-cloud-storage:']
  lines += [f'#   upload {src} -> {url}' for src, url in plan.uploads]
  number = 1

  def step(title, commands):
    nonlocal number
    if not commands:
      return
    number += 1
    lines.append(f'# {number}. {title}')
    parallel = len(commands) > 1  # one per host: they run at the same time
    lines.extend(shlex.join(c) + (' &' if parallel else '') for c in commands)
    if parallel:
      lines.append('wait')

  step(f'runtime version: list the zone\'s versions; picks {plan.runtime_version} (for '
       f'tensorflow-tpu {accelerators.TPU_TF_VERSION}) if the zone lists it, else stops, naming '
       'the TF versions it offers', [plan.versions] if plan.versions else [])
  step('create', plan.create)
  if plan.wait:
    lines += [f'# wait until the queued resource is {tpu_lib.READY}: its state every '
              f'{tpu_lib.POLL_SECONDS} s, for at most {tpu_lib.WAIT_SECONDS // 60} min; '
              f'{"/".join(tpu_lib.LOST)} with no restarts left stops the run:',
              f'#   {shlex.join(plan.wait)}']
  step('install the wheel on every host', plan.setup)
  step('check with launch.doctor where training runs; a failure stops the run here',
       plan.doctor)
  step('train', plan.train)
  lines += _restart_lines(plan)
  step('delete', plan.delete)
  return '\n'.join(lines + outputs(plan))
