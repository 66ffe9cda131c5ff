"""Baselines scored by the same evaluation harness as the CoNRec model rows.

``BASELINES`` maps a name to a factory; every baseline has ``fit(data)``, ``recommend(k)`` and
``candidate_scores()`` (see :mod:`conrec_verl.baselines.base`).
"""

from conrec_verl.baselines.base import (
    Baseline,
    CoDislikeBaseline,
    PopularityBaseline,
    RandomBaseline,
    RecentPopularityBaseline,
    training_sequences,
)
from conrec_verl.baselines.sasrec import SASRecBaseline
from conrec_verl.baselines.swing import SwingBaseline

BASELINES = {
    "random": RandomBaseline,
    "popularity": PopularityBaseline,
    "recent_popularity": RecentPopularityBaseline,
    "swing": SwingBaseline,
    "codislike": CoDislikeBaseline,
    "sasrec": SASRecBaseline,
}
#: what conrec-eval runs by default: every baseline (the report's "best baseline" is the best of them)
DEFAULT_BASELINES = tuple(BASELINES)

__all__ = ["BASELINES", "DEFAULT_BASELINES", "Baseline", "CoDislikeBaseline", "PopularityBaseline", "RandomBaseline",
           "RecentPopularityBaseline", "SASRecBaseline", "SwingBaseline", "training_sequences"]
