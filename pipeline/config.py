"""The config schema: every key the pipeline reads, its default and why it exists.

Experiment configs in `configs/` start from `base_config()` and override what
they need. The returned ConfigDict is locked, so a typo such as
`--config.model.hiden_size=512` fails loudly instead of being ignored.
"""

import os

import ml_collections
from ml_collections import config_dict

from pipeline import errors

STRATEGIES = ('auto', 'cpu', 'gpu', 'mirrored', 'multi_worker', 'tpu')
PRECISIONS = ('float32', 'bfloat16', 'float16')
CELL_KERNELS = ('auto', 'cc', 'xla')  # train.cell_kernels
MODES = ('shuffle', 'stream')
DECODE_ERRORS = ('strict', 'replace')
SCHEDULES = ('constant', 'cosine')


class ConfigError(errors.Error):
  """A config value is invalid; the message names the key and the fix."""


DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def bundled(name):
  """Absolute path of a corpus bundled in data/, so configs work from any cwd."""
  return os.path.join(DATA_DIR, name)


def base_config():
  """Returns the default config with every key the pipeline understands."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds weights, window order, state resets and samples.

  c.data = ml_collections.ConfigDict()
  c.data.corpus = bundled('tinyshakespeare.txt.gz')  # File, directory or glob; local or gs://; or tfds:NAME/CONFIG[:VERSION].
  c.data.tfds_data_dir = ''  # Where tfds: corpora were prepared (launch.prepare); local or gs://; '' = TFDS default.
  c.data.tfds_streaming = False  # tfds: corpora: read the shards while training instead of loading the text (corpora larger than memory; data.mode=stream).
  c.data.val_fraction = 0.05  # Contiguous tail of the text held out for validation.
  c.data.seq_length = 100  # T: characters per window (truncated-BPTT length).
  c.data.batch_size = 64  # Global batch B, split evenly across replicas.
  c.data.eval_batch_size = 64  # Global batch for validation (streams in stream mode).
  c.data.mode = 'shuffle'  # 'shuffle': random windows from zero state; 'stream': carried state.
  c.data.state_reset_prob = 0.03  # Stream mode: chance per row and window of zeroing (h, c).
  c.data.decode_errors = 'strict'  # Bytes that are not UTF-8: 'strict' stops naming file and offset; 'replace' reads U+FFFD and warns.
  c.data.max_vocab = 1024  # Most distinct characters a new vocabulary may have (stray symbols bloat the softmax).

  c.model = ml_collections.ConfigDict()
  c.model.hidden_size = 256  # Units per LSTM layer.
  c.model.num_layers = 2  # Stacked LSTM layers.
  c.model.dropout = 0.0  # Dropout on each LSTM layer's output while training (regularises bigger models).

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2000  # Optimizer steps in the whole run (resume continues to this).
  c.train.steps_per_loop = 50  # Steps per tf.function call (fewer host round-trips).
  c.train.learning_rate = 2e-3  # Adam peak learning rate.
  c.train.lr_schedule = 'cosine'  # 'constant' or 'cosine' decay to 10% over num_steps.
  c.train.warmup_steps = 100  # Linear warm-up steps before the schedule.
  c.train.weight_decay = 0.0  # AdamW decoupled weight decay on the kernels (biases excluded); 0 is plain Adam.
  c.train.grad_clip_norm = 5.0  # Global-norm gradient clipping; 0 disables it.
  c.train.log_every = 50  # Steps between progress lines and train summaries.
  c.train.eval_every = 500  # Steps between validation passes and printed samples.
  c.train.checkpoint_every = 500  # Steps between checkpoints.
  c.train.keep_checkpoints = 3  # Periodic checkpoints kept (the best one is kept apart).
  c.train.sample_length = 200  # Characters printed per sample during training.
  c.train.sample_temperature = 0.8  # Temperature of those samples.
  c.train.sample_prompt = ''  # Prompt of those samples ('' starts from zero state).
  c.train.jit_compile = config_dict.placeholder(bool)  # XLA on CPU: the whole loop (one replica) or forward/backward (several); None: on for one replica where TensorFlow runs without oneDNN (steps.jit_mode); GPUs ignore it.
  c.train.tpu_proxy = False  # CPU: compile each step exactly as a TPU does (XLA over the whole replica step, Keras's LSTM, bfloat16 inputs fed per step).
  c.train.fused_lstm = True  # CPU: the train step runs each LSTM layer as pipeline.fused_lstm (Keras's math, a 1.2-1.6x faster gradient); False: Keras's own loop.
  c.train.cell_kernels = 'auto'  # fused_lstm's per-step gate math: 'cc' (a C++ op compiled for this CPU at first use, pipeline.kernels.cell), 'xla', or 'auto' (cc, else xla with a warning).
  c.train.lstm_chains = 0  # fused_lstm: split each batch into N recurrences run side by side on the CPU cores (0: one per core, up to batch/16; same math).
  c.train.export = True  # Export a SavedModel to <workdir>/export when training ends.
  c.train.init_from = ''  # Fine-tune: start from a workdir's latest checkpoint, an export dir or a checkpoint (merged vocabulary, fresh optimizer; not on resume).

  c.runtime = ml_collections.ConfigDict()
  c.runtime.strategy = 'auto'  # auto (TPU, then GPUs, then CPU), cpu, gpu, mirrored, multi_worker, tpu.
  c.runtime.cpu_devices = 1  # Split the CPU into N logical devices (tests Mirrored on CPU).
  c.runtime.tpu = 'local'  # TPUClusterResolver name: 'local' on a TPU VM, else the TPU's name.
  c.runtime.precision = 'float32'  # float32; bfloat16 (TPU/CPU) or float16 (GPU, loss-scaled), mixed.
  c.runtime.deterministic = True  # tf op determinism: bit-exact resume; costs little on CPU.
  return c


def from_flag(holder):
  """Returns the config behind a config_flags holder, as a one-line error if it failed to load."""
  try:
    config = holder.value
    config.is_locked  # pylint: disable=pointless-statement  # a failed load surfaces here
  except OSError as e:
    first = str(e).split('\n')[0]
    detail = [line.strip() for line in str(e).split('\n') if line.strip()][-1]
    raise ConfigError(f'{first}: {detail}. Pass --config=configs/<name>.py[:preset].') from None
  return finalize(config)


def finalize(config):
  """Locks a config and checks the values; returns it."""
  if not config.is_locked:
    config.lock()
  validate(config)
  return config


def _check(ok, msg):
  if not ok:
    raise ConfigError(msg)


def validate(c):
  """Raises ConfigError for values the pipeline cannot run with."""
  d, m, t, r = c.data, c.model, c.train, c.runtime
  _check(d.mode in MODES, f'data.mode must be one of {MODES}, got {d.mode!r}.')
  _check(d.seq_length >= 1, f'data.seq_length must be >= 1, got {d.seq_length}.')
  _check(d.batch_size >= 1, f'data.batch_size must be >= 1, got {d.batch_size}.')
  _check(d.eval_batch_size >= 1, 'data.eval_batch_size must be >= 1.')
  _check(0.0 <= d.state_reset_prob <= 1.0, 'data.state_reset_prob must be in [0, 1].')
  _check(d.decode_errors in DECODE_ERRORS,
         f'data.decode_errors must be one of {DECODE_ERRORS}, got {d.decode_errors!r}.')
  _check(not d.tfds_streaming or d.corpus.startswith('tfds:'),
         'data.tfds_streaming reads a prepared TFDS dataset; set data.corpus=tfds:NAME/CONFIG '
         '(python -m launch.prepare) or drop --config.data.tfds_streaming.')
  _check(not d.tfds_streaming or d.mode == 'stream',
         'data.tfds_streaming reads each row of the batch as one contiguous stream of the '
         "shards; shuffle mode needs random access to the whole text. Add "
         '--config.data.mode=stream, or drop --config.data.tfds_streaming to load the text.')
  _check(d.max_vocab >= 2, f'data.max_vocab must be >= 2, got {d.max_vocab}.')
  _check(0.0 < d.val_fraction < 1.0,
         f'data.val_fraction must be in (0, 1), got {d.val_fraction}.')
  _check(0.0 <= m.dropout < 1.0, f'model.dropout must be in [0, 1), got {m.dropout}.')
  _check(m.hidden_size >= 1 and m.num_layers >= 1,
         'model.hidden_size and model.num_layers must be >= 1.')
  _check(t.num_steps >= 1, f'train.num_steps must be >= 1, got {t.num_steps}.')
  for key in ('steps_per_loop', 'log_every', 'eval_every', 'checkpoint_every',
              'keep_checkpoints'):
    _check(t[key] >= 1, f'train.{key} must be >= 1, got {t[key]}.')
  _check(t.lr_schedule in SCHEDULES,
         f'train.lr_schedule must be one of {SCHEDULES}, got {t.lr_schedule!r}.')
  _check(t.lstm_chains >= 0,
         f'train.lstm_chains must be >= 0 (0: one per CPU core), got {t.lstm_chains}.')
  _check(t.cell_kernels in CELL_KERNELS,
         f'train.cell_kernels must be one of {CELL_KERNELS}, got {t.cell_kernels!r}.')
  _check(t.weight_decay >= 0, f'train.weight_decay must be >= 0, got {t.weight_decay}.')
  _check(t.grad_clip_norm >= 0, 'train.grad_clip_norm must be >= 0 (0 disables).')
  _check(r.strategy in STRATEGIES,
         f'runtime.strategy must be one of {STRATEGIES}, got {r.strategy!r}.')
  _check(r.precision in PRECISIONS,
         f'runtime.precision must be one of {PRECISIONS}, got {r.precision!r}.')
  _check(r.cpu_devices >= 1, 'runtime.cpu_devices must be >= 1.')
  _check(not t.tpu_proxy or (r.strategy in ('auto', 'cpu') and r.cpu_devices == 1),
         'train.tpu_proxy compiles the TPU step on one CPU replica; set '
         '--config.runtime.strategy=cpu and runtime.cpu_devices=1, or drop train.tpu_proxy '
         '(on a TPU, training compiles the step itself).')


def to_json(config):
  return config.to_dict()


def from_dict(d):
  """Rebuilds a locked config from a saved dict, filling keys added since with defaults."""
  c = base_config()
  _update(c, d, '')
  return finalize(c)


def _update(c, d, prefix):
  for k, v in d.items():
    if k not in c:
      raise ConfigError(f'Unknown config key {prefix + k!r}.')
    if isinstance(v, dict):
      _update(c[k], v, f'{prefix}{k}.')
    else:
      c[k] = v


def override(config, **flat):
  """Sets dotted keys, e.g. override(c, **{'model.hidden_size': 8}); for tests and tools."""
  for key, value in flat.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      if not hasattr(node, 'keys') or p not in node:
        raise ConfigError(f'Unknown config key {key!r}.')
      node = node[p]
    if leaf not in node:
      raise ConfigError(f'Unknown config key {key!r}.')
    node[leaf] = value
  return config
