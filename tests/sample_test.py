"""Sampling: seeded determinism across processes, greedy/top-k, edge cases, bad prompts."""

import textwrap

import pytest
import tensorflow as tf

from pipeline import sample
from tests.conftest import error_lines, run


def sample_cli(export, *flags):
  return run(['-m', 'launch.sample', f'--saved_model={export}', *flags])


def test_fixed_seed_gives_same_text_in_two_processes(smoke_run):
  export = smoke_run / 'export'
  flags = ['--prompt=ROMEO:', '--length=80', '--temperature=1.0', '--num_samples=2']
  a = sample_cli(export, *flags, '--seed=7').stdout
  b = sample_cli(export, *flags, '--seed=7').stdout
  c = sample_cli(export, *flags, '--seed=8').stdout
  assert a == b
  assert a != c
  assert a.startswith('ROMEO:')


def test_sampler_job_does_not_import_model_code(smoke_run):
  script = textwrap.dedent(f'''
      import sys
      from absl import flags
      from launch import sample
      flags.FLAGS(['sample', '--saved_model={smoke_run / "export"}', '--length=5', '--seed=1'])
      sample.main(['sample'])
      print('MODULES', sorted(m for m in sys.modules if m.startswith('pipeline')))
  ''')
  out = run(['-c', script]).stdout
  modules = out.split('MODULES', 1)[1]
  assert 'pipeline.sample' in modules
  for forbidden in ('pipeline.model', 'pipeline.train', 'pipeline.export', 'pipeline.generate'):
    assert forbidden not in modules


def generate(export, prompts, n, temperature, top_k=0, seed=0):
  return [t for _, t in sample.sample(str(export), prompts, n, temperature, top_k, seed)]


def test_top_k_1_equals_greedy(smoke_run):
  export = smoke_run / 'export'
  prompts = ['ROMEO:', 'JULIET', '']
  greedy = generate(export, prompts, 60, temperature=0.0)
  for seed in (1, 2):
    assert generate(export, prompts, 60, temperature=1.0, top_k=1, seed=seed) == greedy
  assert generate(export, prompts, 60, temperature=1.0, seed=1) != greedy


def test_top_k_restricts_choices_to_k_likeliest(smoke_run):
  loaded = tf.saved_model.load(str(smoke_run / 'export'))
  chars = [c.decode() for c in loaded.vocab()['chars'].numpy()]
  step = loaded.step(ids=tf.constant([chars.index('R')]), h=tf.zeros([1, 1, 64]),
                     c=tf.zeros([1, 1, 64]))
  top3 = {chars[i] for i in tf.math.top_k(step['probs'][0], 3).indices.numpy()}
  out = loaded.generate(prompts=tf.constant(['R'] * 40), num_chars=tf.constant(1),
                        temperature=tf.constant(1.5), top_k=tf.constant(3),
                        seed=tf.constant(1, tf.int64))['text'].numpy()
  firsts = {t.decode() for t in out}  # 40 independent rows
  assert firsts <= top3
  assert len(firsts) > 1


def test_zero_chars_and_empty_prompt(smoke_run):
  export = smoke_run / 'export'
  assert generate(export, ['ROMEO:', ''], 0, 0.8, seed=3) == ['', '']
  empty = generate(export, [''], 30, 0.8, seed=3)
  assert len(empty[0]) == 30
  loaded = tf.saved_model.load(str(export))
  serve = loaded.signatures['serving_default']
  out = serve(prompts=tf.constant(['', 'ROMEO:']))['text'].numpy()
  assert [len(t.decode()) for t in out] == [200, 200]
  assert serve(prompts=tf.constant(['', 'ROMEO:']))['text'].numpy().tolist() != out.tolist()


def test_num_samples_batches_distinct_continuations(smoke_run):
  res = sample.sample(str(smoke_run / 'export'), ['A', 'B'], 50, 1.0, 0, 5, num_samples=3)
  assert [p for p, _ in res] == ['A', 'A', 'A', 'B', 'B', 'B']
  assert len({t for _, t in res}) == 6


def test_prompt_outside_vocabulary_is_a_clear_error(smoke_run):
  proc = run(['-m', 'launch.sample', f'--saved_model={smoke_run / "export"}',
              '--prompt=ROMEO: ñ€'], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "'ñ€'" in lines[0] and 'never saw' in lines[0], proc.stderr
  with pytest.raises(sample.SampleError, match='not-a-model'):
    sample.sample('/tmp/not-a-model', ['x'], 1)


def test_in_graph_check_rejects_unknown_characters(smoke_run):
  loaded = tf.saved_model.load(str(smoke_run / 'export'))
  with pytest.raises(tf.errors.InvalidArgumentError, match='outside the model vocabulary'):
    loaded.generate(prompts=tf.constant(['ñ']), num_chars=tf.constant(1),
                    temperature=tf.constant(0.0), top_k=tf.constant(0),
                    seed=tf.constant(0, tf.int64))


def test_prompt_file_gives_one_prompt_per_line_and_bad_files_are_one_line(smoke_run, tmp_path):
  good = tmp_path / 'prompts.txt'
  good.write_bytes(b'ROMEO:\n\n  \nJULIET:\r\nFirst Citizen:')
  assert sample.read_prompt_file(str(good)) == ['ROMEO:', 'JULIET:', 'First Citizen:']
  (tmp_path / 'latin1.txt').write_bytes('café'.encode('latin-1'))
  with pytest.raises(sample.SampleError, match='latin1.txt is not UTF-8'):
    sample.read_prompt_file(str(tmp_path / 'latin1.txt'))
  proc = run(['-m', 'launch.sample', f'--saved_model={smoke_run / "export"}',
              f'--prompt_file={tmp_path / "missing.txt"}'], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'missing.txt' in lines[0] and 'does not exist' in lines[0], proc.stderr
  out = sample_cli(smoke_run / 'export', f'--prompt_file={good}', '--length=5', '--seed=1').stdout
  assert [s.strip('\n')[:6] for s in out.split('-' * 40)] == ['ROMEO:', 'JULIET', 'First ']
