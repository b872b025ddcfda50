"""launch.bench (pipeline/bench/): the speed table's structure in a tiny mode (not its
speed), the memory bench's child process, and flag errors."""

import json
import math
import types

import pytest
import tensorflow as tf

from configs import shakespeare as configs_lib
from pipeline import config as config_lib

from pipeline import distribute
from pipeline.bench import cases
from pipeline.bench import speed
from tests.conftest import run

TRAIN = ['a', 'b', 'c', 'd1', 'd2', 'd3', 'd4', 'a16', 'm']
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
  # a16 falls back to float32, and says so, exactly where the CPU has no bf16; the
  # numerics check keeps bfloat16 either way (under XLA where the CPU has none).
  has_bf16 = distribute.cpu_bf16_flags() != []
  assert ('NO bf16' in rows['a16']['label']) == (not has_bf16), rows['a16']
  assert rows['a16']['trained_as'] == ('bfloat16' if has_bf16 else 'float32')
  n = size['numerics']  # at the largest (here the only) size
  assert (n['steps'], n['precision']) == (4, 'bfloat16')
  assert n['trained_as'] == 'bfloat16' + ('' if has_bf16 else ' under XLA (no bf16 on this CPU)')
  assert math.isclose(n['difference'], n['loss'] - n['float32_loss'])
  assert 0 < n['loss'] < 5 and 0 < n['float32_loss'] < 5
  assert 'numerics: 4 steps' in table
  # Sampling and the peak and bf16 speed targets apply at H=256 or 512 only; the
  # other training and input ones at every size; the numerics one where it ran.
  assert [t['target'][:3] for t in result['targets']] == ['(a)', '(a)', 'inp', 'bf1']
  assert all(isinstance(t['met'], bool) for t in result['targets'])


def _matmul_flops(graph, trips, loop_trips):
  """2mkn over the MatMuls in graph, counting a while loop's body loop_trips times."""
  total = 0
  for op in graph.get_operations():
    if op.type == 'MatMul':
      (rows_a, cols_a), (rows_b, cols_b) = op.inputs[0].shape, op.inputs[1].shape
      m, k = (cols_a, rows_a) if op.get_attr('transpose_a') else (rows_a, cols_a)
      n = rows_b if op.get_attr('transpose_b') else cols_b
      total += trips * 2 * m * k * n
    elif op.type in ('While', 'StatelessWhile'):
      total += _matmul_flops(op._body_graph, trips * loop_trips, loop_trips)  # pylint: disable=protected-access
  return total


@pytest.mark.parametrize('layers,chains,jit', [(1, 2, False), (2, 4, True)])
def test_matmul_ceiling_does_exactly_the_matmuls_flops_per_char_counts(layers, chains, jit):
  # Case m's share of the peak is the ceiling printed beside (a)'s: it must do the
  # train step's matmuls, no fewer (a ceiling too high) and no more (too low).
  config = config_lib.override(configs_lib.get_config('smoke'), **{
      'model.hidden_size': 32, 'model.num_layers': layers, 'data.batch_size': 8,
      'data.seq_length': 6, 'train.lstm_chains': chains})
  corpus = types.SimpleNamespace(vocab=types.SimpleNamespace(size=11), train='x' * 1000)
  s = cases.Setup(config, corpus, tf.distribute.get_strategy())
  case = cases.matmul_case(s, jit=jit)
  graph = case.step.get_concrete_function().graph
  per_step = cases.flops_per_char(11, 32, layers) * 8 * 6
  assert _matmul_flops(graph, 1, 6) == per_step
  assert case.run(1) > 0 and case.chars_per_unit == 8 * 6
  assert ('XLA' in case.label) == jit  # compiled as (a) is where (a)'s loop runs in XLA


def _size(hidden, a16_vs_a, trained_as, numerics=None):
  rows = [{'key': k, 'vs_a': 1.0, 'vs_b': 2.0, 'vs_c': 20.0, 'vs_e': 1e5,
           'fraction_of_peak': 0.9, 'trained_as': 'float32'}
          for k in ('a', 'input', 'g', 'h')]
  rows.append({'key': 'm', 'fraction_of_peak': 0.7})  # the matmuls-alone ceiling
  rows.append({'key': 'a16', 'vs_a': a16_vs_a, 'trained_as': trained_as})
  size = {'hidden': hidden, 'rows': rows}
  if numerics:
    size['numerics'] = numerics
  return size


def test_bf16_targets_are_not_applicable_where_bf16_did_not_run():
  numerics = {'steps': 300, 'difference': 0.0, 'trained_as': 'float32'}
  targets = {t['target']: t for t in speed.evaluate_targets(
      [_size(512, 1.0, 'float32', numerics)])}
  bf16 = targets['(a16) bf16 >= 1.4 x (a) float32']
  assert bf16['met'] is None and 'no AVX512-BF16/AMX' in bf16['why']
  assert targets['bf16 loss @300 steps within 0.02']['met'] is None
  assert targets['(a) >= 0.75 x matmul peak']['met'] is True  # the others still count
  assert targets['(a) >= 0.75 x matmul peak']['ceiling'] == 0.7  # case m's, beside it
  # Where bfloat16 did run, the same ratios are judged.
  numerics['trained_as'] = 'bfloat16'
  targets = {t['target']: t for t in speed.evaluate_targets(
      [_size(512, 1.0, 'bfloat16', numerics)])}
  assert targets['(a16) bf16 >= 1.4 x (a) float32']['met'] is False
  assert targets['bf16 loss @300 steps within 0.02']['met'] is True


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
