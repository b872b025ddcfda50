r"""Benchmarks against the seed post; prints same-process ratios.

  python -m launch.bench --what=sampling --config=configs/seed_keras.py
  python -m launch.bench --what=training --config=configs/seed_keras.py \
      --config.data.batch_size=64
  python -m launch.bench --what=memory --config=configs/shakespeare.py  # peak RSS vs corpus size
"""

import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

from pipeline import errors

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/seed_keras.py',
                                          'Config giving the model size and corpus.',
                                          lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'sampling', ['sampling', 'training', 'memory'],
                          'Which benchmark.')
_MEMORY_MB = flags.DEFINE_list('memory_mb', ['1', '10', '100'],
                               '--what=memory: generated corpus sizes in MB.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import benchmark  # pylint: disable=g-import-not-at-top
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_flag(_CONFIG)
  if _WHAT.value == 'memory':
    try:
      sizes = [float(mb) for mb in _MEMORY_MB.value]
    except ValueError:
      raise app.UsageError(f'--memory_mb takes numbers, got {_MEMORY_MB.value}') from None
    _print_memory(benchmark.memory(config, sizes))
    return
  if _WHAT.value == 'sampling':
    result = benchmark.sampling(config)
  else:
    with tempfile.TemporaryDirectory() as workdir:
      result = benchmark.training(config, workdir)
  for key, value in result.items():
    print(f'{key:40s} {value:12.2f}')


def _print_memory(rows):
  """Peak RSS in MB (1e6 bytes), the lowest of the repeats; '+MB' is above the
  fixed run, 'x' that over the corpus bytes, 'spread' the repeats' max - min."""
  print(f'{"run":30s} {"corpus MB":>9s} {"load s":>6s} {"load peak":>9s} {"+MB":>6s} '
        f'{"x":>5s} {"train s":>7s} {"train peak":>10s} {"spread":>6s} {"+MB":>6s} {"x":>5s}')
  for r in rows:
    print(f'{r["run"]:30s} {r["corpus_bytes"] / 1e6:9.1f} {r["load_seconds"]:6.2f} '
          f'{r["load_peak"] / 1e6:9.1f} {r["load_over_fixed"] / 1e6:6.1f} '
          f'{r["load_ratio"]:5.2f} {r["train_seconds"]:7.1f} {r["train_peak"] / 1e6:10.1f} '
          f'{r["train_spread"] / 1e6:6.1f} {r["train_over_fixed"] / 1e6:6.1f} '
          f'{r["train_ratio"]:5.2f}')


if __name__ == '__main__':
  errors.run(main)
