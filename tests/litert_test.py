"""LiteRT: model.tflite is builtin-only, and its reference sampler decodes as the SavedModel does."""

import json
import os
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from pipeline import corpus
from pipeline import export as export_lib
from pipeline import model as model_lib
from pipeline.litert import convert
from pipeline.litert import sampler
from tests.conftest import ROOT, error_lines, run

PROMPTS = ['ROMEO:', '', 'First Citizen:\nWe', 'K']
N = 200


def saved_model_greedy(export_dir, prompts, n):
  m = tf.saved_model.load(str(export_dir))
  out = m.generate(prompts=tf.constant(prompts), num_chars=tf.constant(n),
                   temperature=tf.constant(0.0), top_k=tf.constant(0),
                   seed=tf.constant(0, tf.int64))['text'].numpy()
  return [t.decode() for t in out]


def interpreter_op_names(path):
  """The op names the LiteRT interpreter itself reports for the model's graph."""
  it = sampler.interpreter_class()(model_path=str(path))
  it.allocate_tensors()
  return sorted({op['op_name'] for op in it._get_ops_details()})  # pylint: disable=protected-access


def assert_builtin_only(path):
  data = open(path, 'rb').read()
  codes = convert.op_names(data)
  assert codes and not [c for c in codes if c.startswith('CUSTOM') or 'Flex' in c], codes
  assert {'FULLY_CONNECTED', 'LOGISTIC', 'TANH', 'GATHER'} <= set(codes), codes
  ops = interpreter_op_names(path)
  assert not [o for o in ops if 'CUSTOM' in o.upper() or 'FLEX' in o.upper()], ops
  assert 'WHILE' not in ops, ops


# A fresh process: the reference sampler as a phone-side script runs it, and
# which modules it imported (no TensorFlow, no training code).
FRESH = textwrap.dedent('''
    import json, sys
    from pipeline.litert import sampler
    model, chars = sampler.load(sys.argv[1])
    texts = sampler.generate(model, chars, json.loads(sys.argv[2]), int(sys.argv[3]))
    print('JSON' + json.dumps({'texts': texts, 'tensorflow': 'tensorflow' in sys.modules,
                               'modules': sorted(k for k in sys.modules
                                                 if k.split('.')[0] == 'pipeline')}))
''')


def test_export_cli_writes_builtin_model_whose_greedy_text_equals_saved_model(smoke_run, tmp_path):
  out = tmp_path / 'litert'
  proc = run(['-m', 'launch.export', f'--workdir={smoke_run}', '--format=litert',
              f'--export_dir={out}'])
  assert 'checkpoints/ckpt-' in proc.stdout and 'model.tflite' in proc.stdout
  assert sorted(os.listdir(out)) == ['model.tflite', 'vocab.json']
  assert json.loads((out / 'vocab.json').read_text()) == json.loads(
      (smoke_run / 'vocab.json').read_text())
  assert_builtin_only(out / 'model.tflite')

  proc = run(['-c', FRESH, str(out), json.dumps(PROMPTS), str(N)], cwd='/')
  res = json.loads(proc.stdout.split('JSON', 1)[1])
  assert res['tensorflow'] is False
  assert res['modules'] == ['pipeline', 'pipeline.errors', 'pipeline.litert',
                            'pipeline.litert.sampler']
  want = saved_model_greedy(smoke_run / 'export', PROMPTS, N)
  assert res['texts'] == want
  assert [len(t) for t in want] == [N] * len(PROMPTS) and len(set(want)) > 1
  vocab = corpus.Vocab.load(str(smoke_run / 'vocab.json'))
  assert want[1][0] == vocab.chars[0]  # empty prompt: uniform first logits, greedy picks id 0

  # The logits along a prompt match the SavedModel's `step` signature.
  m = tf.saved_model.load(str(smoke_run / 'export'))
  model, chars = sampler.load(str(out))
  h, c = model.zero_state()
  th, tc = tf.constant(h), tf.constant(c)
  for i in sampler.prompt_ids(['First Citizen:'], chars)[0]:
    logits, h, c = model.step([i], h, c)
    r = m.step(ids=tf.constant([i]), h=th, c=tc)
    th, tc = r['h'], r['c']
    np.testing.assert_allclose(logits, r['logits'].numpy(), atol=1e-4)
    np.testing.assert_allclose(h, th.numpy(), atol=1e-5)

  # The launcher prints prompt + continuation, the same text.
  cli = run(['-m', 'launch.litert_sample', f'--model={out}', '--prompt=ROMEO:',
             f'--length={N}'])
  assert cli.stdout == 'ROMEO:' + want[0] + '\n'
  assert 'chars/s' in cli.stderr


