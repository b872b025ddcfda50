r"""Re-exports a SavedModel from a training workdir's checkpoint.

  python -m launch.export --workdir=/tmp/run1 --checkpoint=best
"""

from absl import app
from absl import flags

from pipeline import errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (local or gs://).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', "'best', 'latest' or a checkpoint path.")
_OUT = flags.DEFINE_string('export_dir', None, 'Where to write; default <workdir>/export.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import export  # pylint: disable=g-import-not-at-top
  out, ckpt = export.export_checkpoint(_WORKDIR.value, _CHECKPOINT.value, _OUT.value)
  print(f'Exported {ckpt} to {out}')


if __name__ == '__main__':
  errors.run(main)
