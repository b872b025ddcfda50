r"""Benchmarks against the seed post; prints same-process ratios.

  python -m launch.bench --what=sampling --config=configs/seed_keras.py
  python -m launch.bench --what=training --config=configs/seed_keras.py \
      --config.data.batch_size=64
"""

import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

from pipeline import errors

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/seed_keras.py',
                                          'Config giving the model size and corpus.',
                                          lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'sampling', ['sampling', 'training'], 'Which benchmark.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import benchmark  # pylint: disable=g-import-not-at-top
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_flag(_CONFIG)
  if _WHAT.value == 'sampling':
    result = benchmark.sampling(config)
  else:
    with tempfile.TemporaryDirectory() as workdir:
      result = benchmark.training(config, workdir)
  for key, value in result.items():
    print(f'{key:40s} {value:12.2f}')


if __name__ == '__main__':
  errors.run(main)
