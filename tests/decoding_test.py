"""Decoding: nucleus (top-p) sampling and stop strings in generate, the export and launch.sample."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline import generate
from pipeline import sample
from tests.conftest import error_lines, run
from tests.serve_test import Server, post, shared_export, stream


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  s = Server(shared_export(tmp_path_factory))
  yield s
  s.stop()


def test_nucleus_keeps_the_smallest_likeliest_set_reaching_top_p():
  logits = tf.math.log(tf.constant([[0.2, 0.5, 0.3], [0.25, 0.25, 0.5]], tf.float64))
  keep = lambda p: generate.nucleus_keep(logits, tf.constant(p)).numpy().tolist()
  assert keep(0.5) == [[False, True, False], [False, False, True]]
  assert keep(0.6) == [[False, True, True], [True, False, True]]  # ties: the lower id first
  assert keep(0.74) == [[False, True, True], [True, False, True]]
  assert keep(0.79) == [[False, True, True], [True, True, True]]
  assert keep(0.81) == [[True, True, True], [True, True, True]]
  assert keep(1e-9) == [[False, True, False], [False, False, True]]  # the likeliest, always
  # Per row.
  per_row = generate.nucleus_keep(logits, tf.constant([0.5, 0.9])).numpy().tolist()
  assert per_row == [[False, True, False], [True, True, True]]


def test_top_p_1_leaves_every_draw_as_it_was():
  rng = np.random.default_rng(0)
  for trial in range(20):
    logits = tf.constant(rng.normal(size=(8, 65)) * 3, tf.float32)
    for i in range(5):
      rows = (logits, tf.fill([8], 0.9), tf.fill([8], trial % 3 * 5),
              tf.range(8, dtype=tf.int64) + trial, tf.fill([8], tf.cast(i, tf.int64)))
      np.testing.assert_array_equal(
          generate.choose_rows(*rows, top_p=tf.ones([8])), generate.choose_rows(*rows))


def test_top_p_samples_only_inside_the_nucleus():
  logits = tf.math.log(tf.constant([[0.05, 0.6, 0.3, 0.05]], tf.float32))
  rows = [tf.tile(logits, [300, 1]), tf.ones([300]), tf.zeros([300], tf.int32),
          tf.fill([300], tf.constant(3, tf.int64)), tf.range(300, dtype=tf.int64)]
  assert set(generate.choose_rows(*rows, top_p=tf.fill([300], 0.85)).numpy()) == {1, 2}


@pytest.mark.parametrize('pieces', [['abcdef'], ['ab', 'cd', 'ef'], list('abcdef')])
def test_stop_filter_cuts_at_the_first_complete_stop_string_however_text_arrives(pieces):
  for stops, want in ((['cd'], 'ab'), (['de', 'bcx'], 'abc'), (['bcdefg', 'cde'], 'ab'),
                      (['zz'], 'abcdef'), (['f'], 'abcde'), (['ef', 'a'], '')):
    f = sample.StopFilter(stops)
    got = ''.join(f.feed(p) for p in pieces) + f.finish()
    assert got == want, (stops, pieces)


def test_export_decode_and_launch_sample_top_p_and_stop(smoke_run):
  export = str(smoke_run / 'export')
  module = tf.saved_model.load(export)
  args = dict(prompts=tf.constant(['ROMEO:', 'JULIET', '']), num_chars=tf.constant(200),
              temperature=tf.constant(1.0), top_k=tf.constant(0), seed=tf.constant(3, tf.int64))
  today = module.generate(**args)['text'].numpy().tolist()
  assert module.decode(top_p=tf.constant(1.0), **args)['text'].numpy().tolist() == today
  greedy = module.generate(**{**args, 'temperature': tf.constant(0.0)})['text'].numpy().tolist()
  assert module.decode(top_p=tf.constant(1e-6), **args)['text'].numpy().tolist() == greedy
  # launch.sample: top_p=1, no stops is exactly the text it gave before both existed.
  plain = [t for _, t in sample.sample(export, ['ROMEO:'], 200, 1.0, 0, 3)]
  assert [t.encode() for t in plain] == today[:1]
  cut = [t for _, t in sample.sample(export, ['ROMEO:'], 200, 1.0, 0, 3, stop=['\n', 'e'])]
  ends = [plain[0].find(x) for x in ('\n', 'e') if x in plain[0]]
  assert cut == [plain[0][:min(ends)] if ends else plain[0]]
  proc = run(['-m', 'launch.sample', f'--saved_model={export}', '--prompt=ROMEO:',
              '--length=200', '--temperature=1', '--seed=3', '--top_p=0.9', '--stop=\n'])
  assert proc.stdout.startswith('ROMEO:') and '\n' not in proc.stdout.rstrip('\n')[len('ROMEO:'):]


# launch.sample run as `python -m` does, reporting at exit whether TensorFlow was imported.
SAMPLE_MAIN = ('import atexit, runpy, sys\n'
               'atexit.register(lambda: print("tensorflow imported:", "tensorflow" in sys.modules,'
               ' file=sys.stderr))\n'
               'sys.argv[0] = "launch/sample.py"\n'
               'runpy.run_module("launch.sample", run_name="__main__", alter_sys=True)\n')


@pytest.mark.parametrize('flag, message', [('--top_p=0', '--top_p must be in (0, 1]'),
                                           ('--top_p=1.5', '--top_p must be in (0, 1]'),
                                           ('--stop=', '--stop strings must not be empty'),
                                           ('--length=-1', '--length must be >= 0'),
                                           ('--num_samples=0', '--num_samples must be >= 1')])
def test_bad_decoding_flags_are_one_line_before_tensorflow_loads(smoke_run, flag, message):
  proc = run(['-c', SAMPLE_MAIN, f'--saved_model={smoke_run / "export"}', flag], check=False)
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and message in lines[0], proc.stderr[-1500:]
  assert 'tensorflow imported: False' in proc.stderr, proc.stderr[-1500:]


def test_stop_strings_end_each_row_streamed_or_not_and_top_p_narrows(server):
  body = {'prompts': ['ROMEO:', 'JULIET:', ''], 'num_chars': 300, 'temperature': 1.0,
          'seed': 5}
  full = post(server.url, body).json()['texts']
  stops = ['e ', 'th']
  want = []
  for text in full:  # the first stop string to be complete ends the row
    ends = [(text.find(x) + len(x), text.find(x)) for x in stops if x in text]
    want.append(text[:min(ends)[1]] if ends else text)
  assert any(len(w) < len(t) for w, t in zip(want, full))  # some row did stop
  got = post(server.url, {**body, 'stop': stops}).json()
  assert got['texts'] == want
  events = stream(server.url, {**body, 'stop': stops})
  streamed = [''] * 3
  for e, d in events:
    if e == 'chunk':
      streamed[d['index']] += d['text']
  assert streamed == want and events[-1][1]['texts'] == want
  # top_p: 1 is the default's text; a tiny nucleus is the likeliest character, i.e. greedy.
  assert post(server.url, {**body, 'top_p': 1.0}).json()['texts'] == full
  greedy = post(server.url, {**body, 'temperature': 0}).json()['texts']
  assert post(server.url, {**body, 'top_p': 1e-6}).json()['texts'] == greedy
  assert post(server.url, {**body, 'top_p': 0.5}).json()['texts'] not in (full, greedy)
