"""Fine-tuning (train.init_from): Shakespeare's weights start a Quijote run on the merged vocabulary."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import model as model_lib
from pipeline import train
from pipeline import workdir as workdir_lib
from tests.conftest import error_lines, run

QUIJOTE = config_lib.bundled('quijote.txt.gz')
STEPS = 100  # fine-tuning vs from scratch


def smoke(**overrides):
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  c = shakespeare.get_config('smoke')  # 1 x 64 LSTM, T=32, B=16, seed 0
  config_lib.override(c, **{'train.export': False, 'train.steps_per_loop': 50,
                            'train.log_every': 50, 'train.eval_every': 1000,
                            'train.checkpoint_every': 1000, **overrides})
  return c


def quijote(**overrides):
  return smoke(**{'data.corpus': QUIJOTE, 'train.num_steps': STEPS, **overrides})


def weights(workdir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(workdir / 'checkpoints')))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.startswith('model/')}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """150 steps on tinyshakespeare, with an export."""
  workdir = tmp_path_factory.mktemp('pretrained')
  train.train_and_evaluate(smoke(**{'train.num_steps': 150, 'train.export': True}), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def finetuned(pretrained, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('finetuned')
  out = train.train_and_evaluate(quijote(**{'train.init_from': str(pretrained)}), str(workdir))
  return workdir, out


def test_fine_tuning_beats_training_from_scratch(pretrained, finetuned, tmp_path):
  workdir, tuned = finetuned
  scratch = train.train_and_evaluate(quijote(), str(tmp_path))
  assert tuned['step'] == scratch['step'] == STEPS
  assert tuned['val_loss'] < scratch['val_loss'] - 0.1, (tuned, scratch)
  old = json.loads((pretrained / 'vocab.json').read_text())['chars']
  new = json.loads((workdir / 'vocab.json').read_text())['chars']
  own = json.loads((tmp_path / 'vocab.json').read_text())['chars']  # quijote's alone
  assert new == sorted(set(old) | set(own)) and len(new) > len(own)
  assert {'á', 'é', 'ñ', '¿'} <= set(new) - set(old)
  assert json.loads((workdir / 'config.json').read_text())['train']['init_from'] == str(pretrained)
  record = json.loads((workdir / workdir_lib.INIT_FILE).read_text())
  assert record['kind'] == 'workdir' and record['checkpoint'].endswith('checkpoints/ckpt-150')
  assert record['step'] == 150 and record['new_chars'] == ''.join(c for c in new if c not in old)


def test_a_resumed_fine_tuning_run_keeps_its_own_checkpoint(pretrained, finetuned, tmp_path):
  # If init_from were applied again on resume, the weights would jump back to the source's.
  cfg = quijote(**{'train.init_from': str(pretrained), 'train.checkpoint_every': 50})
  half = train.train_and_evaluate(cfg, str(tmp_path), stop_at=50)
  assert half['step'] == 50
  record = (tmp_path / workdir_lib.INIT_FILE).read_text()
  resumed = train.train_and_evaluate(cfg, str(tmp_path))
  workdir, full = finetuned
  assert (resumed['train_loss'], resumed['val_loss']) == (full['train_loss'], full['val_loss'])
  a, b = weights(workdir), weights(tmp_path)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert (tmp_path / workdir_lib.INIT_FILE).read_text() == record


def test_workdir_export_and_checkpoint_sources_map_the_same_weights(pretrained, finetuned):
  old = corpus_lib.Vocab.load(str(pretrained / 'vocab.json'))
  new = corpus_lib.Vocab.load(str(finetuned[0] / 'vocab.json'))
  prefix = tf.train.latest_checkpoint(str(pretrained / 'checkpoints'))
  reader = tf.train.load_checkpoint(prefix)
  trained = {n: reader.get_tensor(f'model/{n.replace("/", "..")}/.ATTRIBUTES/VARIABLE_VALUE')
             for n in ('lstm_0/lstm_cell/kernel', 'lstm_0/lstm_cell/recurrent_kernel',
                       'lstm_0/lstm_cell/bias', 'logits/kernel', 'logits/bias')}

  def fresh():
    keras.utils.set_random_seed(0)
    return model_lib.build(new.size, 64, 1, 32)

  mapped = {}
  for kind, path in (('workdir', pretrained), ('export', pretrained / 'export'),
                     ('checkpoint', prefix), ('checkpoint', pretrained / 'best')):
    source = workdir_lib.open_init(str(path))
    assert source.kind == kind and source.vocab == old
    models = fresh()
    workdir_lib.apply_init(source, models, new)
    mapped[str(path)] = {w.path: w.numpy() for w in models.train.weights}
  first, *rest = mapped.values()
  for other in rest:
    for k in first:
      np.testing.assert_array_equal(first[k], other[k], err_msg=k)
  start = {w.path: w.numpy() for w in fresh().train.weights}
  for i, ch in enumerate(new.chars):
    j = old.chars.index(ch) if ch in old.chars else None
    src = trained if j is not None else start
    j = i if j is None else j
    np.testing.assert_array_equal(first['lstm_0/lstm_cell/kernel'][i],
                                  src['lstm_0/lstm_cell/kernel'][j], err_msg=ch)
    np.testing.assert_array_equal(first['logits/kernel'][:, i], src['logits/kernel'][:, j])
    assert first['logits/bias'][i] == src['logits/bias'][j]
  for k in ('lstm_0/lstm_cell/recurrent_kernel', 'lstm_0/lstm_cell/bias'):
    np.testing.assert_array_equal(first[k], trained[k])


def test_a_source_that_is_no_run_is_a_one_line_error(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello')
  for bad in (tmp_path, tmp_path / 'notes.txt', tmp_path / 'missing'):
    with pytest.raises(workdir_lib.RunError, match='is not a charlstm run, export or checkpoint'):
      train.train_and_evaluate(quijote(**{'train.init_from': str(bad)}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # refused before anything was written
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path / "run"}', f'--config.train.init_from={tmp_path}'],
             check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'is not a charlstm run, export or checkpoint' in lines[0], proc.stderr


def test_a_source_of_another_architecture_is_a_one_line_error_naming_both(pretrained, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r'num_layers=1, hidden_size=64.*'
                     r'num_layers=2, hidden_size=64'):
    train.train_and_evaluate(quijote(**{'train.init_from': str(pretrained / 'export'),
                                        'model.num_layers': 2}), str(tmp_path / 'run'))
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path / "run"}', f'--config.train.init_from={pretrained}',
              '--config.model.hidden_size=32'], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert 'hidden_size=64' in lines[0] and 'hidden_size=32' in lines[0]
  assert not (tmp_path / 'run').exists()
