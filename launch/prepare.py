r"""Prepares a char_corpus TFDS dataset once, offline, for `data.corpus=tfds:...`.

  python -m launch.prepare --dataset=char_corpus/tinyshakespeare --data_dir=/data/tfds
  python -m launch.prepare --dataset=char_corpus/custom --data_dir=gs://BUCKET/tfds \
      --manual_dir=/path/to/my/texts

Then train with --config.data.corpus=tfds:char_corpus/tinyshakespeare
--config.data.tfds_data_dir=<the same data_dir>. Configs: tinyshakespeare and
quijote (the corpora bundled in data/), custom (your UTF-8 files in
--manual_dir). Nothing is downloaded. An existing prepared dataset is reused
unless --overwrite. Preparing streams the text twice and never holds it whole,
so a corpus may be larger than memory; train on such a corpus with
--config.data.tfds_streaming=true --config.data.mode=stream.
"""

from absl import app
from absl import flags

from pipeline import errors

_DATASET = flags.DEFINE_string(
    'dataset', None, 'char_corpus/CONFIG[:VERSION]: tinyshakespeare, quijote or custom.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', '', "TFDS data dir to write, local or gs://; '' = TFDS default "
    '($TFDS_DATA_DIR or ~/tensorflow_datasets).')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'custom config: a directory of UTF-8 text files (sub-directories too).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Regenerate even if the dataset is already prepared in --data_dir.')
_NUM_SHARDS = flags.DEFINE_integer(
    'num_shards', None, 'Files per split (default: TFDS picks, about 1 GiB each). More '
    'shards let a data.tfds_streaming run resume nearer to where it stopped.', lower_bound=1)
flags.mark_flag_as_required('dataset')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from pipeline import source  # pylint: disable=g-import-not-at-top
  path = source.prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value,
                             overwrite=_OVERWRITE.value, num_shards=_NUM_SHARDS.value)
  name = source.dataset_name(_DATASET.value)
  data_dir = f' --config.data.tfds_data_dir={_DATA_DIR.value}' if _DATA_DIR.value else ''
  print(f'Prepared {path}\nTrain on it with: --config.data.corpus=tfds:{name}{data_dir}')


if __name__ == '__main__':
  errors.run(main)
