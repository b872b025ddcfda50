"""Reporting: progress lines, TensorBoard summaries, the loss history and its PNG plot."""

import io
import math

import tensorflow as tf
from absl import logging

from pipeline import storage

HISTORY_FILE = 'history.json'
PLOT_FILE = 'loss.png'


def bits(nats):
  return nats / math.log(2.0)


def fmt_duration(seconds):
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class Reporter:
  """Collects metrics; writes summaries, history.json and loss.png in the workdir."""

  def __init__(self, workdir, num_steps, write=True):
    self.workdir = workdir
    self.num_steps = num_steps
    self.write = write
    self.history = {'train': [], 'val': []}
    path = storage.join(workdir, HISTORY_FILE)
    if storage.exists(path):
      self.history = storage.read_json(path)
    if write:
      self.train_writer = tf.summary.create_file_writer(storage.join(workdir, 'tb', 'train'))
      self.eval_writer = tf.summary.create_file_writer(storage.join(workdir, 'tb', 'eval'))
  def train(self, step, loss, steps, chars, seconds, lr):
    """Logs a progress line and train scalars for `steps` steps ending at `step`."""
    cps = chars / max(seconds, 1e-9)
    eta = (self.num_steps - step) * seconds / max(steps, 1)
    logging.info('step %d/%d  loss %.4f nats (%.3f bpc)  %.0f chars/s  lr %.2e  ETA %s',
                 step, self.num_steps, loss, bits(loss), cps, lr, fmt_duration(eta))
    self.history['train'].append([step, loss])
    if self.write:
      with self.train_writer.as_default(step=step):
        tf.summary.scalar('loss_nats', loss)
        tf.summary.scalar('bits_per_char', bits(loss))
        tf.summary.scalar('chars_per_sec', cps)
        tf.summary.scalar('learning_rate', lr)

  def evaluate(self, step, loss, sample):
    logging.info('eval step %d  val loss %.4f nats (%.3f bpc)', step, loss, bits(loss))
    print(f'----- sample at step {step} -----\n{sample}\n-----', flush=True)
    self.history['val'].append([step, loss])
    if self.write:
      with self.eval_writer.as_default(step=step):
        tf.summary.scalar('loss_nats', loss)
        tf.summary.scalar('bits_per_char', bits(loss))
        tf.summary.text('sample', sample)
      self.flush()

  def flush(self):
    if not self.write:
      return
    self.train_writer.flush()
    self.eval_writer.flush()
    storage.write_json(storage.join(self.workdir, HISTORY_FILE), self.history)
    self.plot()

  def plot(self):
    """Draws train and validation loss like the seed's aux.plot, as loss.png."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, style in (('train', '-'), ('val', 'o-')):
      pts = self.history[name]
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f'{name} loss')
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats per char)')
    ax.grid(alpha=0.3)
    if self.history['train'] or self.history['val']:
      ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', bbox_inches='tight')
    plt.close(fig)
    storage.write_bytes_atomic(storage.join(self.workdir, PLOT_FILE), buf.getvalue())
