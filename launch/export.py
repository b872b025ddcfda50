r"""Re-exports a SavedModel, or a LiteRT model, from a training workdir's checkpoint.

  python -m launch.export --workdir=/tmp/run1 --checkpoint=best
  python -m launch.export --workdir=/tmp/run1 --format=litert   # -> /tmp/run1/litert/

--format=litert writes model.tflite (the one-character step, builtin ops only)
and vocab.json; --workdir may then also be a SavedModel export directory
(pipeline/litert).
"""

from absl import app
from absl import flags

from pipeline import errors

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Training workdir (local or gs://); for --format=litert also an export dir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', "'best', 'latest' or a checkpoint path.")
_OUT = flags.DEFINE_string('export_dir', None, 'Where to write; default <workdir>/export, '
                           'or <workdir>/litert (<export dir>-litert) for --format=litert.')
_FORMAT = flags.DEFINE_enum('format', 'savedmodel', ['savedmodel', 'litert'],
                            'savedmodel, or litert: model.tflite + vocab.json for phones.')
_LITERT_BATCH = flags.DEFINE_integer('litert_batch', 1, 'Fixed batch of the LiteRT model.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _FORMAT.value == 'litert':
    from pipeline.litert import sampler  # pylint: disable=g-import-not-at-top
    sampler.interpreter_class()  # ai-edge-litert missing: one line, before importing TF
    from pipeline.litert import convert  # pylint: disable=g-import-not-at-top
    out, source, size = convert.export_litert(_WORKDIR.value, _CHECKPOINT.value, _OUT.value,
                                              _LITERT_BATCH.value)
    print(f'Exported {source} to {out} (model.tflite: {size} bytes)')
    return
  from pipeline import export  # pylint: disable=g-import-not-at-top
  out, ckpt = export.export_checkpoint(_WORKDIR.value, _CHECKPOINT.value, _OUT.value)
  print(f'Exported {ckpt} to {out}')


if __name__ == '__main__':
  errors.run(main)
