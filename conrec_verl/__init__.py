"""conrec-verl: CoNRec (negative recommendation with LLMs) as plugins for verl.

The package is split in two layers:

* ``conrec_verl.core`` -- pure modules (no verl import): semantic-ID codec and codebook,
  Swing co-dislike similarity, reward scoring, metrics, the progressive stage schedule,
  prompt rendering.
* ``conrec_verl.plugins`` -- the thin verl adapters, one module per verl extension point
  (``conrec_verl.plugins.entry_point`` registers them with verl through the ``verl.plugins`` entry
  point); ``conrec_verl.runtime`` -- running verl on a CPU and on one node;
* the applications beside them: the pipeline, the evaluation, the model builder, data_prep.
"""

import os as _os

__version__ = "0.1.0"

# In a checkout, data_prep/ and recipes/ sit beside this folder and are installed as
# conrec_verl.data_prep / conrec_verl.recipes (pyproject.toml, package-dir). When this package is
# imported from the checkout itself (the repository root first on sys.path, e.g. `python -m ...` run
# there), let those two subpackages resolve to the checkout's folders as well, whatever the install.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "data_prep"))
        and _os.path.isfile(_os.path.join(_root, "data_prep", "__init__.py"))
        and _os.path.isfile(_os.path.join(_root, "recipes", "__init__.py"))):
    __path__.append(_root)
