"""Tiny Shakespeare, 2x256 LSTM, random windows: the default experiment.

Run:
  python -m launch.train --config=configs/shakespeare.py --workdir=/tmp/run1
Presets (after a colon):
  configs/shakespeare.py:smoke  seconds-long run for tests and CI.
  configs/shakespeare.py:demo   the README's quick run (under 3 minutes on 2 cores).
"""

from pipeline import config as config_lib


def get_config(preset=''):
  c = config_lib.base_config()
  c.data.corpus = config_lib.bundled('tinyshakespeare.txt.gz')  # Bundled, 1.1M chars, 65 symbols.
  if preset == 'smoke':
    c.data.seq_length = 32  # Short windows keep the test fast.
    c.data.batch_size = 16  # Still > 1 and divisible by 2 replicas.
    c.data.eval_batch_size = 16  # Small eval batch; the val split is still covered.
    c.data.val_fraction = 0.01  # ~11k chars of validation: a quick but whole pass.
    c.model.hidden_size = 64  # Small enough to train in seconds.
    c.model.num_layers = 1  # One layer, as in the seed post.
    c.train.num_steps = 60  # Enough for the loss to fall clearly below ln(V).
    c.train.steps_per_loop = 10  # Several loops, so the loop boundaries are exercised.
    c.train.learning_rate = 1e-2  # Fast early progress on a tiny model.
    c.train.warmup_steps = 0  # No warm-up in a 60-step run.
    c.train.log_every = 20  # A few progress lines.
    c.train.eval_every = 30  # Two validation passes (mid-run and last step).
    c.train.checkpoint_every = 30  # Two checkpoints: enough to test resume.
    c.train.sample_length = 40  # Short samples keep logs readable.
    c.train.jit_compile = False  # XLA compiles per loop length; in a seconds-long run that costs more than it saves.
  elif preset == 'demo':
    # Measured on 2 cores: 128 units at batch 64 run ~120k chars/s, 3.5x the
    # rate of 256 units, and reach a lower loss within the 3-minute budget.
    c.data.seq_length = 64  # Shorter windows: more steps per second.
    c.data.batch_size = 64  # Larger batches use the cores better than more steps.
    c.data.val_fraction = 0.02  # ~22k chars of validation.
    c.model.hidden_size = 128  # The fastest size per unit of loss on a CPU here.
    c.model.num_layers = 1  # Keeps each step cheap.
    c.train.num_steps = 1200  # About a minute of training on 2 quiet cores.
    c.train.learning_rate = 5e-3  # Aggressive for a short run.
    c.train.warmup_steps = 20  # Brief warm-up.
    c.train.log_every = 200  # A progress line every 200 steps.
    c.train.eval_every = 600  # A mid-run and a final validation + sample.
    c.train.checkpoint_every = 600  # Checkpoint with every eval.
  elif preset:
    raise ValueError(f'Unknown preset {preset!r}; use smoke or demo.')
  return c
