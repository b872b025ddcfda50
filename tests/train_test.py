"""Training: the loss falls, resume is exact, Mirrored matches one device, NaN stops cleanly."""

import json
import math
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import train
from tests.conftest import ROOT, run


def smoke(**overrides):
  from configs import shakespeare  # pylint: disable=g-import-not-at-top
  c = shakespeare.get_config('smoke')
  config_lib.override(c, **{'train.export': False, **overrides})
  return c


def checkpoint_values(workdir):
  path = tf.train.latest_checkpoint(str(workdir / 'checkpoints'))
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith('save_counter') and k != '_CHECKPOINTABLE_OBJECT_GRAPH'}


def test_smoke_run_loss_falls_clearly_below_uniform(smoke_run):
  vocab = json.loads((smoke_run / 'vocab.json').read_text())
  history = json.loads((smoke_run / 'history.json').read_text())
  uniform = math.log(vocab['size'])
  first_train, last_train = history['train'][0][1], history['train'][-1][1]
  last_val = history['val'][-1][1]
  assert last_train < first_train
  assert last_val < uniform - 0.75, (last_val, uniform)


def test_smoke_run_writes_every_artifact(smoke_run):
  cfg = json.loads((smoke_run / 'config.json').read_text())
  assert cfg['model']['hidden_size'] == 64  # the resolved smoke config, not the defaults
  assert sorted(p.name for p in (smoke_run / 'checkpoints').glob('ckpt-*.index')) == [
      'ckpt-30.index', 'ckpt-60.index']
  assert list((smoke_run / 'best').glob('ckpt-*.index'))
  for d in ('checkpoints', 'best'):
    assert (smoke_run / d / 'vocab.json').read_text() == (smoke_run / 'vocab.json').read_text()
  assert list((smoke_run / 'tb' / 'train').glob('events.out.tfevents.*'))
  assert list((smoke_run / 'tb' / 'eval').glob('events.out.tfevents.*'))
  assert (smoke_run / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (smoke_run / 'export' / 'saved_model.pb').exists()
  assert (smoke_run / 'export' / 'assets' / 'vocab.json').exists()
  assert not list(smoke_run.glob('*.tmp-*'))


@pytest.mark.parametrize('mode', ['shuffle', 'stream'])
def test_resume_is_bit_exact(tmp_path, mode):
  kw = {'data.mode': mode, 'train.num_steps': 30, 'train.eval_every': 15,
        'train.checkpoint_every': 100}
  full = train.train_and_evaluate(smoke(**kw), str(tmp_path / 'full'))
  half = train.train_and_evaluate(smoke(**kw), str(tmp_path / 'split'), stop_at=13)
  assert half['step'] == 13
  resumed = train.train_and_evaluate(smoke(**kw), str(tmp_path / 'split'))
  assert resumed['step'] == 30
  assert resumed['train_loss'] == full['train_loss']
  assert resumed['val_loss'] == full['val_loss']
  a, b = checkpoint_values(tmp_path / 'full'), checkpoint_values(tmp_path / 'split')
  assert a.keys() == b.keys()
  assert any(k.startswith('model/') for k in a)
  if mode == 'stream':
    assert np.abs(a['h/.ATTRIBUTES/VARIABLE_VALUE']).sum() > 0  # state really carried
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(smoke(**{'train.num_steps': 20, 'train.checkpoint_every': 10}), workdir)
  before = checkpoint_values(tmp_path / 'run')
  bad = smoke(**{'train.num_steps': 40, 'train.checkpoint_every': 10,
                 'train.learning_rate': float('inf')})
  with pytest.raises(train.TrainingError, match=r'Loss became nan.*ckpt-20.*learning_rate'):
    train.train_and_evaluate(bad, workdir)
  assert tf.train.latest_checkpoint(workdir + '/checkpoints').endswith('ckpt-20')
  after = checkpoint_values(tmp_path / 'run')
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)


MIRRORED_SCRIPT = textwrap.dedent('''
    import json, sys
    import tensorflow as tf
    from pipeline import config as config_lib, distribute, train
    from configs import shakespeare
    distribute.configure_devices(2)
    out = {}
    for mode in ('shuffle', 'stream'):
      for name, strategy in (('one', 'cpu'), ('mirrored', 'mirrored')):
        c = shakespeare.get_config('smoke')
        config_lib.override(c, **{
            'data.mode': mode, 'train.num_steps': 6, 'train.steps_per_loop': 1,
            'train.log_every': 1, 'train.export': False,
            'runtime.strategy': strategy, 'runtime.cpu_devices': 2 if strategy == 'mirrored' else 1})
        wd = sys.argv[1] + '/' + mode + name
        r = train.train_and_evaluate(c, wd)
        hist = json.load(open(wd + '/history.json'))
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(wd + '/checkpoints'))
        kernel = reader.get_tensor('model/lstm_0..lstm_cell..kernel/.ATTRIBUTES/VARIABLE_VALUE')
        out[mode + name] = {'replicas': r['replicas'], 'losses': [h[1] for h in hist['train']], 'val': r['val_loss'],
                            'kernel': kernel.ravel().tolist()}
    print('JSON' + json.dumps(out))
''')


def test_mirrored_two_replicas_match_one_device_after_several_adam_steps(tmp_path):
  proc = run(['-c', MIRRORED_SCRIPT, str(tmp_path)], timeout=400)
  out = json.loads(proc.stdout.split('JSON', 1)[1])
  for mode in ('shuffle', 'stream'):
    one, two = out[mode + 'one'], out[mode + 'mirrored']
    assert (one['replicas'], two['replicas']) == (1, 2)
    assert len(one['losses']) == 6
    np.testing.assert_allclose(two['losses'], one['losses'], rtol=0, atol=2e-5)
    np.testing.assert_allclose(two['val'], one['val'], atol=2e-5)
    # Adam slots that were not mirrored drifted ~3e-2 in 4 steps; demand far less.
    np.testing.assert_allclose(two['kernel'], one['kernel'], atol=2e-5)
    assert one['losses'][-1] < one['losses'][0]
