"""A local multi-worker cluster: N worker processes, one TF_CONFIG each, supervised.

`run_cluster` starts N copies of `python -m <module> <flags>` on this machine,
each with a TF_CONFIG naming the same N `127.0.0.1:<port>` workers and its own
task index, streams their output with a `[worker i] ` prefix, and makes sure
the cluster ends as one unit, with one exit status:

  * All workers exit 0: 0.
  * One worker fails (exit != 0, or killed): the others get SIGTERM, then
    SIGKILL after `grace_seconds`; the status is that first worker's code
    (1 if it died by a signal).
  * The first worker to stop exits 75 (EX_TEMPFAIL: it saved a checkpoint):
    preempted. The others are stopped the same way, and the cluster is
    relaunched on new ports up to `restarts` times; then 75.
  * `timeout` seconds pass (restarts included): everything is stopped; 124.
  * SIGINT/SIGTERM to the launcher: SIGTERM to every worker (they
    checkpoint), SIGKILL after `grace_seconds`; 75 if all exited 0 or 75.
    A second signal kills them at once.

Standard library only (so is pipeline.errors): it supervises processes and
never imports TensorFlow, so it starts instantly and runs wherever python3 does.
"""

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pipeline
from pipeline import errors

HOST = '127.0.0.1'
DEFAULT_MODULE = 'launch.train'
STRATEGY_FLAG = '--config.runtime.strategy'
DEFAULT_STRATEGY = 'multi_worker'
# How long a worker's pipes may stay open after it exited (a child it started
# may hold them) before its exit is reported anyway.
_DRAIN_SECONDS = 2.0
# How long to wait for processes to disappear after SIGKILL (only a process
# stuck in the kernel survives longer) before giving up on them.
_REAP_SECONDS = 5.0


def free_ports(n, host=HOST):
  """Returns `n` distinct TCP ports on `host` that were free a moment ago (and may be taken now)."""
  socks, ports = _reserve_ports(n, host)
  for s in socks:
    s.close()
  return ports


def _reserve_ports(n, host=HOST):
  """Binds `n` sockets to port 0 at once, so the kernel hands out distinct ports.

  Returns (sockets, ports); the caller closes each socket when its port is needed.
  """
  socks = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      socks.append(s)
      s.bind((host, 0))
  except OSError:
    for s in socks:
      s.close()
    raise
  return socks, [s.getsockname()[1] for s in socks]


def tf_config(ports, index, host=HOST):
  """The TF_CONFIG JSON string for worker `index` of a cluster on `host`:`ports`.

  Every worker gets the same `cluster.worker` list and its own `task.index`;
  index 0 is the chief.
  """
  return json.dumps({
      'cluster': {'worker': [f'{host}:{p}' for p in ports]},
      'task': {'type': 'worker', 'index': index},
  })


def worker_args(flags):
  """The worker's arguments: `flags` plus `--config.runtime.strategy=multi_worker`
  unless `flags` already set a strategy (as `--config.runtime.strategy=X` or
  `--config.runtime.strategy X`, with one or two dashes)."""
  flags = list(flags)
  # absl stops parsing flags at a bare '--'; look before it, and insert there.
  end = flags.index('--') if '--' in flags else len(flags)
  for a in flags[:end]:
    name = a.lstrip('-').split('=', 1)[0]
    if a.startswith('-') and '--' + name == STRATEGY_FLAG:
      return flags
  return flags[:end] + [f'{STRATEGY_FLAG}={DEFAULT_STRATEGY}'] + flags[end:]


def describe_exit(code):
  """'exit code 3' or 'signal SIGKILL', from a Popen returncode."""
  if code is not None and code < 0:
    try:
      return f'signal {signal.Signals(-code).name}'
    except ValueError:
      return f'signal {-code}'
  return f'exit code {code}'


def _exit_status(code):
  """The launcher's exit status for a failed worker: its code, or 1 if a signal killed it."""
  return code if code and code > 0 else errors.EXIT_FAILED


