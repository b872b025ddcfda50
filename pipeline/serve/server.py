"""The HTTP server: a Starlette app over one Batcher, run by uvicorn.

Routes:
  POST /v1/generate  JSON in; JSON out, or server-sent events with stream=true:
                     `chunk` {"index", "text"} per chunk of a row, then `done`
                     with the texts and statistics (or `error`)
  GET  /v1/model     vocabulary, sizes, the training config, export time, limits
  GET  /healthz      {"status": "ok"} and the batcher's counters
  GET  /             the page (static/index.html and static/app.js)

A client that disconnects mid-stream cancels its rows: sse-starlette notices
the disconnect and cancels the response's generator, whose `finally` tells
the batcher, which drops the rows before its next chunk (rows_cancelled in
/healthz counts them).
"""

import asyncio
import contextlib
import json
import os
import socket
import sys
import time

import uvicorn
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.serve import batcher as batcher_lib
from pipeline.serve import engine as engine_lib
from pipeline.serve import request as request_lib

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')


@contextlib.asynccontextmanager
async def _submitted(batcher, rows):
  """Queues rows; on leaving (done, error, disconnect) cancels any row not finished."""
  finished = set()
  batcher.submit(rows)
  try:
    yield finished
  finally:
    batcher.cancel([r for r in rows if r.index not in finished])


async def _results(queue, rows, finished):
  """(kind, index, text) from the batcher until every row is done, or an error."""
  while len(finished) < len(rows):
    kind, index, text = await queue.get()
    if kind != 'chunk':
      finished.add(index)
    yield kind, index, text
    if kind == 'error':
      return


def _summary(req, texts, started, first):
  seconds = time.perf_counter() - started
  chars = sum(len(t) for t in texts)
  return {'texts': texts, 'chars': chars, 'seconds': round(seconds, 4),
          'chars_per_s': round(chars / seconds, 1) if seconds > 0 else None,
          'first_chunk_ms': None if first is None else round(first * 1000, 1),
          'seed': req.seed}


def build_app(engine, batcher, limits):
  """The Starlette app serving `engine` through `batcher`."""

  def rows_for(req, loop, queue):
    def emit(kind, row, text):
      loop.call_soon_threadsafe(queue.put_nowait, (kind, row.index, text))
    return [batcher_lib.Row(p, req.num_chars, req.temperature, req.top_k, req.seed + i,
                            emit, index=i, top_p=req.top_p, stop=req.stop)
            for i, p in enumerate(req.prompts)]

  async def generate(request):
    try:
      req = request_lib.parse(await request.body(), engine.chars, limits)
    except request_lib.BadRequest as e:
      return JSONResponse(e.body(), status_code=400)
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    rows = rows_for(req, loop, queue)
    started = time.perf_counter()
    if req.stream:
      return EventSourceResponse(_stream(req, rows, queue, started), ping=15)
    texts, first = [''] * len(rows), None
    async with _submitted(batcher, rows) as finished:
      async for kind, index, text in _results(queue, rows, finished):
        if kind == 'error':
          return JSONResponse({'error': text, 'field': None}, status_code=500)
        if kind == 'chunk':
          first = first or time.perf_counter() - started
          texts[index] += text
    body = _summary(req, texts, started, first)
    if req.single:
      body['text'] = texts[0]
    return JSONResponse(body)

  async def _stream(req, rows, queue, started):
    # Rows are queued only once the response streams: a client gone before
    # that costs nothing.
    texts, first = [''] * len(rows), None
    async with _submitted(batcher, rows) as finished:
      async with contextlib.aclosing(_results(queue, rows, finished)) as results:
        async for kind, index, text in results:
          if kind == 'error':
            yield ServerSentEvent(json.dumps({'error': text, 'index': index}), event='error')
            return
          if kind == 'chunk':
            first = first or time.perf_counter() - started
            texts[index] += text
            yield ServerSentEvent(json.dumps({'index': index, 'text': text}), event='chunk')
    yield ServerSentEvent(json.dumps(_summary(req, texts, started, first)), event='done')

  async def model(_):
    return JSONResponse({
        **engine.info(), 'limits': vars(limits),
        'batching': {'window_ms': batcher.window_s * 1000, 'max_rows': batcher.max_rows,
                     'chunk_chars': batcher.chunk_chars},
        'stats': batcher.stats.snapshot()})

  async def healthz(_):
    return JSONResponse({'status': 'ok', **batcher.stats.snapshot()})

  async def index(_):
    return FileResponse(os.path.join(STATIC_DIR, 'index.html'))

  return Starlette(routes=[
      Route('/', index),
      Route('/v1/generate', generate, methods=['POST']),
      Route('/v1/model', model),
      Route('/healthz', healthz),
      Mount('/static', StaticFiles(directory=STATIC_DIR), name='static'),
  ])


def _listen(host, port):
  """Binds before uvicorn does, so a taken port is a one-line error and port 0 works."""
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  try:
    return socket.create_server((host, port), family=family)
  except OSError as e:
    raise engine_lib.ServeError(f'Cannot listen on {host}:{port}: {e.strerror or e}. '
                                'Pick another --port or --host.') from None


def serve(saved_model, host='127.0.0.1', port=8000, window_ms=5.0, max_batch=64,
          max_chars=2000, max_prompt_chars=4000, chunk_chars=16, access_log=False):
  """Loads the export once and serves it until interrupted."""
  engine = engine_lib.Engine(saved_model)
  sock = _listen(host, port)
  batcher = batcher_lib.Batcher(engine, window_s=window_ms / 1000, max_rows=max_batch,
                                chunk_chars=chunk_chars).start()
  limits = request_lib.Limits(max_chars=max_chars, max_batch=max_batch,
                              max_prompt_chars=max_prompt_chars)
  app = build_app(engine, batcher, limits)
  config = uvicorn.Config(app, log_level='info', access_log=access_log, lifespan='off',
                          timeout_graceful_shutdown=3)
  bound = sock.getsockname()[1]
  print(f'charlstm: serving {saved_model} (H={engine.hidden_size}, '
        f'{engine.num_layers} layer(s), {len(engine.chars)} chars) on '
        f'http://{host}:{bound}/', file=sys.stderr, flush=True)
  try:
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    batcher.close()
