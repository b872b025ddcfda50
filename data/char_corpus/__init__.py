"""TFDS builder `char_corpus`: charlstm's corpora as a tensorflow-datasets dataset.

Importing this package registers the builder with TFDS. Prepare it with
`python -m launch.prepare --dataset=char_corpus/tinyshakespeare --data_dir=DIR`.
"""

from .char_corpus import CharCorpus, CharCorpusConfig  # noqa: F401
