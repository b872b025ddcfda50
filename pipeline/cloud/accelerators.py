"""Cloud TPU and GPU machine shapes launch.submit knows: hosts, runtime versions, GPUs per VM.

Only names are checked here, never quotas: gcloud says whether a type
exists in a zone (`gcloud compute tpus accelerator-types list`,
`gcloud compute accelerator-types list`). Which TPU runtime versions a zone
offers is looked up at submit time (`pick_runtime_version`).
"""

import re

from pipeline import errors

# The tensorflow-tpu the `tpu` extra installs (pyproject.toml: tensorflow-tpu==2.20.*; 2.20.0 is
# the newest with a tensorflow-tpu wheel, while GPU/CPU get TF 2.21). TPU runtime versions are
# named after the TF they are for, so this, not the GPU/CPU TF, picks the runtime.
TPU_TF_VERSION = '2.20.0'
_TF_RUNTIME = re.compile(r'^tpu-vm-tf-(\d+\.\d+\.\d+)')

_TPU_TYPE = re.compile(r'^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$')
GPU_TYPES = ('nvidia-l4', 'nvidia-tesla-t4', 'nvidia-tesla-p4', 'nvidia-tesla-v100',
             'nvidia-tesla-p100', 'nvidia-tesla-a100', 'nvidia-a100-80gb', 'nvidia-h100-80gb',
             'nvidia-h100-mega-80gb', 'nvidia-h200-141gb', 'nvidia-b200')
# Accelerator-optimized machine types come with their GPUs attached and take
# no --accelerator; of the other families only N1 can have GPUs attached.
_G2_L4S = {'g2-standard-4': 1, 'g2-standard-8': 1, 'g2-standard-12': 1, 'g2-standard-16': 1,
           'g2-standard-32': 1, 'g2-standard-24': 2, 'g2-standard-48': 4, 'g2-standard-96': 8}
_BUILTIN_FAMILIES = (('a2-highgpu-', 'nvidia-tesla-a100'), ('a2-megagpu-', 'nvidia-tesla-a100'),
                     ('a2-ultragpu-', 'nvidia-a100-80gb'), ('a3-highgpu-', 'nvidia-h100-80gb'),
                     ('a3-edgegpu-', 'nvidia-h100-80gb'), ('a3-megagpu-', 'nvidia-h100-mega-80gb'),
                     ('a3-ultragpu-', 'nvidia-h200-141gb'), ('a4-highgpu-', 'nvidia-b200'))


class AcceleratorError(errors.Error):
  """An unknown TPU or GPU type, or a machine type that cannot have the GPUs asked for."""


def tpu_is_single_host(accelerator_type):
  """Whether a TPU type is one host: v2-8, v3-8, v4-8, v5p-8, v5litepod-1/4/8, v6e-1/4/8.

  The number is TensorCores (v2-v5p) or chips (v5litepod, v6e); no
  generation puts more than 8 of them on one host.
  """
  m = _TPU_TYPE.match(accelerator_type)
  if not m:
    raise AcceleratorError(
        f'Unknown --accelerator_type {accelerator_type!r}: expected a Cloud TPU type such as '
        'v4-8, v5litepod-8, v5p-8 or v6e-8 (`gcloud compute tpus accelerator-types list '
        '--zone=ZONE` lists those of a zone).')
  return int(m.group(2)) <= 8


def default_runtime_version(accelerator_type):
  """tpu-vm-tf-2.20.0-pjrt, or tpu-vm-tf-2.20.0-pod-pjrt for several hosts.

  Cloud TPU's naming scheme, tpu-vm-tf-X.Y.Z[-pod][-pjrt], for TPU_TF_VERSION
  (Cloud TPU's "TPU software versions" page uses the same names for v5e,
  v5p and v6e). `pick_runtime_version` checks a zone's list for it.
  """
  pod = '' if tpu_is_single_host(accelerator_type) else '-pod'
  return f'tpu-vm-tf-{TPU_TF_VERSION}{pod}-pjrt'


def _version_key(version):
  return tuple(int(p) for p in version.split('.'))


def pick_runtime_version(accelerator_type, listed, zone):
  """The runtime version for TPU_TF_VERSION from a zone's list (`tpu-vm versions list` lines).

  Raises AcceleratorError, one line naming the TF versions the zone has
  runtimes for, if the wanted name is not listed: a runtime for another TF
  would not match the tensorflow-tpu the install puts on the VM.
  """
  wanted = default_runtime_version(accelerator_type)
  names = [line.strip() for line in listed if line.strip()]
  if wanted in names:
    return wanted
  offered = sorted({m.group(1) for m in map(_TF_RUNTIME.match, names) if m}, key=_version_key)
  raise AcceleratorError(
      f'Zone {zone} lists no TPU runtime {wanted} (for tensorflow-tpu {TPU_TF_VERSION}, which the '
      f'install puts on the VM); its TensorFlow runtimes are for TF '
      f'{", ".join(offered) if offered else "no version at all"}. Use a zone that offers it, or '
      'pass --runtime_version=NAME from `gcloud compute tpus tpu-vm versions list '
      f'--zone={zone}` knowingly.')


def gpus_per_host(machine_type, gpu=''):
  """(GPU type, count, attach) of each VM of `machine_type`, with `gpu` as 'TYPE[:COUNT]'.

  `attach` says whether the VM needs --accelerator: False for g2/a2/a3/a4
  types, which come with their GPUs (then `gpu`, if given, must match them).
  """
  builtin = None
  if machine_type in _G2_L4S:
    builtin = ('nvidia-l4', _G2_L4S[machine_type])
  for prefix, kind in _BUILTIN_FAMILIES:
    m = re.match(re.escape(prefix) + r'(\d+)g$', machine_type)
    if m:
      builtin = (kind, int(m.group(1)))
  wanted = None
  if gpu:
    kind, _, count = gpu.partition(':')
    if kind not in GPU_TYPES:
      raise AcceleratorError(f'Unknown GPU type {kind!r} in --gpu={gpu}: use one of '
                             f'{", ".join(GPU_TYPES)}, as TYPE:COUNT (e.g. nvidia-l4:1).')
    if not re.match(r'^[1-9]\d*$', count or '1'):
      raise AcceleratorError(f'--gpu={gpu}: the count after ":" must be a positive integer.')
    wanted = (kind, int(count or 1))
  if builtin:
    if wanted and wanted != builtin:
      raise AcceleratorError(f'--machine_type={machine_type} comes with {builtin[1]} x '
                             f'{builtin[0]}, not --gpu={gpu}; drop --gpu or change both.')
    return builtin[0], builtin[1], False
  if not machine_type.startswith('n1-'):
    raise AcceleratorError(
        f'--machine_type={machine_type} has no GPUs and cannot take any: use a g2/a2/a3 type '
        '(GPUs included, e.g. g2-standard-8 with one L4) or an n1 type with --gpu '
        '(e.g. --machine_type=n1-standard-8 --gpu=nvidia-tesla-t4:1).')
  if not wanted:
    raise AcceleratorError(f'--machine_type={machine_type} needs --gpu=TYPE:COUNT, e.g. '
                           'nvidia-tesla-t4:1.')
  return wanted[0], wanted[1], True
