"""launch.submit's gcloud commands for a Cloud TPU VM or pod slice, on demand or spot.

On demand, `gcloud compute tpus tpu-vm create` makes the TPU and waits for
it. A spot TPU is made through a queued resource instead
(`queued-resources create NAME --node-id=NAME ... --spot`): its create
returns once the request is accepted, so the TPU is ready only when
`queued-resources describe` says ACTIVE. A preempted spot TPU goes
SUSPENDED (or FAILED) and cannot be started again: the queued resource is
deleted with --force (which deletes its TPU too) and created again, and the
run resumes from the checkpoints in the bucket. pipeline/cloud/execute.py
carries that loop out; this module only builds the argument lists.
"""

from pipeline.cloud import accelerators
from pipeline.cloud import remote

STATE_FORMAT = '--format=value(state.state)'  # queued-resources describe: just the state
VERSIONS_FORMAT = '--format=value(version)'  # tpu-vm versions list: one name a line
READY = 'ACTIVE'
LOST = ('SUSPENDED', 'FAILED')  # a preempted spot TPU; only delete and create bring it back
POLL_SECONDS = 30
WAIT_SECONDS = 3600  # spot capacity can take a while; longer than this is a clear error


def commands(spec, single, run_url, run_id, wheel, train_args, workdir, gcloud, scopes,
             libtpu_index):
  """The argv lists of a TPU run, as a dict of plan.Plan fields.

  `gcloud(*args)` makes a gcloud argv (adding --project). The wheel goes on
  every host (--worker=all). launch.train runs on every host of a
  single-host TPU, but only on worker 0 of a pod slice: TensorFlow's
  TPUStrategy is single-client, so one process drives the whole slice
  through its TPU runtime (TPU_LOAD_LIBRARY=0, runtime.tpu=NAME), and a
  copy per host would each act as the chief. launch.doctor runs where
  launch.train runs, with its environment: on worker 0 of a slice it sees
  the whole slice through that runtime, while on another host it would
  try to own TPUs the runtime already holds.
  """
  z = f'--zone={spec.zone}'
  version = spec.runtime_version or accelerators.default_runtime_version(spec.accelerator_type)

  def ssh(worker, command):
    return gcloud('compute', 'tpus', 'tpu-vm', 'ssh', spec.name, z, f'--worker={worker}',
                  f'--command={command}')

  env = remote.tpu_env(single)
  train_on = 'all' if single else '0'
  if spec.spot:
    qr = ('compute', 'tpus', 'queued-resources')
    create = gcloud(*qr, 'create', spec.name, f'--node-id={spec.name}', z,
                    f'--accelerator-type={spec.accelerator_type}', f'--runtime-version={version}',
                    '--spot', f'--scopes={scopes}')
    # --force: a queued resource with a TPU in it (even a SUSPENDED one) is not deleted without.
    delete = gcloud(*qr, 'delete', spec.name, z, '--force', '--quiet')
    lifecycle = dict(create=[create], delete=[delete], recreate=[delete, create],
                     wait=gcloud(*qr, 'describe', spec.name, z, STATE_FORMAT))
  else:
    lifecycle = dict(
        create=[gcloud('compute', 'tpus', 'tpu-vm', 'create', spec.name, z,
                       f'--accelerator-type={spec.accelerator_type}', f'--version={version}',
                       f'--scopes={scopes}')],
        delete=[gcloud('compute', 'tpus', 'tpu-vm', 'delete', spec.name, z, '--quiet')],
        recreate=[], wait=[])
  return dict(
      runtime_version=version,
      # Without --runtime_version the zone's list decides (execute.py); the planned name is
      # what it picks if listed.
      versions=([] if spec.runtime_version else
                gcloud('compute', 'tpus', 'tpu-vm', 'versions', 'list', z, VERSIONS_FORMAT)),
      setup=[ssh('all', remote.install_script(run_url, run_id, wheel, 'tpu', libtpu_index))],
      doctor=[ssh(train_on, remote.doctor_script(run_id, workdir, env))],
      train=[ssh(train_on, remote.train_script(run_url, run_id, train_args, env, spec.name))],
      follow=ssh('0', remote.follow_script(run_id)),
      before_restart=[], **lifecycle)
