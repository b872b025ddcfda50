"""One in-graph batch shared by every request in flight, advanced chunk by chunk.

A single worker thread owns the batch: rows (one per prompt) and their state
(h, c, logits) as numpy arrays, one row each. Each turn it

  1. takes waiting rows (when the batch was idle, after a short window, so
     requests arriving together are primed in one call), primes them and
     appends them to the batch;
  2. drops rows whose client went away and rows that are complete;
  3. runs `extend` for one chunk of characters over the whole batch and hands
     each row its chunk.

So a request joins at the next chunk boundary, streams on its own, and leaves
the batch when it has its characters or its client disconnects. The text of
a row does not depend on its batch-mates or the chunk size: every row samples
from its own seed and position (pipeline.generate.choose_rows).

`emit(kind, row, text)` is called from the worker thread with kind 'chunk',
'done' or 'error'; the server's callback hands it to the event loop.
"""

import collections
import dataclasses
import threading
import time
from typing import Callable

import numpy as np
from absl import logging

from pipeline import sample


@dataclasses.dataclass(eq=False)
class Row:
  """One prompt of one request, while it waits or generates."""
  prompt: str
  num_chars: int
  temperature: float
  top_k: int
  seed: int
  emit: Callable
  index: int = 0  # within its request
  position: int = 0  # characters generated so far
  cancelled: bool = False  # set from the event loop; read by the worker
  top_p: float = 1.0
  stop: tuple = ()
  cut: object = None  # the row's sample.StopFilter, if it has stop strings

  def __post_init__(self):
    if self.stop:
      self.cut = sample.StopFilter(self.stop)

  @property
  def remaining(self):
    return self.num_chars - self.position


class Stats:
  """Counters the server reports in /healthz; the worker thread writes them."""

  FIELDS = ('requests', 'rows_started', 'rows_finished', 'rows_cancelled', 'rows_failed',
            'chars_generated', 'prime_calls', 'max_prime_rows', 'extend_calls',
            'max_batch_rows', 'active_rows', 'queued_rows')

  def __init__(self):
    for name in self.FIELDS:
      setattr(self, name, 0)

  def snapshot(self):
    return {name: getattr(self, name) for name in self.FIELDS}


def _safe_emit(row, kind, text=None):
  try:
    row.emit(kind, row, text)
  except RuntimeError:  # the event loop is gone (shutdown): nobody to tell
    pass


class Batcher:
  """Runs the shared batch on a daemon thread; submit() and cancel() from any thread."""

  def __init__(self, engine, window_s=0.005, max_rows=64, chunk_chars=16):
    self._engine = engine
    self.window_s = window_s
    self.max_rows = max_rows
    self.chunk_chars = chunk_chars
    self._cond = threading.Condition()
    self._pending = collections.deque()
    self._closed = False
    self.stats = Stats()
    self._rows = []
    self._state = engine.empty_state()
    self._thread = threading.Thread(target=self._run, name='charlstm-batcher', daemon=True)

  def start(self):
    self._thread.start()
    return self

  def close(self):
    with self._cond:
      self._closed = True
      self._cond.notify()

  def submit(self, rows):
    """Queues a request's rows; they join the batch at the next chunk boundary."""
    with self._cond:
      self._pending.extend(rows)
      self.stats.requests += 1
      self.stats.queued_rows = len(self._pending)
      self._cond.notify()

  def cancel(self, rows):
    """Marks rows whose client went away; the worker drops them before its next chunk."""
    for row in rows:
      row.cancelled = True
    with self._cond:
      self._cond.notify()

  def _run(self):
    while True:
      with self._cond:
        while not self._pending and not self._rows and not self._closed:
          self._cond.wait()
        if self._closed:
          return
        idle = not self._rows
      if idle and self.window_s > 0:
        time.sleep(self.window_s)  # requests arriving together share one prime and batch
      self._admit()
      self._retire()
      if self._rows:
        self._step()
        self._retire()  # 'done' goes out now, not after the next prime

  def _admit(self):
    with self._cond:
      room = self.max_rows - len(self._rows)
      new = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
      self.stats.queued_rows = len(self._pending)
    gone = [r for r in new if r.cancelled]
    self.stats.rows_cancelled += len(gone)
    new = [r for r in new if not r.cancelled]
    if not new:
      return
    try:
      h, c, logits = self._engine.prime([r.prompt for r in new])
    except Exception as e:  # pylint: disable=broad-except  # fail these rows, keep serving
      logging.exception('prime failed')
      self._fail(new, e)
      return
    self.stats.prime_calls += 1
    self.stats.max_prime_rows = max(self.stats.max_prime_rows, len(new))
    self.stats.rows_started += len(new)
    old = self._state
    self._state = tuple(np.concatenate([a, b]) for a, b in zip(old, (h, c, logits)))
    self._rows += new
    self.stats.active_rows = len(self._rows)

  def _retire(self):
    """Takes finished and cancelled rows out of the batch and its state."""
    keep = []
    for i, row in enumerate(self._rows):
      if row.cancelled:
        self.stats.rows_cancelled += 1
      elif row.remaining <= 0:
        self.stats.rows_finished += 1
        if row.cut is not None and row.cut.held:  # the tail that was no stop string after all
          _safe_emit(row, 'chunk', row.cut.finish())
        _safe_emit(row, 'done')
      else:
        keep.append(i)
    if len(keep) < len(self._rows):
      self._rows = [self._rows[i] for i in keep]
      self._state = tuple(a[keep] for a in self._state)
      self.stats.active_rows = len(self._rows)

  def _step(self):
    rows = self._rows
    # No longer than the longest row still needs: a nearly finished batch
    # does not generate characters nobody asks for.
    n = min(self.chunk_chars, max(r.remaining for r in rows))
    try:
      texts, *state = self._engine.extend(
          *self._state, n, [r.temperature for r in rows], [r.top_k for r in rows],
          [r.seed for r in rows], [r.position for r in rows], [r.top_p for r in rows])
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('extend failed')
      self._fail(rows, e)
      self._rows, self._state = [], self._engine.empty_state()
      self.stats.active_rows = 0
      return
    self._state = tuple(state)
    self.stats.extend_calls += 1
    self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(rows))
    for row, text in zip(rows, texts):
      if row.cancelled:
        continue
      text = text[:row.remaining]  # vocabulary entries are single characters
      row.position += len(text)
      self.stats.chars_generated += len(text)
      if row.cut is not None:
        text = row.cut.feed(text)
        if row.cut.stopped:  # it leaves the batch at the next retire
          row.position = row.num_chars
      if text:
        _safe_emit(row, 'chunk', text)

  def _fail(self, rows, error):
    self.stats.rows_failed += len(rows)
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for row in rows:
      _safe_emit(row, 'error', f'generation failed: {message}')
