"""The HTTP server of `python -m launch.serve`: streams and batches a SavedModel's text.

  engine    the loaded export: prime / extend on numpy arrays, the model's facts
  batcher   one in-graph batch shared by concurrent requests, chunk by chunk
  request   POST /v1/generate's body, checked field by field (HTTP 400s)
  server    the Starlette app (JSON, server-sent events, the page) and uvicorn
  static/   the page at `/`: plain HTML and JS, no build step, no CDN

Needs the `serve` extra (pip install -e .[serve]). Like launch.sample it uses
only TensorFlow and the SavedModel, never the training code; the pipeline
core never imports this package.
"""
