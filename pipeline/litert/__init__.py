"""LiteRT (TensorFlow Lite) export of the one-character step, and its reference sampler.

  convert.py  trained weights (a workdir's checkpoint, or a SavedModel export)
              -> model.tflite + vocab.json: one step (ids, h, c) -> (logits, h, c)
              as a float32, fixed-batch graph of builtin ops only (no Flex ops),
              written with plain matmul / gather / sigmoid / tanh ops, not the
              SavedModel's while-loop graph.
  sampler.py  runs model.tflite with the LiteRT interpreter (ai-edge-litert)
              and numpy only, carrying (h, c) on the host: the phone-side
              reference for greedy, temperature and top-k sampling.

Both need the `litert` extra (`pip install -e .[litert]`); nothing here is
imported by training or by the SavedModel export.
"""
