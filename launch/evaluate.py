r"""Scores a run's checkpoint on its validation split with carried and with zero state.

  python -m launch.evaluate --workdir=/tmp/best
  python -m launch.evaluate --workdir=/tmp/run1 --checkpoint=best
  python -m launch.evaluate --workdir=/tmp/run1 --batch_size=1   # one carried stream
"""

import math

from absl import app
from absl import flags

from pipeline import errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (local or gs://).')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'], 'Which checkpoint.')
_BATCH = flags.DEFINE_integer(
    'batch_size', None, 'Validation streams (carried) and windows per batch; default the '
    "run's data.eval_batch_size. 1: one stream, as launch.score reads the split as one text.")
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import evaluate  # pylint: disable=g-import-not-at-top
  if _BATCH.value is not None and _BATCH.value < 1:
    raise app.UsageError(f'--batch_size must be >= 1, got {_BATCH.value}.')
  r = evaluate.evaluate(_WORKDIR.value, _CHECKPOINT.value, _BATCH.value)
  print(f'step {r["step"]}, {r["chars"]} validation chars')
  for way in evaluate.WAYS:
    print(f'{way:10s} {r[way]:.4f} nats/char  {r[way] / math.log(2):.3f} bits/char')


if __name__ == '__main__':
  errors.run(main)
