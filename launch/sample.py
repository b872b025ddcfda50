r"""Generates text from an exported charlstm SavedModel (no training code needed).

  python -m launch.sample --saved_model=/tmp/run1/export --prompt="ROMEO:" \
      --length=400 --temperature=0.8 --seed=1

--prompt repeats; --prompt_file adds one prompt per line. --temperature=0 is
greedy; --top_k and --top_p (nucleus) narrow the choice; --stop (repeatable)
ends a sample before that string. Each sample is printed as prompt + continuation.
"""

import secrets

from absl import app
from absl import flags

from pipeline import errors

_SAVED_MODEL = flags.DEFINE_string('saved_model', None, 'SavedModel directory (local or gs://).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Prompt text; repeat for several.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'File with one prompt per line.')
_LENGTH = flags.DEFINE_integer('length', 400, 'Characters to generate per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest chars; 0 = all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the likeliest chars holding this '
                            'much probability, in (0, 1]; 1 = all.')
_STOP = flags.DEFINE_multi_string('stop', [], 'End a sample before its first occurrence of this '
                                  'string (not printed); repeat for several.')
_SEED = flags.DEFINE_integer('seed', None, 'Sampling seed; random (and printed) if unset.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.')
flags.mark_flag_as_required('saved_model')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import sample  # pylint: disable=g-import-not-at-top
  # Before anything imports TensorFlow: a bad flag fails in a fraction of a second.
  sample.check_request(_LENGTH.value, _NUM_SAMPLES.value, _TOP_P.value, _STOP.value)
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    prompts += sample.read_prompt_file(_PROMPT_FILE.value)
  seed = _SEED.value if _SEED.value is not None else secrets.randbits(31)
  if _SEED.value is None:
    print(f'(seed {seed})')
  results = sample.sample(_SAVED_MODEL.value, prompts, _LENGTH.value, _TEMPERATURE.value,
                          _TOP_K.value, seed, _NUM_SAMPLES.value, top_p=_TOP_P.value,
                          stop=_STOP.value)
  for i, (prompt, text) in enumerate(results):
    if i:
      print('\n' + '-' * 40)
    print(prompt + text, flush=True)


if __name__ == '__main__':
  errors.run(main)
