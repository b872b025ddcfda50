"""charlstm: a tf.distribute training pipeline for character-level LSTM models.

The package is deliberately import-light: importing `pipeline` does not import
TensorFlow, so launchers can parse flags and fail fast before paying for it.
"""

import os

# The checkout (or, installed from the wheel, site-packages): where launch/,
# configs/ and data/ sit beside pipeline/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
