r"""Trains on a Cloud TPU VM or on GPU VMs: stage, create, install, check, train, delete.

  python -m launch.submit --target=tpu-vm --name=my-tpu --zone=us-central2-b \
      --bucket=gs://my-bucket --accelerator_type=v4-8 --create --delete_after \
      -- --config=configs/shakespeare.py --config.runtime.precision=bfloat16
  python -m launch.submit --target=gpu-vm --name=my-gpu --zone=us-central1-a \
      --bucket=gs://my-bucket --machine_type=g2-standard-8 --num_workers=2 --create \
      --dry_run -- --config=configs/shakespeare.py

Everything after `--` goes to launch.train. --dry_run prints every upload and
gcloud command without running anything. The run lives in
gs://BUCKET/charlstm/<run-id>/; --run_id=ID submits again into an existing
run, which resumes it. BUILD.md ("Submit a run") explains each step.
"""

from absl import flags

from pipeline import errors

_TARGET = flags.DEFINE_enum('target', None, ['tpu-vm', 'gpu-vm'], 'Where to train.')
_NAME = flags.DEFINE_string('name', None, 'VM or TPU name (hosts NAME-0.. with --num_workers>1).')
_ZONE = flags.DEFINE_string('zone', None, 'Compute zone, e.g. us-central2-b.')
_BUCKET = flags.DEFINE_string('bucket', None, 'gs://BUCKET for the staged files and the workdir.')
_PROJECT = flags.DEFINE_string('project', '', 'Google Cloud project (default: gcloud\'s).')
_ACCEL = flags.DEFINE_string('accelerator_type', '', 'TPU type, e.g. v4-8, v5litepod-8, v4-32.')
_RUNTIME = flags.DEFINE_string('runtime_version', '', 'TPU software version (default: '
                               'tpu-vm-tf-2.20.0[-pod]-pjrt, for the tensorflow-tpu the install '
                               'puts there, if `tpu-vm versions list` lists it in the zone).')
_MACHINE = flags.DEFINE_string('machine_type', 'g2-standard-8', 'GPU VM machine type.')
_GPU = flags.DEFINE_string('gpu', '', 'TYPE:COUNT per VM for n1 machine types, e.g. '
                           'nvidia-tesla-t4:1 (g2/a2/a3 types come with theirs).')
_IMAGE = flags.DEFINE_string('image_family', 'common-cu129-ubuntu-2204-nvidia-580',
                             'Deep Learning VM image family of the GPU VMs.')
_IMAGE_PROJECT = flags.DEFINE_string('image_project', 'deeplearning-platform-release',
                                     'Project of --image_family.')
_DISK = flags.DEFINE_string('boot_disk_size', '200GB', 'Boot disk of each GPU VM.')
_WORKERS = flags.DEFINE_integer('num_workers', 1, 'GPU VMs; more than 1 trains multi_worker '
                                'with TF_CONFIG.', lower_bound=1)
_PORT = flags.DEFINE_integer('port', 2222, 'Port of each worker in TF_CONFIG.')
_CREATE = flags.DEFINE_bool('create', False, 'Create the VM(s) first.')
_DELETE = flags.DEFINE_bool('delete_after', False, 'Delete the VM(s) when the job has ended.')
_SPOT = flags.DEFINE_bool('spot', False, 'Spot VMs (may be preempted), made with --create; a '
                          'spot TPU is the queued resource NAME.')
_RESTARTS = flags.DEFINE_integer('restarts', 0, 'Relaunch a preempted job (exit 75 or 255) up to '
                                 'this many times; a spot TPU found SUSPENDED/FAILED is deleted '
                                 'and created again first.', lower_bound=0)
_RUN_ID = flags.DEFINE_string('run_id', '', 'Run id (default: the UTC time); reuse one to resume.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the uploads and commands; run nothing.')
flags.mark_flags_as_required(['target', 'name', 'zone', 'bucket'])


def main(argv):
  from pipeline.cloud import execute  # pylint: disable=g-import-not-at-top
  from pipeline.cloud import plan  # pylint: disable=g-import-not-at-top
  spec = plan.Spec(
      target=_TARGET.value, name=_NAME.value, zone=_ZONE.value, bucket=_BUCKET.value,
      project=_PROJECT.value, accelerator_type=_ACCEL.value, runtime_version=_RUNTIME.value,
      machine_type=_MACHINE.value, gpu=_GPU.value, image_family=_IMAGE.value,
      image_project=_IMAGE_PROJECT.value, boot_disk_size=_DISK.value,
      num_workers=_WORKERS.value, port=_PORT.value, create=_CREATE.value,
      delete_after=_DELETE.value, spot=_SPOT.value, restarts=_RESTARTS.value,
      run_id=_RUN_ID.value)
  return execute.submit(spec, argv[1:], dry_run=_DRY_RUN.value)


if __name__ == '__main__':
  errors.run(main)
