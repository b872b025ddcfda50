"""launch.bench (pipeline/bench/): the speed table's structure in a tiny mode (not its
speed), the memory bench's child process, and flag errors."""

import json
import math

from tests.conftest import run

TRAIN = ['a', 'b', 'c', 'd1', 'd2', 'd3', 'a16']
SAMPLE = ['e', 'f', 'g', 'h']


def test_tiny_bench_prints_every_row_and_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  proc = run(['-m', 'launch.bench', '--hidden=8', '--batch=4', '--seq_len=10', '--rounds=1',
              '--seconds=0.01', '--numerics_steps=4', f'--json={out}'], timeout=240)
  table = proc.stdout
  for key in TRAIN + ['input'] + SAMPLE:
    assert f'({key}) ' in table, table
  for header in ('training, chars/s', 'input pipeline, chars/s', 'matmul peak, GFLOP/s',
                 'sampling, chars/s', 'targets', 'MFLOP per trained char'):
    assert header in table, table

  result = json.loads(out.read_text())
  assert result['rounds'] == 1
  (size,) = result['sizes']
  assert (size['hidden'], size['batch'], size['seq_len'], size['layers']) == (8, 4, 10, 1)
  assert size['flops_per_char'] > 0
  rows = {r['key']: r for r in size['rows']}
  assert list(rows) == TRAIN + ['input', 'peak'] + SAMPLE
  for r in rows.values():
    numbers = [r['median'], r['min'], r['max']] + [v for k, v in r.items()
                                                   if k.startswith('vs_')]
    assert all(math.isfinite(x) and x > 0 for x in numbers), r
    assert r['min'] <= r['median'] <= r['max'], r
  for key in TRAIN:
    assert {'vs_a', 'vs_b', 'vs_c', 'gflops', 'fraction_of_peak'} <= set(rows[key]), rows[key]
    assert rows[key]['gflops'] > 0 and rows[key]['fraction_of_peak'] > 0
  assert rows['b']['vs_b'] == 1.0 and rows['e']['vs_e'] == 1.0 and rows['a']['vs_a'] == 1.0
  assert 'vs_a' in rows['input']
  # This CPU has bf16 (the bench says so in the label when it has not).
  assert 'NO bf16' not in rows['a16']['label']
  n = size['numerics']  # at the largest (here the only) size
  assert (n['steps'], n['precision'], n['trained_as']) == (4, 'bfloat16', 'bfloat16')
  assert math.isclose(n['difference'], n['loss'] - n['float32_loss'])
  assert 0 < n['loss'] < 5 and 0 < n['float32_loss'] < 5
  assert 'numerics: 4 steps' in table
  # Sampling and the peak and bf16 speed targets apply at H=256 or 512 only; the
  # other training and input ones at every size; the numerics one where it ran.
  assert [t['target'][:3] for t in result['targets']] == ['(a)', '(a)', 'inp', 'bf1']
  assert all(isinstance(t['met'], bool) for t in result['targets'])


def test_bad_flags_are_usage_errors_before_tensorflow_starts():
  for flag, message in (('--hidden=12,big', "--hidden takes whole numbers, got ['12', 'big']"),
                        ('--rounds=0', '--rounds must be >= 1, got 0'),
                        ('--seconds=-1', '--seconds must be > 0, got -1.0'),
                        ('--numerics_steps=-1', '--numerics_steps must be >= 0, got -1')):
    proc = run(['-m', 'launch.bench', flag], check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == message
    assert 'Traceback' not in proc.stderr and 'tensorflow' not in proc.stderr.lower()


def test_memory_child_loads_through_the_corpus_entry(tmp_path):
  # The child's `python -c` names pipeline.bench.memory; 'load' reads via source.open_corpus.
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  from pipeline.bench import memory  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'corpus.txt')
  memory.write_text_corpus(path, 50_000)
  config = config_lib.finalize(config_lib.base_config())
  out = memory._run_memory_child(config, path, 50_000, 'load')  # pylint: disable=protected-access
  assert out['peak'] >= out['import_peak'] > 0 and out['seconds'] > 0, out
  table = memory.format_table([{'run': 'fixed', 'corpus_bytes': 50_000, **{
      f'{m}_{k}': 1.0 for m in ('load', 'train')
      for k in ('seconds', 'peak', 'spread', 'over_fixed', 'ratio')}}])
  assert table.splitlines()[0].split()[:3] == ['run', 'corpus', 'MB'] and 'fixed' in table