def _die_with_parent():
  """A preexec_fn that SIGTERMs the worker when the launcher dies (Linux), or None.

  Workers run in their own session (so a terminal's Ctrl-C reaches only the
  launcher, which forwards exactly one SIGTERM); without this a launcher killed
  with SIGKILL would leave them running. SIGTERM rather than SIGKILL, so they
  still save a checkpoint.
  """
  if not sys.platform.startswith('linux'):
    return None
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent, sig = os.getpid(), int(signal.SIGTERM)

  def preexec():
    prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before prctl took effect
      os.kill(os.getpid(), sig)

  return preexec


def _start_without_signals(threads):
  """Starts `threads` with SIGINT and SIGTERM blocked in them.

  The kernel hands a process-directed signal to any thread that does not block
  it. Caught by a reader thread, Python would only run the handler once the
  main thread wakes up from its wait on the event queue, possibly many seconds
  later; blocked in every other thread, the signal interrupts that wait at once.
  New threads inherit the mask of the thread that starts them.
  """
  masks = hasattr(signal, 'pthread_sigmask')
  if masks:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
  try:
    for t in threads:
      t.start()
  finally:
    if masks:
      signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Printer:
  """Writes whole lines to `out` from many threads; a lock keeps lines from interleaving."""

  def __init__(self, out):
    self._out = out
    self._lock = threading.Lock()

  def line(self, text):
    with self._lock:
      try:
        try:
          self._out.write(text + '\n')
        except UnicodeEncodeError:  # a stdout that cannot show the worker's characters
          encoding = getattr(self._out, 'encoding', None) or 'ascii'
          self._out.write(text.encode(encoding, 'backslashreplace').decode(encoding) + '\n')
        self._out.flush()
      except (OSError, ValueError):
        pass  # our stdout went away (closed pipe): keep supervising regardless


class _Worker:
  """One worker process and what the launcher did to it."""

  def __init__(self, index, port, proc):
    self.index = index
    self.port = port
    self.proc = proc
    self.code = None  # Popen returncode once it exited
    self.terminated = False  # the launcher sent it SIGTERM
    self.killed = False  # the launcher sent it SIGKILL


