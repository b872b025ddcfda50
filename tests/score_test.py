"""launch.score: bits/char and perplexity of texts under an export, with state carried."""

import json
import textwrap

import numpy as np
import pytest

from pipeline import evaluate
from pipeline import source
from pipeline import workdir as workdir_lib
from tests.conftest import error_lines, run


def score_cli(export, *flags, check=True):
  return run(['-m', 'launch.score', f'--saved_model={export}', *flags], check=check)


def test_validation_split_as_one_text_equals_evaluate_carried_with_one_stream(smoke_run, tmp_path):
  cfg, vocab = workdir_lib.read_config(smoke_run), workdir_lib.load_vocab(smoke_run)
  val = vocab.decode(source.open_corpus(cfg.data, vocab).val)  # the split training saw
  # evaluate(batch_size=1) 'carried' is one stream over the split from zero state: it
  # scores every character but the first, as scoring the split's text does.
  path = tmp_path / 'val.txt'
  path.write_text(val, encoding='utf-8')
  out = tmp_path / 'scores.json'
  proc = score_cli(smoke_run / 'export', f'--text_file={path}', f'--json={out}')
  scored = json.loads(out.read_text())['overall']
  want = evaluate.evaluate(str(smoke_run), batch_size=1)
  assert want['chars'] == len(val) - 1 == scored['chars_scored']
  assert scored['nats_per_char'] == pytest.approx(want['carried'], abs=1e-3)
  assert abs(scored['nats_per_char'] - want['carried']) < 1e-5  # it is float32 round-off
  assert scored['bits_per_char'] == pytest.approx(want['carried'] / np.log(2))
  assert scored['perplexity'] == pytest.approx(np.exp(want['carried']))
  assert f'{scored["bits_per_char"]:.4f} bits/char' in proc.stdout


def test_a_batch_of_texts_scores_as_each_text_alone(smoke_run):
  export = str(smoke_run / 'export')
  texts = [evaluate.Text(f't{i}', s) for i, s in enumerate(
      ['First Citizen:\nBefore we proceed any further, hear me speak.\n', 'ROMEO:', 'ab', 'x',
       'KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer'])]
  together = evaluate.score(export, texts, per_line=True, batch_size=3)
  for t, r in zip(texts, together['texts']):
    alone = evaluate.score(export, [t])['texts'][0] if len(t.text) > 1 else None
    assert r['chars_scored'] == len(t.text) - 1
    if alone:
      assert r['nats_per_char'] == pytest.approx(alone['nats_per_char'], abs=1e-6)
      lines = r['lines']
      assert len(lines) == len(t.text.rstrip('\n').split('\n'))
      assert sum(l['chars_scored'] for l in lines) == r['chars_scored']
      total = sum(l['nats_per_char'] * l['chars_scored'] for l in lines if l['chars_scored'])
      assert total == pytest.approx(r['nats_per_char'] * r['chars_scored'], rel=1e-6)
  everything = sum(r['chars_scored'] for r in together['texts'])
  assert together['overall']['chars_scored'] == everything


def test_characters_outside_the_vocabulary_are_counted_and_skipped(smoke_run):
  export = str(smoke_run / 'export')
  with_oov = evaluate.score(export, [evaluate.Text('a', '¿Qué tal, ROMEO?\nñ')])['texts'][0]
  without = evaluate.score(export, [evaluate.Text('b', 'Qu tal, ROMEO?\n')])['texts'][0]
  assert (with_oov['oov'], with_oov['oov_chars']) == (3, '¿éñ')
  assert with_oov['chars'] == len('¿Qué tal, ROMEO?\nñ')
  # Skipped: the state is not advanced by them and they are not scored.
  assert with_oov['chars_scored'] == without['chars_scored']
  assert with_oov['nats_per_char'] == pytest.approx(without['nats_per_char'], abs=1e-6)
  with pytest.raises(evaluate.ScoreError, match=r"3 character\(s\) outside.*'¿éñ'"):
    evaluate.score(export, [evaluate.Text('a', '¿Qué tal, ROMEO?\nñ')], strict=True)


def test_strict_is_a_one_line_error_naming_the_characters(smoke_run, tmp_path):
  path = tmp_path / 'es.txt'
  path.write_text('¿Qué tal?\n', encoding='utf-8')
  proc = score_cli(smoke_run / 'export', f'--text_file={path}', '--strict', check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "'¿é'" in lines[0] and str(path) in lines[0], proc.stderr[-2000:]


def test_missing_empty_and_binary_files_are_one_line_errors(smoke_run, tmp_path):
  (tmp_path / 'empty.txt').write_bytes(b'')
  (tmp_path / 'blob.bin').write_bytes(bytes(range(256)) * 4)
  (tmp_path / 'latin1.txt').write_bytes('año'.encode('latin-1'))
  cases = {'missing.txt': 'does not exist', 'empty.txt': 'is empty',
           'blob.bin': 'looks like a binary file', 'latin1.txt': 'is not UTF-8'}
  for name, words in cases.items():
    with pytest.raises(evaluate.ScoreError, match=words) as e:
      evaluate.read_texts([str(tmp_path / name)])
    assert '--config' not in str(e.value)  # the fix is told in launch.score's terms
  proc = score_cli(smoke_run / 'export', f'--text_file={tmp_path / "missing.txt"}', check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'missing.txt' in lines[0] and 'does not exist' in lines[0]


def test_score_job_needs_only_the_export(smoke_run, tmp_path):
  (tmp_path / 'a.txt').write_text('ROMEO:\nWhat say you?\n', encoding='utf-8')
  script = textwrap.dedent(f'''
      import sys
      from absl import flags
      from launch import score
      flags.FLAGS(['score', '--saved_model={smoke_run / "export"}', '--per_line',
                   '--text_file={tmp_path / "a.txt"}', '--text=JULIET:'])
      score.main(['score'])
      print('MODULES', sorted(m for m in sys.modules if m.startswith('pipeline')))
  ''')
  out = run(['-c', script]).stdout
  body, modules = out.split('MODULES', 1)
  assert 'pipeline.evaluate' in modules
  for forbidden in ('pipeline.model', 'pipeline.train', 'pipeline.export', 'pipeline.generate',
                    'pipeline.data', 'pipeline.workdir', 'pipeline.source'):
    assert forbidden not in modules
  assert "line 2 'What say you?'" in body and 'overall:' in body and '--text 1:' in body
