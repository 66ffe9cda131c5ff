"""Moved to :mod:`conrec_verl.plugins.compute_score` (the verl adapters live in ``conrec_verl/plugins/``).

This alias keeps configs that name the old path (``pkg://conrec_verl.compute_score``) working for one
release and warns where the module went; it will be removed in 0.2.
"""

import warnings

from conrec_verl.plugins.compute_score import compute_score  # noqa: F401

warnings.warn("conrec_verl.compute_score moved to conrec_verl.plugins.compute_score: use pkg://conrec_verl.plugins.compute_score "
              "(the old path will be removed in 0.2)", DeprecationWarning, stacklevel=2)
