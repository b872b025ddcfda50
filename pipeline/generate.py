"""In-graph text generation, shared by the exported SavedModel and training-time samples.

The whole loop runs inside TensorFlow (tf.range + TensorArray), so one call
generates a batch of texts with no per-character Python round-trip, which is
what made the seed post's `predict`-per-character sampler crawl.

Randomness is stateless and seeded by the caller: the same seed gives the same
text in any process. Temperature <= 0 is greedy decoding.
"""

import tensorflow as tf


def prompt_ids(vocab_codepoints, prompts):
  """Maps string prompts to ragged ids; fails clearly on characters outside the vocabulary.

  The vocabulary is a sorted constant of code points, so lookup is a
  searchsorted, with no hash-table resource for the SavedModel to carry.
  """
  cps = tf.strings.unicode_decode(prompts, 'UTF-8')
  flat = cps.flat_values
  v = tf.shape(vocab_codepoints, out_type=tf.int32)[0]
  pos = tf.searchsorted(vocab_codepoints, flat, side='left', out_type=tf.int32)
  pos = tf.minimum(pos, v - 1)
  known = tf.equal(tf.gather(vocab_codepoints, pos), flat)
  check = tf.debugging.Assert(
      tf.reduce_all(known),
      ['Prompt contains characters outside the model vocabulary (code points):',
       tf.boolean_mask(flat, tf.logical_not(known))], summarize=20)
  with tf.control_dependencies([check]):
    return cps.with_flat_values(tf.identity(pos))


def choose(logits, temperature, top_k, seed, i):
  """Picks next ids from float32 logits (B, V): greedy, top-k or full sampling.

  Ties are broken towards the lower id in both greedy and top-k, so top_k=1
  is exactly greedy (it matters for an empty prompt, whose logits are flat).
  """
  v = tf.shape(logits)[-1]
  greedy = tf.math.top_k(logits, k=1).indices[:, 0]
  scaled = logits / tf.maximum(temperature, 1e-6)
  k = tf.minimum(tf.maximum(top_k, 1), v)
  top = tf.math.top_k(scaled, k=k).indices
  in_top = tf.reduce_max(tf.one_hot(top, v, on_value=1, off_value=0, dtype=tf.int32), axis=1) > 0
  keep = tf.logical_or(top_k <= 0, in_top)
  scaled = tf.where(keep, scaled, tf.constant(-float('inf'), scaled.dtype))
  sampled = tf.random.stateless_categorical(
      scaled, 1, seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(i, tf.int64)]),
      dtype=tf.int32)[:, 0]
  return tf.where(temperature > 0, sampled, greedy)


def generate(step_fn, vocab_chars, vocab_codepoints, num_layers, hidden_size,
             prompts, num_chars, temperature, top_k, seed):
  """Continues each prompt by `num_chars` characters.

  Args:
    step_fn: (one_hot (B, 1, V), h, c) -> (logits (B, 1, V), h, c).
    vocab_chars: string[V] constant, id -> character.
    vocab_codepoints: int32[V] sorted constant, id -> code point.
    num_layers, hidden_size: state shape (B, L, H).
    prompts: string[B]. An empty prompt starts from zero state with uniform
      first-character logits (greedy then picks id 0).
    num_chars: int32 scalar, >= 0.
    temperature: float32 scalar; <= 0 means greedy.
    top_k: int32 scalar; <= 0 means no top-k filtering.
    seed: int64 scalar for the stateless sampler.

  Returns:
    string[B]: the continuations only (without the prompts).
  """
  v = tf.shape(vocab_chars)[0]
  ids = prompt_ids(vocab_codepoints, prompts)
  lengths = tf.cast(ids.row_lengths(), tf.int32)
  b = tf.shape(prompts)[0]
  padded = ids.to_tensor(default_value=0, shape=[None, None])
  h = tf.zeros([b, num_layers, hidden_size])
  c = tf.zeros([b, num_layers, hidden_size])
  logits = tf.zeros([b, v])

  # Prompts have different lengths: feed them in lockstep and let a row's
  # state and logits advance only while it still has prompt characters.
  for t in tf.range(tf.shape(padded)[1]):
    out, h2, c2 = step_fn(tf.one_hot(padded[:, t][:, None], v), h, c)  # static length 1
    live = t < lengths
    h = tf.where(live[:, None, None], h2, h)
    c = tf.where(live[:, None, None], c2, c)
    logits = tf.where(live[:, None], out[:, 0], logits)

  # Slot 0 holds a dummy row so that stack() works for num_chars == 0.
  chosen = tf.TensorArray(tf.int32, size=num_chars + 1, element_shape=[None])
  chosen = chosen.write(0, tf.zeros([b], tf.int32))
  for i in tf.range(num_chars):
    nxt = choose(logits, temperature, top_k, seed, i)
    chosen = chosen.write(i + 1, nxt)
    out, h, c = step_fn(tf.one_hot(nxt[:, None], v), h, c)
    logits = out[:, 0]
  picked = tf.transpose(chosen.stack()[1:])
  return tf.strings.reduce_join(tf.gather(vocab_chars, picked), axis=1)
