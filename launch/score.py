r"""Scores texts under an exported charlstm SavedModel: bits/char and perplexity.

  python -m launch.score --saved_model=/tmp/run1/export --text_file=new.txt
  python -m launch.score --saved_model=/tmp/run1/export --text_file=a.txt \
      --text_file=b.txt --text="To be, or not to be" --per_line --json=/tmp/scores.json

Each text is read from zero state with (h, c) carried through it. Characters
outside the model's vocabulary are counted and skipped (--strict: an error).
Needs only TensorFlow and the export, not the training code.
"""

from absl import app
from absl import flags

from pipeline import errors

_SAVED_MODEL = flags.DEFINE_string('saved_model', None, 'SavedModel directory (local or gs://).')
_TEXT_FILE = flags.DEFINE_multi_string(
    'text_file', [], 'A UTF-8 text file (or directory or glob, read as one text as a corpus '
    'is); repeat for several.')
_TEXT = flags.DEFINE_multi_string('text', [], 'A text given on the command line; repeatable.')
_PER_LINE = flags.DEFINE_bool('per_line', False, 'Also report each line (state still carried).')
_STRICT = flags.DEFINE_bool('strict', False, 'Characters outside the vocabulary are an error.')
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
flags.mark_flag_as_required('saved_model')


def _line(name, r):
  oov = f', {r["oov"]} skipped outside the vocabulary {r["oov_chars"]!r}' if r['oov'] else ''
  if not r['chars_scored']:
    return f'{name}: 0 chars scored{oov}'
  return (f'{name}: {r["bits_per_char"]:.4f} bits/char  perplexity {r["perplexity"]:.3f}  '
          f'{r["nats_per_char"]:.4f} nats/char  ({r["chars_scored"]} chars scored{oov})')


def _short(text, n=40):
  text = text.replace('\n', ' ')
  return text if len(text) <= n else text[:n - 3] + '...'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import evaluate  # pylint: disable=g-import-not-at-top
  from pipeline import storage  # pylint: disable=g-import-not-at-top
  texts = evaluate.read_texts(_TEXT_FILE.value, _TEXT.value)
  result = evaluate.score(_SAVED_MODEL.value, texts, strict=_STRICT.value,
                          per_line=_PER_LINE.value)
  for t, r in zip(texts, result['texts']):
    print(_line(t.name, r))
    lines = t.text.split('\n')
    for lr in r.get('lines', ()):
      i = lr['line']
      print('  ' + _line(f'line {i} {_short(lines[i - 1])!r}', {'oov': 0, **lr}))
  if len(texts) > 1:
    print(_line('overall', result['overall']))
  if _JSON.value:
    storage.write_json(_JSON.value, result)
    print(f'Wrote {_JSON.value}')


if __name__ == '__main__':
  errors.run(main)
