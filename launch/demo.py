r"""README command 1: train a small Shakespeare model, then sample it.

  python3 -m launch.demo [--workdir=DIR] [--resume]

Runs with the bare system python3 of a fresh clone: it creates and fills
./.venv on first use (pipeline/cloud/bootstrap.py), then runs, each in its own
process in the venv,
  python -m launch.train --config=configs/shakespeare.py:demo --workdir=DIR
  python -m launch.sample --saved_model=DIR/export --prompt="ROMEO:" \
      --length=300 --temperature=0.8 --seed=1
Only the standard library is used here, since nothing is installed yet.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

from pipeline import errors
from pipeline.cloud import bootstrap

CONFIG = 'configs/shakespeare.py:demo'
SAMPLE_FLAGS = ['--prompt=ROMEO:', '--length=300', '--temperature=0.8', '--seed=1']
WORKDIR_MARKERS = ('config.json', 'vocab.json', 'checkpoints', 'export')


def parse(argv):
  parser = argparse.ArgumentParser(
      prog='python3 -m launch.demo',
      description='Train a small character-level LSTM on Tiny Shakespeare (about a '
                  'minute on 2 CPU cores once installed), export it, and print a sample.')
  parser.add_argument(
      '--workdir', default=os.path.join(tempfile.gettempdir(), 'charlstm-demo'),
      help='local run directory, wiped first unless --resume (default: %(default)s)')
  parser.add_argument('--resume', action='store_true',
                      help='keep the workdir and continue from its latest checkpoint')
  return parser.parse_args(argv)


def wipe(workdir):
  """Deletes a previous demo run; refuses to delete a directory that is not one."""
  if not os.path.exists(workdir):
    return
  if os.path.isdir(workdir) and os.listdir(workdir) and not any(
      os.path.exists(os.path.join(workdir, m)) for m in WORKDIR_MARKERS):
    errors.fail(f'--workdir {workdir} is not empty and is not a charlstm workdir; '
                'the demo wipes its workdir, so pass a new directory.')
  if os.path.isdir(workdir) and not os.path.islink(workdir):
    shutil.rmtree(workdir)
  else:
    os.remove(workdir)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  t0 = time.perf_counter()
  if not args.resume:
    wipe(workdir)
  bootstrap.ensure()
  # Hides some of TensorFlow's C++ INFO chatter; the pipeline's progress lines stay.
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

  bootstrap.say(f'training ({CONFIG}) in {workdir} ...')
  t1 = time.perf_counter()
  code = bootstrap.run_module('launch.train', [f'--config={CONFIG}', f'--workdir={workdir}'],
                              env=env)
  train_seconds = time.perf_counter() - t1
  if code:
    errors.fail(f'training failed (exit {code}); see above. Fix the cause and re-run '
                f'(add --resume to continue from the last checkpoint).', code)

  export = os.path.join(workdir, 'export')
  bootstrap.say(f'sampling {export} ...')
  code = bootstrap.run_module('launch.sample', [f'--saved_model={export}'] + SAMPLE_FLAGS,
                              env=env)
  if code:
    errors.fail(f'sampling failed (exit {code}); see above.', code)
  tensorboard = os.path.join(os.path.dirname(bootstrap.venv_python()), 'tensorboard')
  bootstrap.say(
      f'done in {time.perf_counter() - t0:.0f}s (training {train_seconds:.0f}s). '
      f'Loss curve: {os.path.join(workdir, "loss.svg")}; '
      f'TensorBoard: {tensorboard} --logdir {os.path.join(workdir, "tb")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
