r"""Benchmarks: the speed table (default) or peak memory against corpus size.

  python -m launch.bench                      # training and sampling speed table, H=256 and 512
  python -m launch.bench --hidden=256 --rounds=3 --json=/tmp/bench.json
  python -m launch.bench --what=memory --config=configs/shakespeare.py  # peak RSS vs corpus size
  python -m launch.bench --what=serve         # launch.serve: 1, 8, 32 concurrent clients (H=256)

The speed table measures every case in one process, interleaved round by round
(the machine may be shared: only figures measured together compare); see
pipeline/bench/speed.py for the cases. --what=serve starts launch.serve and
compares the total chars/s of N concurrent clients with one client's
(pipeline/bench/serve.py); it needs the serve extra.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from pipeline import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/shakespeare.py',
    'Config giving the corpus and the train settings of case (a); the flags below '
    'set the model size.', lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'speed', ['speed', 'memory', 'serve'], 'Which benchmark.')
_HIDDEN = flags.DEFINE_list('hidden', ['256', '512'],
                            'LSTM sizes H, one table each (--what=serve: the first).')
_LAYERS = flags.DEFINE_integer('layers', 1, 'LSTM layers (1: the seed post\'s model).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size B of the batched cases.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 100, 'Window length T.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; each figure is over these.')
_SECONDS = flags.DEFINE_float('seconds', 2.0, 'About how long one measurement of one case takes.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
_NUMERICS_STEPS = flags.DEFINE_integer(
    'numerics_steps', 300, 'At the largest --hidden: train float32 and bfloat16 this many '
    'steps on the same batches and compare their losses (0: skip).')
_MEMORY_MB = flags.DEFINE_list('memory_mb', ['1', '10', '100'],
                               '--what=memory: generated corpus sizes in MB.')
_SAVED_MODEL = flags.DEFINE_string(
    'saved_model', None, '--what=serve: serve this export (default: a fresh model of --hidden).')
_CLIENTS = flags.DEFINE_list('clients', ['1', '8', '32'], '--what=serve: concurrent clients.')
_CHARS = flags.DEFINE_integer('chars', 200, '--what=serve: characters per request.')


def _positive(name, value):
  if value < 1:
    raise app.UsageError(f'--{name} must be >= 1, got {value}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WHAT.value == 'memory':
    try:
      sizes = [float(mb) for mb in _MEMORY_MB.value]
    except ValueError:
      raise app.UsageError(f'--memory_mb takes numbers, got {_MEMORY_MB.value}') from None
  else:
    try:
      hidden = [int(h) for h in _HIDDEN.value]
    except ValueError:
      raise app.UsageError(f'--hidden takes whole numbers, got {_HIDDEN.value}') from None
    if not hidden or min(hidden) < 1:
      raise app.UsageError(f'--hidden takes sizes >= 1, got {_HIDDEN.value}')
    for name, flag in (('layers', _LAYERS), ('batch', _BATCH), ('seq_len', _SEQ_LEN),
                       ('rounds', _ROUNDS)):
      _positive(name, flag.value)
    if _NUMERICS_STEPS.value < 0:
      raise app.UsageError(f'--numerics_steps must be >= 0, got {_NUMERICS_STEPS.value}')
    if not _SECONDS.value > 0:
      raise app.UsageError(f'--seconds must be > 0, got {_SECONDS.value}')
  if _WHAT.value == 'serve':
    try:
      clients = [int(n) for n in _CLIENTS.value]
    except ValueError:
      raise app.UsageError(f'--clients takes whole numbers, got {_CLIENTS.value}') from None
    if not clients or min(clients) < 1:
      raise app.UsageError(f'--clients takes counts >= 1, got {_CLIENTS.value}')
    _positive('chars', _CHARS.value)
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_flag(_CONFIG)
  if _WHAT.value == 'serve':
    from pipeline.bench import serve  # pylint: disable=g-import-not-at-top
    serve.run(config, _SAVED_MODEL.value, hidden=hidden[0], layers=_LAYERS.value,
              clients=clients, chars=_CHARS.value, rounds=_ROUNDS.value,
              seconds=_SECONDS.value, json_path=_JSON.value)
    return
  if _WHAT.value == 'memory':
    from pipeline.bench import memory  # pylint: disable=g-import-not-at-top
    memory.run(config, sizes)
    return
  from pipeline.bench import speed  # pylint: disable=g-import-not-at-top
  speed.run(config, hidden, layers=_LAYERS.value, batch=_BATCH.value, seq_len=_SEQ_LEN.value,
            rounds=_ROUNDS.value, seconds=_SECONDS.value, numerics_steps=_NUMERICS_STEPS.value,
            json_path=_JSON.value)
  # Everything is written. Tearing down the cases' tf.data iterators waits for
  # their autotuning threads (seconds to minutes each, measured), so skip it.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


if __name__ == '__main__':
  errors.run(main)
