"""Tests of pipeline/config.py, the configs in configs/, and launch.train's bad-input errors."""

import ast
import importlib.util
import io
import json
import pathlib
import subprocess
import sys
import tokenize

import pytest

from pipeline import config as config_lib
from pipeline import errors
from pipeline import storage

ROOT = pathlib.Path(__file__).resolve().parent.parent

CONFIGS = [('shakespeare.py', ''), ('shakespeare.py', 'smoke'), ('shakespeare.py', 'demo'),
           ('quijote.py', None), ('seed_keras.py', None), ('shakespeare_best.py', None)]


def _load_module(filename):
  path = ROOT / 'configs' / filename
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_file_is_covered():
  files = sorted(p.name for p in (ROOT / 'configs').glob('*.py') if p.name != '__init__.py')
  assert files == sorted({f for f, _ in CONFIGS})


@pytest.mark.parametrize('filename, preset', CONFIGS)
def test_config_loads_finalizes_and_documents_its_command(filename, preset):
  module = _load_module(filename)
  assert module.__doc__ and 'python -m launch.train' in module.__doc__
  config = module.get_config() if preset is None else module.get_config(preset)
  config = config_lib.finalize(config)
  assert config.is_locked
  # Only keys of the schema, nothing added.
  assert set(config_lib.to_json(config)) == set(config_lib.to_json(config_lib.base_config()))
  assert storage.expand(config.data.corpus)  # the bundled corpus is there


def test_unknown_preset_is_rejected():
  with pytest.raises(ValueError, match='smok'):
    _load_module('shakespeare.py').get_config('smok')


def _leaf_keys(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaf_keys(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def _dotted(node):
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  assert isinstance(node, ast.Name)
  return node.id, '.'.join(reversed(parts))


def test_every_base_config_key_has_a_trailing_comment():
  source = pathlib.Path(config_lib.__file__).read_text()
  commented_lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                     if tok.type == tokenize.COMMENT}
  fn = next(n for n in ast.parse(source).body
            if isinstance(n, ast.FunctionDef) and n.name == 'base_config')
  documented, undocumented = set(), set()
  for node in ast.walk(fn):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      name, key = _dotted(node.targets[0])
      assert name == 'c'
      (documented if node.end_lineno in commented_lines else undocumented).add(key)
  leaves = set(_leaf_keys(config_lib.base_config().to_dict()))
  assert leaves <= documented | undocumented  # every key is assigned in base_config
  assert not leaves & undocumented, f'keys without a comment: {sorted(leaves & undocumented)}'


@pytest.mark.parametrize('key', ['model.hiden_size', 'seedx', 'modle.hidden_size'])
def test_override_unknown_key_raises_config_error(key):
  config = config_lib.finalize(config_lib.base_config())
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.override(config, **{key: 3})
  assert key in str(e.value)


def test_override_sets_known_key():
  config = config_lib.override(config_lib.finalize(config_lib.base_config()),
                               **{'model.hidden_size': 8, 'seed': 3})
  assert config.model.hidden_size == 8 and config.seed == 3


def test_locked_config_rejects_unknown_attribute():
  config = config_lib.finalize(config_lib.base_config())
  with pytest.raises(AttributeError):
    config.model.hiden_size = 3
  assert 'hiden_size' not in config.model


@pytest.mark.parametrize('key, value', [('data.mode', 'random'), ('data.seq_length', 0),
                                        ('data.val_fraction', 0.0), ('train.log_every', 0),
                                        ('runtime.strategy', 'ipu'), ('train.weight_decay', -0.1),
                                        ('train.lstm_chains', -1), ('train.cell_kernels', 'c')])
def test_finalize_rejects_invalid_values(key, value):
  config = config_lib.override(config_lib.base_config(), **{key: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.finalize(config)
  assert key in str(e.value)


def test_from_dict_round_trips_to_json():
  config = _load_module('shakespeare.py').get_config('smoke')
  config = config_lib.finalize(config)
  saved = json.loads(json.dumps(config_lib.to_json(config)))
  restored = config_lib.from_dict(saved)
  assert restored.is_locked
  assert config_lib.to_json(restored) == config_lib.to_json(config)
  assert restored.model.hidden_size == 64  # the smoke value, not the default 256


def test_from_dict_fills_missing_keys_with_defaults():
  restored = config_lib.from_dict({'model': {'hidden_size': 8}})
  assert restored.model.hidden_size == 8
  assert restored.model.num_layers == config_lib.base_config().model.num_layers
  assert config_lib.to_json(restored)['runtime'] == config_lib.base_config().to_dict()['runtime']


def test_from_dict_unknown_key_names_dotted_key():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.from_dict({'model': {'hiden_size': 8}})
  assert 'model.hiden_size' in str(e.value)


# launch.train: bad flags and inputs fail with one line and no traceback.

def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith(('charlstm: error', 'FATAL', 'Traceback'))]


@pytest.mark.parametrize('flags, expected', [
    (['--config.model.hiden_size=3'], ['hidden_size']),
    (['--config.data.corpus={tmp}/nope.txt'], ['{tmp}/nope.txt', 'does not exist']),
    (['--config.runtime.strategy=mirrored', '--config.runtime.cpu_devices=3'],
     ['data.batch_size=16', 'does not divide across 3 replicas']),
    (['--config.train.lstm_chains=3'], ['train.lstm_chains=3', 'does not divide the 16 rows']),
], ids=['misspelt-key', 'missing-corpus', 'batch-vs-replicas', 'chains-vs-batch'])
def test_launcher_bad_input_fails_with_one_line(tmp_path, flags, expected):
  workdir = tmp_path / 'work'
  args = [sys.executable, '-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
          f'--workdir={workdir}'] + [f.format(tmp=tmp_path) for f in flags]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == errors.EXIT_USAGE, proc.stderr
  assert 'Traceback' not in proc.stderr
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('charlstm: error: ')
  for text in expected:
    assert text.format(tmp=tmp_path) in lines[0]
  assert not list(workdir.glob('checkpoints/ckpt-*'))
