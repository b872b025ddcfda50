r"""Trains, evaluates, checkpoints and exports a charlstm model.

  python -m launch.train --config=configs/shakespeare.py --workdir=/tmp/run1
  python -m launch.train --config=configs/shakespeare.py:smoke --workdir=/tmp/s \
      --config.model.hidden_size=128

Run the same command again with the same --workdir to resume.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from pipeline import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (local or gs://).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  from pipeline import train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(config_lib.from_flag(_CONFIG), _WORKDIR.value)
  print(f'Done at step {result["step"]}: val loss {result["val_loss"]:.4f} nats/char; '
        f'export: {result["export"]}')


if __name__ == '__main__':
  errors.run(main)
