r"""Runs a multi-worker training cluster on this machine, one process per worker.

  python -m launch.cluster --num_workers=2 [--restarts=K] [--timeout=SECONDS] \
      [--grace_seconds=S] [--module=launch.train] -- <flags for every worker>

  python -m launch.cluster --num_workers=2 --restarts=3 -- \
      --config=configs/shakespeare.py:smoke --workdir=/tmp/mw

Everything after `--` goes unchanged to each worker, which runs as
`python -m launch.train <flags>` from the repository root, plus
`--config.runtime.strategy=multi_worker` unless the flags choose a strategy.
Worker i gets TF_CONFIG

  {"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]},
   "task": {"type": "worker", "index": i}}

with free ports P0, P1. Output comes prefixed `[worker i] `; the launcher's own
lines start with `[cluster] `, e.g. `[cluster] worker 1 pid 4242 port 41733`.

Exit status: 0 when every worker exits 0. If one fails, the others get SIGTERM
(SIGKILL after --grace_seconds) and the launcher exits with that worker's code
(1 if a signal killed it). A worker exiting 75 was preempted after saving a
checkpoint: with --restarts=K the whole cluster is relaunched on new ports up
to K times (it resumes from the checkpoint), otherwise the launcher exits 75.
Ctrl-C or SIGTERM to the launcher forwards SIGTERM to every worker so they
checkpoint, and exits 75 if they all exited 0 or 75; a second one kills them.
After --timeout seconds (restarts included) everything is stopped: exit 124.

Real hosts
----------
On several machines there is no launcher: you run one worker per host
yourself. TF_CONFIG works the same way:

  * every host gets the same `cluster.worker` list, the `host:port` of every
    worker, in the same order;
  * each host gets a different `task.index`, its own position in that list;
  * worker 0 is the chief: it writes the checkpoints, TensorBoard summaries
    and the export;
  * every host gets the same --workdir, on storage they can all reach
    (e.g. gs://);
  * every host runs the same command,
    `python -m launch.train <flags> --config.runtime.strategy=multi_worker`;
  * each port must be free on its host and reachable from all the other hosts
    (open it in the firewall); the workers wait for each other at startup.

Two hosts, 10.0.0.1 and 10.0.0.2, port 2222 on each:

  # on 10.0.0.1 (chief)
  export TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                     "task": {"type": "worker", "index": 0}}'
  python -m launch.train --config=configs/shakespeare.py --workdir=gs://bucket/run1 \
      --config.runtime.strategy=multi_worker

  # on 10.0.0.2
  export TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                     "task": {"type": "worker", "index": 1}}'
  python -m launch.train --config=configs/shakespeare.py --workdir=gs://bucket/run1 \
      --config.runtime.strategy=multi_worker

To resume after a preemption (exit 75), run the same commands again on all
hosts. This launcher does exactly the above with `127.0.0.1` and free ports.
"""

from absl import flags

from pipeline import errors

_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Number of worker processes.',
                                    lower_bound=1)
_RESTARTS = flags.DEFINE_integer(
    'restarts', 0, 'Relaunch the whole cluster up to this many times after a preemption '
    '(a worker exiting 75).', lower_bound=0)
_TIMEOUT = flags.DEFINE_float('timeout', 3600, 'Seconds for the whole run, restarts '
                              'included; then every worker is stopped (exit 124).')
_GRACE = flags.DEFINE_float('grace_seconds', 10, 'Seconds a worker may take to exit after '
                            'SIGTERM (e.g. to save a checkpoint) before SIGKILL.',
                            lower_bound=0)
_MODULE = flags.DEFINE_string('module', 'launch.train', 'Worker module, run as '
                              '`python -m MODULE <flags after -->` from the repo root.')
flags.register_validator('timeout', lambda v: v > 0, message='--timeout must be > 0')


def main(argv):
  from pipeline.cloud import cluster  # pylint: disable=g-import-not-at-top
  return cluster.run_cluster(_MODULE.value, argv[1:], _NUM_WORKERS.value,
                             restarts=_RESTARTS.value, timeout=_TIMEOUT.value,
                             grace_seconds=_GRACE.value)


if __name__ == '__main__':
  errors.run(main)