def test_multilayer_batched_model_from_export_dir_matches_saved_model(tmp_path):
  """3 layers, a fixed batch of 2 (prompts of different lengths in lockstep), from an export."""
  vocab = corpus.Vocab(tuple(sorted(set('abcdefgh ijklmnop\nqrstuvwxyz.,'))))
  models = model_lib.build(vocab.size, 24, 3, 8)
  rng = np.random.default_rng(1)
  for w in models.train.weights:  # larger weights than Keras's init: livelier, varied text
    w.assign(rng.normal(0, 0.6, w.shape).astype(np.float32))
  export_dir = str(tmp_path / 'export')
  export_lib.export_models(models, vocab, export_dir)
  out, source, size = convert.export_litert(export_dir, batch=2)
  assert out == export_dir + '-litert' and source == f'export {export_dir}'
  assert size == os.path.getsize(os.path.join(out, 'model.tflite'))
  assert_builtin_only(os.path.join(out, 'model.tflite'))
  model, chars = sampler.load(out)
  assert (model.batch, model.num_layers, model.hidden, model.vocab_size) == (2, 3, 24, vocab.size)
  prompts = ['abc', '', 'hello world.\nthe', 'q', 'xyz']  # an odd count: a padded last group
  got = sampler.generate(model, chars, prompts, 100)
  want = saved_model_greedy(export_dir, prompts, 100)
  assert got == want and len(set(want)) > 2


def test_sampling_conventions(smoke_run, tmp_path):
  out, _, _ = convert.export_litert(str(smoke_run), 'best', str(tmp_path / 'l'))
  model, chars = sampler.load(out)
  greedy = sampler.generate(model, chars, ['ROMEO:'], 60)
  assert sampler.generate(model, chars, ['ROMEO:'], 60, temperature=1.0, top_k=1,
                          seed=5) == greedy
  a = sampler.generate(model, chars, ['ROMEO:'], 60, temperature=1.0, seed=1)
  assert a == sampler.generate(model, chars, ['ROMEO:'], 60, temperature=1.0, seed=1)
  assert a != sampler.generate(model, chars, ['ROMEO:'], 60, temperature=1.0, seed=2)
  assert a != greedy
  # Ties go to the lower id: greedy, and the top-k cut.
  logits = np.array([1.0, 3.0, 3.0, 0.0, 3.0], np.float32)
  r = np.random.default_rng(0)
  assert sampler.choose(logits, 0.0, 0, r) == 1
  assert {sampler.choose(logits, 1.0, 1, r) for _ in range(50)} == {1}
  assert {sampler.choose(logits, 1.0, 2, r) for _ in range(200)} == {1, 2}
  assert {sampler.choose(logits, 5.0, 0, r) for _ in range(500)} == {0, 1, 2, 3, 4}
  with pytest.raises(sampler.LiteRTError, match='never saw'):
    sampler.generate(model, chars, ['ROMEO€'], 5)


def test_converter_and_op_check_refuse_flex_ops():
  m = tf.Module()
  m.step = tf.function(tf.linalg.det, input_signature=[tf.TensorSpec([3, 3], tf.float32)])
  with pytest.raises(Exception, match='MatrixDeterminant'):
    convert.to_tflite(m)  # builtins only: the conversion itself fails
  c = tf.lite.TFLiteConverter.from_concrete_functions([m.step.get_concrete_function()], m)
  c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
  flex = c.convert()
  assert 'CUSTOM:FlexMatrixDeterminant' in convert.op_names(flex)
  with pytest.raises(sampler.LiteRTError, match='non-builtin'):
    convert.check_builtin(flex)


def test_bad_input_and_missing_litert_are_one_line(smoke_run, tmp_path):
  bad = run(['-m', 'launch.export', f'--workdir={tmp_path}', '--format=litert'], check=False)
  assert bad.returncode == 2
  assert error_lines(bad.stderr) == [
      f"charlstm: error: --workdir='{tmp_path}' is not a charlstm training workdir or "
      'SavedModel export (no config.json, no saved_model.pb). Pass the --workdir that '
      'launch.train wrote (config.json, checkpoints/) or its export/.']
  assert os.listdir(tmp_path) == []
  bad = run(['-m', 'launch.litert_sample', f'--model={tmp_path}'], check=False)
  assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1
  assert 'No model.tflite' in bad.stderr

  # ai-edge-litert missing: a package of that name that fails to import, first on the path.
  fake = tmp_path / 'fake'
  (fake / 'ai_edge_litert').mkdir(parents=True)
  (fake / 'ai_edge_litert' / '__init__.py').write_text('raise ImportError("not here")\n')
  env = {'PYTHONPATH': f'{fake}{os.pathsep}{ROOT}'}
  for args in (['-m', 'launch.export', f'--workdir={smoke_run}', '--format=litert',
                f'--export_dir={tmp_path / "x"}'],
               ['-m', 'launch.litert_sample', f'--model={tmp_path}']):
    bad = run(args, check=False, env=env)
    assert bad.returncode == 2
    assert error_lines(bad.stderr) == [
        'charlstm: error: ai-edge-litert is not installed; LiteRT export and sampling need '
        'it: `pip install -e .[litert]`'], bad.stderr
  assert not (tmp_path / 'x').exists()
