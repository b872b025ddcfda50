"""launch.evaluate: a checkpoint scored with carried state and from zero state."""

import json
import re

import pytest

from tests.conftest import error_lines, run


def _scores(stdout):
  return {m[0]: float(m[1]) for m in re.findall(r'^(carried|zero_state)\s+([\d.]+) nats', stdout,
                                                re.M)}


def test_zero_state_repeats_a_shuffle_runs_own_validation_loss(smoke_run):
  proc = run(['-m', 'launch.evaluate', f'--workdir={smoke_run}'])
  scores = _scores(proc.stdout)
  assert scores.keys() == {'carried', 'zero_state'}, proc.stdout
  history = json.loads((smoke_run / 'history.json').read_text())
  step, val = history['val'][-1]
  assert f'step {step},' in proc.stdout
  # The whole validation split: every character but the first is scored, the last
  # partial batch included (masked), not only whole batches.
  from pipeline import source, workdir  # pylint: disable=g-import-not-at-top
  cfg = workdir.read_config(str(smoke_run))
  n = len(source.open_corpus(cfg.data, workdir.load_vocab(str(smoke_run))).val)
  assert f', {n - 1} validation chars' in proc.stdout
  assert n - 1 > (n - 1) // (cfg.data.eval_batch_size * cfg.data.seq_length) * (
      cfg.data.eval_batch_size * cfg.data.seq_length)  # whole batches alone would drop some
  # The smoke run is shuffle mode: it evaluates every window from zero state.
  assert scores['zero_state'] == pytest.approx(val, abs=1e-4)
  # Carried state gives the model more context than one window: it cannot do worse by much.
  assert scores['carried'] < scores['zero_state'] + 0.05


def test_workdir_without_a_run_is_one_line_error(tmp_path):
  proc = run(['-m', 'launch.evaluate', f'--workdir={tmp_path}'], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'has no config.json' in lines[0], proc.stderr[-2000:]
