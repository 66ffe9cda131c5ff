"""Common machinery of the non-LLM baselines: score every item of the catalogue per evaluation row.

A baseline learns only from what is known before each row's cutoff: the negative (dislike)
histories in the evaluation rows (``hist_neg``) and, for Swing, ``swing.parquet`` (built by
data_prep from dislikes before the cutoff). Training sequences are one per user, taken from the
user's *earliest* cutoff so that no row of that user can see its own future.

Top-K excludes the items of the row's own negative history by default (a disliked item is
filtered and rarely shown again); candidate scoring never excludes anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from conrec_verl.core.sid import Codes
from conrec_verl.evaluation.data import EvalData


def training_sequences(data: EvalData) -> list[list[Codes]]:
    """One negative sequence per user: ``hist_neg`` at the user's earliest cutoff (oldest first)."""
    first: dict[str, tuple[int, list[Codes]]] = {}
    for row in data.rows:
        if row.user_id not in first or row.cutoff_day < first[row.user_id][0]:
            first[row.user_id] = (row.cutoff_day, row.hist_neg)
    return [seq for _, seq in first.values() if seq]


class Baseline(ABC):
    """Scores the whole catalogue for each evaluation row; higher = more likely disliked."""

    name = "baseline"

    def __init__(self, exclude_history: bool = True, seed: int = 0):
        self.exclude_history = exclude_history
        self.seed = int(seed)
        self.data: EvalData | None = None

    def fit(self, data: EvalData) -> "Baseline":
        self.data = data
        self.catalogue: list[Codes] = data.catalogue
        self.index = {s: i for i, s in enumerate(self.catalogue)}
        self._fit(data)
        return self

    def _fit(self, data: EvalData) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    def row_scores(self, rows: Sequence[int]) -> np.ndarray:
        """``(len(rows), n_items)`` scores for the given evaluation row indices."""

    def _known(self, sids: Sequence[Codes]) -> list[int]:
        return [self.index[s] for s in sids if s in self.index]

    def recommend(self, k: int, batch: int = 256) -> list[list[Codes]]:
        """Top-``k`` distinct SIDs per evaluation row, best first (ties broken by catalogue order)."""
        assert self.data is not None, "call fit() first"
        n = len(self.catalogue)
        if k > n:
            raise ValueError(f"K={k} is larger than the number of items with a SID ({n})")
        out: list[list[Codes]] = []
        for lo in range(0, len(self.data.rows), batch):
            rows = list(range(lo, min(lo + batch, len(self.data.rows))))
            scores = np.asarray(self.row_scores(rows), dtype=np.float64).copy()
            for j, r in enumerate(rows):
                s = scores[j]
                if self.exclude_history:
                    hist = self._known(self.data.rows[r].hist_neg)
                    if n - len(set(hist)) >= k:
                        s[hist] = -np.inf
                # stable: argsort of -score keeps catalogue order among ties
                top = np.argsort(-s, kind="stable")[:k]
                out.append([self.catalogue[i] for i in top])
        return out

    def candidate_scores(self, batch: int = 256) -> list[list[float] | None]:
        """Scores of each row's candidates (for Candidate Acc); None where a row has none."""
        assert self.data is not None, "call fit() first"
        out: list[list[float] | None] = []
        for lo in range(0, len(self.data.rows), batch):
            rows = list(range(lo, min(lo + batch, len(self.data.rows))))
            scores = np.asarray(self.row_scores(rows), dtype=np.float64)
            for j, r in enumerate(rows):
                cands = self.data.rows[r].target.candidates
                out.append(None if cands is None else [float(scores[j, self.index[c]]) for c in cands])
        return out


class RandomBaseline(Baseline):
    """Uniformly random items (seeded per row, so reruns give the same numbers)."""

    name = "random"

    def row_scores(self, rows):
        return np.stack([np.random.default_rng([self.seed, r]).random(len(self.catalogue)) for r in rows])


class PopularityBaseline(Baseline):
    """The most disliked items: number of users whose pre-cutoff negative history holds the item."""

    name = "popularity"

    def _fit(self, data):
        counts = np.zeros(len(self.catalogue), dtype=np.float64)
        for seq in training_sequences(data):
            counts[sorted(set(self._known(seq)))] += 1.0
        self.counts = counts

    def row_scores(self, rows):
        return np.broadcast_to(self.counts, (len(rows), len(self.counts)))
