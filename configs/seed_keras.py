"""The seed post's exact setup, kept for parity checks and benchmarks only.

One LSTM layer of 500 units, windows of 100 chars, Adam at lr 1e-2, batch size 1
(as `fit_generator` fed it). It trains, slowly; its purpose is to compare the
pipeline against the post like for like. Every other config uses batches > 1.

Run:
  python -m launch.train --config=configs/seed_keras.py --workdir=/tmp/seed
"""

from pipeline import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.corpus = config_lib.bundled('tinyshakespeare.txt.gz')  # The post trained on Shakespeare.
  c.data.seq_length = 100  # The post's seq_length.
  c.data.batch_size = 1  # The post's batch size (fit_generator, one window per step).
  c.data.eval_batch_size = 1  # Same as training.
  c.data.mode = 'stream'  # The post read windows in order (shuffle=False).
  c.data.state_reset_prob = 1.0  # It started every window from zero state.
  c.model.hidden_size = 500  # The post's hidden_dim.
  c.model.num_layers = 1  # One LSTM layer.
  c.train.learning_rate = 1e-2  # The post's Adam learning rate.
  c.train.lr_schedule = 'constant'  # No schedule in the post.
  c.train.warmup_steps = 0  # No warm-up in the post.
  c.train.grad_clip_norm = 0.0  # No clipping in the post.
  return c
