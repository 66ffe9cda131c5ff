"""Baselines scored by the same evaluation harness as the CoNRec model rows.

``BASELINES`` maps a name to a factory; every baseline has ``fit(data)``, ``recommend(k)`` and
``candidate_scores()`` (see :mod:`conrec_verl.baselines.base`).
"""

from conrec_verl.baselines.base import Baseline, PopularityBaseline, RandomBaseline, training_sequences
from conrec_verl.baselines.sasrec import SASRecBaseline
from conrec_verl.baselines.swing import SwingBaseline

BASELINES = {
    "random": RandomBaseline,
    "popularity": PopularityBaseline,
    "swing": SwingBaseline,
    "sasrec": SASRecBaseline,
}

__all__ = ["BASELINES", "Baseline", "PopularityBaseline", "RandomBaseline", "SASRecBaseline", "SwingBaseline",
           "training_sequences"]
