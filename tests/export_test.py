"""Export: the SavedModel round-trips in a fresh process that never imports `pipeline`."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf

from pipeline import corpus
from pipeline import model as model_lib
from tests.conftest import CHILD_ENV, error_lines, run

PROMPTS = ['ROMEO:', '', 'First Citizen:\nWe']
N = 40

# Runs in a fresh interpreter: only TensorFlow and the SavedModel.
FRESH = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorflow as tf
    m = tf.saved_model.load(sys.argv[1])
    prompts, n = json.loads(sys.argv[2]), int(sys.argv[3])
    out = m.generate(prompts=tf.constant(prompts), num_chars=tf.constant(n),
                     temperature=tf.constant(0.0), top_k=tf.constant(0),
                     seed=tf.constant(0, tf.int64))['text'].numpy()
    chars = [c.decode() for c in m.vocab()['chars'].numpy()]
    index = {c: i for i, c in enumerate(chars)}
    shape = m.signatures['step'].structured_input_signature[1]['h'].shape
    loops = []
    for p in prompts:
      h = c = tf.zeros([1, shape[1], shape[2]])
      logits = np.zeros(len(chars), np.float32)
      for ch in p:
        r = m.step(ids=tf.constant([index[ch]]), h=h, c=c)
        logits, h, c = r['logits'][0].numpy(), r['h'], r['c']
      text = ''
      for _ in range(n):
        nxt = int(np.argmax(logits))
        text += chars[nxt]
        r = m.step(ids=tf.constant([nxt]), h=h, c=c)
        logits, h, c = r['logits'][0].numpy(), r['h'], r['c']
      loops.append(text)
    print('JSON' + json.dumps({
        'generate': [t.decode() for t in out], 'loop': loops,
        'pipeline_imported': sorted(k for k in sys.modules if k.split('.')[0] == 'pipeline'),
        'signatures': sorted(m.signatures)}))
''')


def fresh_process_results(export_dir):
  proc = run(['-c', FRESH, str(export_dir), json.dumps(PROMPTS), str(N)], cwd='/')
  return json.loads(proc.stdout.split('JSON', 1)[1])


def keras_greedy(workdir, prompt, n):
  """Greedy decoding with the Keras step model restored from the latest checkpoint."""
  cfg = json.loads((workdir / 'config.json').read_text())
  vocab = corpus.Vocab.load(str(workdir / 'vocab.json'))
  models = model_lib.build(vocab.size, cfg['model']['hidden_size'], cfg['model']['num_layers'],
                           cfg['data']['seq_length'])
  tf.train.Checkpoint(model=models.checkpoint_weights()).read(
      tf.train.latest_checkpoint(str(workdir / 'checkpoints'))).assert_existing_objects_matched()
  h, c = model_lib.zero_state(1, cfg['model']['num_layers'], cfg['model']['hidden_size'])
  logits = np.zeros(vocab.size, np.float32)
  index = {ch: i for i, ch in enumerate(vocab.chars)}
  def step(i, h, c):
    x = tf.one_hot([[i]], vocab.size)
    out, h, c = models.step([x, h, c])
    return out[0, 0].numpy(), h, c
  for ch in prompt:
    logits, h, c = step(index[ch], h, c)
  text = ''
  for _ in range(n):
    nxt = int(np.argmax(logits))
    text += vocab.chars[nxt]
    logits, h, c = step(nxt, h, c)
  return text


def test_export_round_trip_in_fresh_process_matches_step_loop_and_keras(smoke_run):
  res = fresh_process_results(smoke_run / 'export')
  assert res['pipeline_imported'] == []
  assert {'generate', 'step', 'serving_default', 'vocab'} <= set(res['signatures'])
  assert [len(t) for t in res['generate']] == [N] * len(PROMPTS)
  assert res['generate'] == res['loop']
  assert len(set(res['generate'])) > 1  # prompts condition the output
  for prompt, text in zip(PROMPTS, res['generate']):
    assert keras_greedy(smoke_run, prompt, N) == text


def saved_model_cli(*args):
  """Runs the real `saved_model_cli` console script installed next to this Python."""
  exe = str(pathlib.Path(sys.executable).parent / 'saved_model_cli')
  proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                        env=CHILD_ENV)
  assert proc.returncode == 0, proc.stderr
  return proc


def test_saved_model_cli_lists_signatures_and_runs_generate(smoke_run):
  export = str(smoke_run / 'export')
  show = saved_model_cli('show', '--dir', export, '--all')
  for name in ('generate', 'step', 'serving_default', 'vocab', 'prompts', 'num_chars'):
    assert name in show.stdout
  cli = saved_model_cli('run', '--dir', export, '--tag_set', 'serve', '--signature_def',
                        'generate', '--input_exprs',
                        'prompts=["ROMEO:"];num_chars=25;temperature=0.0;top_k=0;seed=1')
  loaded = tf.saved_model.load(export)
  expected = loaded.generate(prompts=tf.constant(['ROMEO:']), num_chars=tf.constant(25),
                             temperature=tf.constant(0.0), top_k=tf.constant(0),
                             seed=tf.constant(1, tf.int64))['text'].numpy()[0]
  assert 'Result for output key text' in cli.stdout
  assert repr(expected) in cli.stdout


def test_reexport_from_best_checkpoint_and_bad_checkpoint_keeps_export(smoke_run, tmp_path):
  out = tmp_path / 'best_export'
  proc = run(['-m', 'launch.export', f'--workdir={smoke_run}', '--checkpoint=best',
              f'--export_dir={out}'])
  assert 'best/ckpt-' in proc.stdout
  loaded = tf.saved_model.load(str(out))
  chars = [c.decode() for c in loaded.vocab()['chars'].numpy()]
  assert chars == list(corpus.Vocab.load(str(smoke_run / 'vocab.json')).chars)
  before = sorted(os.listdir(out))
  bad = run(['-m', 'launch.export', f'--workdir={smoke_run}', '--checkpoint=/no/such/ckpt',
             f'--export_dir={out}'], check=False)
  assert bad.returncode == 2
  assert error_lines(bad.stderr) == [
      "charlstm: error: Checkpoint '/no/such/ckpt' not found (no /no/such/ckpt.index)."]
  assert sorted(os.listdir(out)) == before and (out / 'saved_model.pb').exists()
