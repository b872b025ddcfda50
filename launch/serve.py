r"""Serves an exported charlstm SavedModel over HTTP: JSON, streaming, a web page.

  python -m launch.serve --saved_model=/tmp/run1/export --port=8000
  curl -s localhost:8000/v1/generate -d '{"prompt": "ROMEO:", "num_chars": 100, "seed": 1}'

Needs the serve extra (pip install -e .[serve]) and only the SavedModel, local
or gs://. Binds 127.0.0.1 unless --host says otherwise. Concurrent requests
share one in-graph batch (pipeline/serve/batcher.py).
"""

from absl import app
from absl import flags

from pipeline import errors

_SAVED_MODEL = flags.DEFINE_string('saved_model', None, 'SavedModel directory (local or gs://).')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; 0.0.0.0 for every interface.')
_PORT = flags.DEFINE_integer('port', 8000, 'TCP port; 0 picks a free one (printed).')
_BATCH_WINDOW_MS = flags.DEFINE_float(
    'batch_window_ms', 5.0, 'When idle, wait this long for more requests to share a batch.')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 64, 'Most rows in one batch, and prompts per request.')
_MAX_CHARS = flags.DEFINE_integer('max_chars', 2000, 'Most characters a request may ask for.')
_MAX_PROMPT_CHARS = flags.DEFINE_integer('max_prompt_chars', 4000, 'Longest prompt accepted.')
_CHUNK_CHARS = flags.DEFINE_integer('chunk_chars', 16, 'Characters per batch step (and event).')
_ACCESS_LOG = flags.DEFINE_bool('access_log', False, 'Log every request.')
flags.mark_flag_as_required('saved_model')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not 0 <= _PORT.value <= 65535:
    raise app.UsageError(f'--port must be in 0..65535, got {_PORT.value}')
  for name, flag in (('max_batch', _MAX_BATCH), ('max_chars', _MAX_CHARS),
                     ('max_prompt_chars', _MAX_PROMPT_CHARS), ('chunk_chars', _CHUNK_CHARS)):
    if flag.value < 1:
      raise app.UsageError(f'--{name} must be >= 1, got {flag.value}')
  if _BATCH_WINDOW_MS.value < 0:
    raise app.UsageError(f'--batch_window_ms must be >= 0, got {_BATCH_WINDOW_MS.value}')
  try:
    from pipeline.serve import server  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    errors.fail(f'launch.serve needs the serve extra ({e.name} is missing): '
                'pip install -e .[serve]')
  server.serve(_SAVED_MODEL.value, host=_HOST.value, port=_PORT.value,
               window_ms=_BATCH_WINDOW_MS.value, max_batch=_MAX_BATCH.value,
               max_chars=_MAX_CHARS.value, max_prompt_chars=_MAX_PROMPT_CHARS.value,
               chunk_chars=_CHUNK_CHARS.value, access_log=_ACCESS_LOG.value)


if __name__ == '__main__':
  errors.run(main)
