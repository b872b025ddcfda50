"""Don Quijote (Spanish UTF-8), 2x256 LSTM, char-rnn-style streams with carried state.

Run:
  python -m launch.train --config=configs/quijote.py --workdir=/tmp/quijote
"""

from pipeline import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.corpus = config_lib.bundled('quijote.txt.gz')  # Bundled, ~1M chars incl. accented letters.
  c.data.mode = 'stream'  # Contiguous streams; (h, c) carried between batches.
  c.data.state_reset_prob = 0.03  # Occasional resets keep stuck streams from persisting.
  c.train.num_steps = 3000  # Stream mode sees each char once per 1M/(B*T) steps.
  return c
