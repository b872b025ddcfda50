r"""A preflight of a config on this machine, before a long run: python -m launch.doctor.

  python -m launch.doctor --config=configs/shakespeare.py:smoke --workdir=/tmp/d
  python -m launch.doctor --config=configs/shakespeare.py --workdir=gs://b/runs/r1 \
      --config.runtime.strategy=tpu

Lists the devices and the strategy, reads the corpus, runs a few real train
steps, saves and restores a checkpoint in the workdir and exports and samples a
SavedModel on the CPU: one line per check (ok / FAILED and why). Exit status 0
if every check passed, 1 if one failed, 2 (one-line error) for bad input such
as no TPU for --config.runtime.strategy=tpu. Nothing is left in the workdir.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from pipeline import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory training will use '
                               '(local or gs://); the doctor only works in a scratch '
                               'subdirectory it deletes.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  from pipeline.cloud import doctor  # pylint: disable=g-import-not-at-top
  ok = doctor.run(config_lib.from_flag(_CONFIG), _WORKDIR.value)
  return errors.EXIT_OK if ok else errors.EXIT_FAILED


if __name__ == '__main__':
  errors.run(main)
