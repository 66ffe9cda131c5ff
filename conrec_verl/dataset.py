"""Moved to :mod:`conrec_verl.plugins.dataset` (the verl adapters live in ``conrec_verl/plugins/``).

This alias keeps configs that name the old path (``pkg://conrec_verl.dataset``) working for one
release and warns where the module went; it will be removed in 0.2.
"""

import warnings

from conrec_verl.plugins.dataset import ConrecSidDataset  # noqa: F401

warnings.warn("conrec_verl.dataset moved to conrec_verl.plugins.dataset: use pkg://conrec_verl.plugins.dataset "
              "(the old path will be removed in 0.2)", DeprecationWarning, stacklevel=2)
