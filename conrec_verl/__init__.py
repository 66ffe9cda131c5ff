"""conrec-verl: CoNRec (negative recommendation with LLMs) as plugins for verl.

The package is split in two layers:

* ``conrec_verl.core`` -- pure modules (no verl import): semantic-ID codec and codebook,
  Swing co-dislike similarity, reward scoring, metrics, the progressive stage schedule,
  prompt rendering.
* thin verl adapters beside it (``conrec_verl.plugin`` registers them with verl through the
  ``verl.plugins`` entry point).
"""

__version__ = "0.1.0"
