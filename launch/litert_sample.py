r"""Generates text from a LiteRT export with the LiteRT interpreter (no TensorFlow needed).

  python -m launch.export --workdir=/tmp/run1 --format=litert
  python -m launch.litert_sample --model=/tmp/run1/litert --prompt="ROMEO:" \
      --length=400 --temperature=0.8 --seed=1

The phone-side reference (pipeline/litert/sampler.py): model.tflite and
vocab.json, numpy and ai-edge-litert. --temperature=0 (the default) is greedy
and gives the SavedModel's greedy text; sampled text follows numpy's generator.
Each sample is printed as prompt + continuation; chars/s goes to stderr.
"""

import sys

from absl import app
from absl import flags

from pipeline import errors

_MODEL = flags.DEFINE_string('model', None, 'Directory with model.tflite and vocab.json.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Prompt text; repeat for several.')
_LENGTH = flags.DEFINE_integer('length', 400, 'Characters to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest chars; 0 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of numpy\'s generator (temperature > 0).')
_THREADS = flags.DEFINE_integer('num_threads', None, 'Interpreter threads; default its own.')
flags.mark_flag_as_required('model')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline.litert import sampler  # pylint: disable=g-import-not-at-top
  prompts = list(_PROMPT.value) or ['']
  texts, rate = sampler.sample(_MODEL.value, prompts, _LENGTH.value, _TEMPERATURE.value,
                               _TOP_K.value, _SEED.value, _THREADS.value)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    if i:
      print('\n' + '-' * 40)
    print(prompt + text, flush=True)
  print(f'({_LENGTH.value * len(prompts)} chars, {rate:.0f} chars/s)', file=sys.stderr)


if __name__ == '__main__':
  errors.run(main)
