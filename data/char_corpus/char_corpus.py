"""TFDS builder `char_corpus`: a text corpus as consecutive chunks, in order.

Configs:
  tinyshakespeare  data/tinyshakespeare.txt.gz, bundled with the repository.
  quijote          data/quijote.txt.gz, bundled with the repository.
  custom           your own UTF-8 text files, from the TFDS manual dir
                   (`download_config.manual_dir`; `launch.prepare --manual_dir`).

The text is streamed by `pipeline.text.pieces` (never held whole, so a
corpus may be larger than memory), exactly as training reads a plain-text
corpus: files in sorted path order (hidden ones skipped), joined
with '\n', strict UTF-8, NFC-normalised. Splits follow `pipeline.corpus.split`:
`validation` is the contiguous tail `val_fraction` of the characters (default
0.05, the default of `data.val_fraction`) and `train` is the rest. Each split
is cut into consecutive examples of `chars_per_example` characters (the last
one shorter), keyed by their index, with shuffling disabled, so reading a
split in order and joining the `text` features gives back the split's text.
The metadata records each split's `num_chars` and the `vocab` (sorted code
points of the whole text), which a streaming run (`data.tfds_streaming`) uses
instead of reading the text itself.

`val_fraction` and `chars_per_example` are fields of the config. The named
configs use the defaults; for another fraction pass your own config under a new
name (prepared datasets live in <data_dir>/char_corpus/<config name>/<version>):

  CharCorpusConfig(name='tinyshakespeare_val10', source='tinyshakespeare.txt.gz',
                   val_fraction=0.1)

Nothing is downloaded: the builder declares no URLs and reads local files only.
"""

import dataclasses
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

_DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
  from pipeline import corpus as corpus_lib
  from pipeline import text as text_lib
except ImportError:  # not installed: import it from the repository this file lives in
  sys.path.insert(0, os.path.dirname(_DATA_DIR))
  from pipeline import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from pipeline import text as text_lib  # pylint: disable=g-import-not-at-top

DEFAULT_VAL_FRACTION = 0.05  # = pipeline.config: data.val_fraction
DEFAULT_CHARS_PER_EXAMPLE = 1 << 16


@dataclasses.dataclass
class CharCorpusConfig(tfds.core.BuilderConfig):
  """A corpus and how it is split.

  Attributes:
    source: file name of a corpus bundled in the repository's data/ directory;
      None reads the manual dir instead (a directory of text files).
    val_fraction: contiguous tail fraction of the characters that forms the
      validation split (pipeline.corpus.split's rule).
    chars_per_example: characters per example; the last one of a split is shorter.
  """
  source: str | None = None
  val_fraction: float = DEFAULT_VAL_FRACTION
  chars_per_example: int = DEFAULT_CHARS_PER_EXAMPLE


class CharCorpus(tfds.core.GeneratorBasedBuilder):
  """A character-level text corpus, split into train and a contiguous validation tail."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      CharCorpusConfig(name='tinyshakespeare', source='tinyshakespeare.txt.gz',
                       description='Tiny Shakespeare (Karpathy), bundled as data/tinyshakespeare.txt.gz.'),
      CharCorpusConfig(name='quijote', source='quijote.txt.gz',
                       description='Don Quijote (Cervantes), bundled as data/quijote.txt.gz.'),
      CharCorpusConfig(name='custom', source=None,
                       description='Your own UTF-8 text files, read from the manual dir.'),
  ]
  DEFAULT_CONFIG_NAME = 'tinyshakespeare'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Only the `custom` config reads the manual dir. Put your UTF-8 text files in a
  directory (sub-directories are read too; files are joined in sorted path
  order with '\\n', hidden files are skipped) and pass it as
  `--manual_dir=DIR` to `python -m launch.prepare`, or as
  `tfds.download.DownloadConfig(manual_dir=DIR)`.
  """

  def _info(self):
    # DatasetInfo(builder=self): TFDS 4.9.10's dataset_info_from_configs()
    # fails for a builder in a plain module. disable_shuffling keeps the text
    # order; without it TFDS orders examples by a hash of their key.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'index': tfds.features.Scalar(dtype=np.int64),
            'text': tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            val_fraction=self.builder_config.val_fraction,
            chars_per_example=self.builder_config.chars_per_example,
            normalization='NFC'),
    )

  def _source(self, dl_manager):
    cfg = self.builder_config
    if cfg.source is not None:
      return os.path.join(_DATA_DIR, cfg.source)
    return os.fspath(dl_manager.manual_dir)

  def _split_generators(self, dl_manager):
    # Two streaming passes instead of holding the text: this one counts the
    # characters (to place the split) and collects the vocabulary; the
    # generators read the text again, each keeping only its split.
    cfg = self.builder_config
    if cfg.chars_per_example < 1:
      raise ValueError(f'chars_per_example must be >= 1, got {cfg.chars_per_example}.')
    source = self._source(dl_manager)
    total, seen = 0, set()
    for _, piece in text_lib.pieces(source):
      total += len(piece)
      seen.update(piece)
    if not total:
      raise corpus_lib.CorpusError(
          f'{source!r} is empty: the corpus needs some UTF-8 text.')
    # The rule of pipeline.corpus.split, applied to positions.
    n_train = len(corpus_lib.split(range(total), cfg.val_fraction)[0])
    self.info.metadata['num_chars'] = {'train': n_train, 'validation': total - n_train}
    # The vocabulary a plain-text run of the whole text would build (sorted
    # characters, as code points for JSON), so a streaming run needs no pass
    # over the text of its own.
    self.info.metadata['vocab'] = sorted(ord(c) for c in seen)
    return {
        'train': self._generate_examples(source, 0, n_train),
        'validation': self._generate_examples(source, n_train, total),
    }

  def _generate_examples(self, source, start, stop):
    """Yields examples of chars_per_example characters of the text's [start, stop)."""
    n = self.builder_config.chars_per_example
    pos, index, buf = 0, 0, []
    buffered = 0
    for _, piece in text_lib.pieces(source):
      lo, hi = max(start - pos, 0), min(stop - pos, len(piece))
      pos += len(piece)
      if lo >= hi:
        if pos >= stop:
          break
        continue
      buf.append(piece[lo:hi])
      buffered += hi - lo
      if buffered >= n:
        text = ''.join(buf)
        cut = len(text) - len(text) % n
        for k in range(0, cut, n):
          yield index, {'index': index, 'text': text[k:k + n]}
          index += 1
        buf, buffered = [text[cut:]], len(text) - cut
      if pos >= stop:
        break
    text = ''.join(buf)
    if text:
      yield index, {'index': index, 'text': text}