class _Cluster:
  """Runs rounds of workers until success, failure, timeout or a signal."""

  def __init__(self, module, flags, num_workers, restarts, timeout, grace_seconds, out):
    self.module = module
    self.args = worker_args(flags)
    self.num_workers = num_workers
    self.restarts = restarts
    self.timeout = timeout
    self.grace = grace_seconds
    self.printer = _Printer(out)
    # One queue for the whole run: waiter threads put ('exit', round, index, code),
    # the signal handler ('signal', signum). SimpleQueue.put is reentrant, so the
    # handler may call it even while the main thread is inside get().
    self.events = queue.SimpleQueue()
    self.signals = []  # every SIGINT/SIGTERM the launcher received
    self.handled = 0  # how many of them the supervising loop has acted on
    self.round = 0

  def say(self, text):
    self.printer.line(f'[cluster] {text}')

  def on_signal(self, signum, frame):
    del frame
    self.signals.append(signum)
    self.events.put(('signal', signum))

  def run(self):
    deadline = time.monotonic() + self.timeout
    for attempt in range(self.restarts + 1):
      code, kind, message = self.run_round(deadline)
      if kind != 'preempted':
        break
      if attempt < self.restarts and not self.signals and time.monotonic() < deadline:
        self.say(f'{message}; restart {attempt + 1}/{self.restarts}')
        continue
      if attempt < self.restarts:
        why = 'not restarting: ' + ('the launcher was signalled' if self.signals
                                    else 'the timeout has passed')
      elif self.restarts:
        why = f'no restarts left ({self.restarts} used)'
      else:
        why = 'pass --restarts=K to relaunch automatically'
      message = f'{message}; {why}; the same command resumes from the checkpoint'
      break
    self.say(message)
    return code

  def spawn(self):
    """Starts the workers of a new round on fresh ports."""
    self.round += 1
    socks, ports = _reserve_ports(self.num_workers)
    workers = []
    command = shlex.join(['python', '-m', self.module] + self.args)
    self.say(f'starting {self.num_workers} workers: {command}')
    preexec = _die_with_parent()
    try:
      for i, sock in enumerate(socks):
        env = dict(os.environ, TF_CONFIG=tf_config(ports, i))
        # Python workers block-buffer a piped stdout: unbuffered, their lines
        # arrive as they are printed and survive a SIGKILL.
        env.setdefault('PYTHONUNBUFFERED', '1')
        sock.close()  # free the port for this worker, as late as possible
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, '-m', self.module] + self.args, cwd=pipeline.ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=preexec)
        workers.append(_Worker(i, ports[i], proc))
    except BaseException:
      for s in socks:
        s.close()
      self.kill(workers)
      for w in workers:
        w.proc.wait()
      raise
    # Start lines first, then the reader threads, so they precede all worker output.
    for w in workers:
      self.say(f'worker {w.index} pid {w.proc.pid} port {w.port}')
    threads = []
    for w in workers:
      prefix = f'[worker {w.index}] '
      readers = [threading.Thread(target=self.pump, args=(pipe, prefix), daemon=True)
                 for pipe in (w.proc.stdout, w.proc.stderr)]
      threads += readers
      threads.append(threading.Thread(target=self.watch, args=(w, readers, self.round),
                                      daemon=True))
    _start_without_signals(threads)
    return workers

  def pump(self, pipe, prefix):
    with pipe:
      for raw in iter(pipe.readline, b''):
        self.printer.line(prefix + raw.decode('utf-8', 'replace').rstrip('\r\n'))

  def watch(self, worker, readers, round_):
    code = worker.proc.wait()
    # Report the exit after the worker's last lines, so they precede it.
    for t in readers:
      t.join(_DRAIN_SECONDS)
    self.events.put(('exit', round_, worker.index, code))

  def terminate(self, workers, now, message):
    """Says `message` and sends `workers` SIGTERM; returns when they are due SIGKILL."""
    self.say(message)
    for w in workers:
      w.terminated = True
      try:
        w.proc.send_signal(signal.SIGTERM)
      except ProcessLookupError:
        pass
    return now + self.grace

  def kill(self, workers):
    """SIGKILLs `workers`; returns when to stop waiting for them to disappear."""
    # The whole process group (it is the worker's session), so children the
    # worker started die too and release its output pipes.
    for w in workers:
      w.killed = True
      try:
        os.killpg(w.proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        try:
          w.proc.kill()
        except ProcessLookupError:
          pass
    return time.monotonic() + _REAP_SECONDS

  def run_round(self, deadline):
    """Runs one launch of the cluster; returns (exit code, kind, message)."""
    workers = self.spawn()
    running = {w.index: w for w in workers}
    exited = []  # in the order the launcher saw them exit
    reason = None  # why the launcher is stopping the workers: failure/preempted/timeout/signal
    root = None  # the first worker that exited non-zero on its own
    kill_at = give_up_at = None
    while running:
      wakes = [t for t in (deadline if reason is None else None, kill_at, give_up_at)
               if t is not None]
      wake = min(wakes, default=None)  # none: only an event can change anything
      try:
        event = self.events.get(
            timeout=None if wake is None else max(0.0, wake - time.monotonic()))
      except queue.Empty:
        event = None
      now = time.monotonic()
      if event is None:
        if give_up_at is not None and now >= give_up_at:
          pids = ', '.join(str(w.proc.pid) for w in running.values())
          self.say(f'pids {pids} survived SIGKILL for {_REAP_SECONDS:g}s; giving up on them')
          break
        if kill_at is not None and now >= kill_at:
          self.say(f'{len(running)} worker(s) still running {self.grace:g}s after SIGTERM; '
                   'sending SIGKILL')
          kill_at, give_up_at = None, self.kill(running.values())
        elif reason is None and now >= deadline:
          reason = 'timeout'
          kill_at = self.terminate(running.values(), now, f'timeout after {self.timeout:g}s; '
                                   f'stopping the workers (SIGTERM, SIGKILL after {self.grace:g}s)')
        continue
      if event[0] == 'signal':
        name = signal.Signals(event[1]).name
        self.handled += 1
        if self.handled > 1:
          self.say(f'{name} again; killing the workers now')
          kill_at, give_up_at = None, self.kill(running.values())
        elif reason is None:
          reason = 'signal'
          kill_at = self.terminate(
              running.values(), now, f'got {name}; forwarding SIGTERM to the workers so they '
              f'checkpoint (SIGKILL after {self.grace:g}s; {name} again kills them now)')
        continue
      _, round_, index, code = event
      if round_ != self.round or index not in running:
        continue  # a worker of an earlier round we gave up on
      w = running.pop(index)
      w.code = code
      exited.append(w)
      by_us = (' (the launcher sent SIGKILL)' if w.killed else
               ' (the launcher sent SIGTERM)' if w.terminated else '')
      self.say(f'worker {index} ended: {describe_exit(code)}{by_us}')
      if code != 0 and reason is None:
        root = w
        reason = 'preempted' if code == errors.EXIT_PREEMPTED else 'failure'
        if running:
          kill_at = self.terminate(running.values(), now, 'stopping the other workers '
                                   f'(SIGTERM, SIGKILL after {self.grace:g}s)')
    return self.outcome(workers, exited, reason, root, bool(running))

  def outcome(self, workers, exited, reason, root, abandoned):
    """The round's (exit code, kind, one-line message)."""
    others = '; stopped the others' if any(w.terminated or w.killed for w in workers) else ''
    if reason == 'failure':
      return (_exit_status(root.code), 'failed',
              f'worker {root.index} failed with {describe_exit(root.code)}{others}')
    if reason == 'preempted':
      # The preempted worker saved a checkpoint; how the others ended after the
      # launcher stopped them does not change that (checkpoints are only ever
      # replaced by complete ones), so this is a preemption either way.
      return (errors.EXIT_PREEMPTED, 'preempted',
              f'preempted (worker {root.index} exited {errors.EXIT_PREEMPTED}{others})')
    if reason == 'timeout':
      return (errors.EXIT_TIMEOUT, 'timeout',
              f'timeout: workers still running after {self.timeout:g}s; stopped them (exit '
              f'{errors.EXIT_TIMEOUT})')
    if reason == 'signal':
      name = signal.Signals(self.signals[0]).name
      bad = [w for w in exited if w.code not in (0, errors.EXIT_PREEMPTED)]
      if bad:
        return (_exit_status(bad[0].code), 'failed',
                f'stopped by {name}, but worker {bad[0].index} ended with '
                f'{describe_exit(bad[0].code)} instead of saving a checkpoint')
      if abandoned:
        return (errors.EXIT_FAILED, 'failed',
                f'stopped by {name}, but some workers could not be reaped')
      return (errors.EXIT_PREEMPTED, 'signalled',
              f'stopped by {name}; all workers exited 0 or {errors.EXIT_PREEMPTED} (exit '
              f'{errors.EXIT_PREEMPTED}: the same command resumes from the checkpoint)')
    return errors.EXIT_OK, 'ok', f'all {len(workers)} workers exited 0'


def run_cluster(module=DEFAULT_MODULE, flags=(), num_workers=2, restarts=0, timeout=3600.0,
                grace_seconds=10.0, out=None):
  """Runs `python -m module flags...` as `num_workers` local workers; returns an exit status.

  Args:
    module: the worker's module, run with this interpreter from the repo root.
    flags: arguments passed to every worker unchanged, plus
      `--config.runtime.strategy=multi_worker` if they set no strategy.
    num_workers: how many workers (>= 1); worker 0 is the chief.
    restarts: how many times to relaunch the cluster (on new ports) after a
      preemption.
    timeout: seconds for the whole run, restarts included.
    grace_seconds: how long a worker may take to exit after SIGTERM before it
      gets SIGKILL.
    out: text stream for `[cluster]` and `[worker i]` lines (default sys.stdout).

  Returns:
    The cluster's exit status, as the module docstring lists them.

  SIGINT and SIGTERM handlers are installed while it runs (from the main
  thread only; elsewhere signals are left alone) and restored afterwards.
  """
  if num_workers < 1:
    raise ValueError(f'num_workers must be >= 1, got {num_workers}')
  if restarts < 0 or timeout <= 0 or grace_seconds < 0:
    raise ValueError('restarts and grace_seconds must be >= 0 and timeout > 0')
  cluster = _Cluster(module, flags, num_workers, restarts, timeout, grace_seconds,
                     sys.stdout if out is None else out)
  old = {}
  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGINT, signal.SIGTERM):
      old[s] = signal.signal(s, cluster.on_signal)
  try:
    return cluster.run()
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
