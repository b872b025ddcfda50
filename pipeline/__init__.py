"""charlstm: a tf.distribute training pipeline for character-level LSTM models.

The package is deliberately import-light: importing `pipeline` does not import
TensorFlow, so launchers can parse flags and fail fast before paying for it.
"""
