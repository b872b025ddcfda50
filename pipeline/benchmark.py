"""Benchmarks against the seed post, measured in one process and reported as ratios.

The machines are shared and noisy, so absolute chars/s mean little across
runs; each benchmark times the seed's way and ours back to back, on the same
model size, and reports the ratio.

  sampling: the seed's `test()` (one `Model.predict` per character, numpy
    sampling) vs the exported SavedModel's in-graph `generate`, for one text
    and for a batch of texts.
  training: the seed's `fit` on a generator of single windows (batch size 1)
    vs this pipeline's custom distributed loop at the config's batch size.
"""

import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import config as config_lib
from pipeline import corpus as corpus_lib
from pipeline import export as export_lib
from pipeline import model as model_lib
from pipeline import train as train_lib


def _seed_models(vocab_size, hidden):
  """The post's model and pred_model, verbatim in Keras 3 spelling."""
  inputs = keras.Input(shape=(None, vocab_size))
  lstm = keras.layers.LSTM(hidden, return_sequences=True, return_state=True)
  out, _, _ = lstm(inputs)
  dense = keras.layers.Dense(vocab_size, activation='softmax')
  model = keras.Model(inputs, dense(out))
  h_in, c_in = keras.Input(shape=(hidden,)), keras.Input(shape=(hidden,))
  out, h, c = lstm(inputs, initial_state=[h_in, c_in])
  pred_model = keras.Model([inputs, h_in, c_in], [dense(out), h, c])
  return model, pred_model


def sampling(config, seed_chars=40, our_chars=400, batch=32):
  """Returns chars/s of the seed's sampler and of the exported generate, and ratios."""
  c = config_lib.finalize(config)
  vocab = corpus_lib.Vocab.from_text(corpus_lib.read_text(c.data.corpus))
  v, hidden = vocab.size, c.model.hidden_size
  _, pred_model = _seed_models(v, hidden)
  rng = np.random.default_rng(0)

  def seed_test(n):  # the post's test(), one predict per character
    x = np.eye(v, dtype=np.float32)[[rng.integers(v)]][None]
    h = np.zeros((1, hidden), np.float32)
    cc = np.zeros((1, hidden), np.float32)
    for _ in range(n):
      prob, h, cc = pred_model.predict([x, h, cc], verbose=0)
      p = prob[-1][0].astype(np.float64)
      pred = rng.choice(v, p=p / p.sum())
      x = np.eye(v, dtype=np.float32)[[pred]][None]

  seed_test(2)  # warm-up: tracing is not what the post paid per character
  t0 = time.perf_counter()
  seed_test(seed_chars)
  seed_cps = seed_chars / (time.perf_counter() - t0)

  models = model_lib.build(v, hidden, c.model.num_layers, c.data.seq_length)
  with tempfile.TemporaryDirectory() as d:
    export_lib.export_models(models, vocab, d + '/export')
    loaded = tf.saved_model.load(d + '/export')

    def ours(prompts, n):
      return loaded.generate(prompts=tf.constant(prompts), num_chars=tf.constant(n),
                             temperature=tf.constant(0.8), top_k=tf.constant(0),
                             seed=tf.constant(1, tf.int64))['text'].numpy()

    ours([''], 2)
    ours([''] * batch, 2)
    t0 = time.perf_counter()
    ours([''], our_chars)
    one_cps = our_chars / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ours([''] * batch, our_chars)
    batch_cps = batch * our_chars / (time.perf_counter() - t0)
  return {'seed_chars_per_sec': seed_cps, 'generate_chars_per_sec': one_cps,
          f'generate_batch{batch}_chars_per_sec': batch_cps,
          'ratio_generate_vs_seed': one_cps / seed_cps,
          f'ratio_generate_batch{batch}_vs_seed': batch_cps / seed_cps}


def training(config, workdir, seed_steps=30, steps=40):
  """Returns chars/s of the seed's batch-1 fit and of the pipeline's loop, and the ratio."""
  c = config_lib.finalize(config)
  text = corpus_lib.read_text(c.data.corpus)
  vocab = corpus_lib.Vocab.from_text(text)
  ids = vocab.encode(text)
  v, t, hidden = vocab.size, c.data.seq_length, c.model.hidden_size
  model, _ = _seed_models(v, hidden)
  model.compile(loss='categorical_crossentropy',
                optimizer=keras.optimizers.Adam(c.train.learning_rate))
  eye = np.eye(v, dtype=np.float32)

  def data_feed():  # the post's generator: consecutive windows, batch size 1
    p = 0
    while True:
      window = ids[p:p + t + 1]
      yield eye[window[:-1]][None], eye[window[1:]][None]
      p = (p + t) % (len(ids) - t - 1)

  model.fit(data_feed(), steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)  # warm-up
  t0 = time.perf_counter()
  model.fit(data_feed(), steps_per_epoch=seed_steps, epochs=1, verbose=0, shuffle=False)
  seed_cps = seed_steps * t / (time.perf_counter() - t0)

  # Ours: time only the loops after the first (tracing) one, as for the seed.
  loop = max(steps // 4, 1)
  config_lib.override(c, **{'train.num_steps': steps, 'train.steps_per_loop': loop,
                            'train.log_every': steps - loop, 'train.eval_every': 10 ** 9,
                            'train.checkpoint_every': 10 ** 9, 'train.export': False})
  del steps
  result = train_lib.train_and_evaluate(c, workdir)
  ours = result['chars_per_sec']
  logging.info('training: seed %.0f chars/s, pipeline %.0f chars/s', seed_cps, ours)
  return {'seed_fit_batch1_chars_per_sec': seed_cps,
          f'pipeline_batch{c.data.batch_size}_chars_per_sec': ours,
          'ratio_pipeline_vs_seed': ours / seed_cps}
