"""Common machinery of the non-LLM baselines: score every item of the catalogue per evaluation row.

A baseline learns only from what is known before the cutoffs: negative (dislike) histories
(``hist_neg``) and, for Swing, ``swing.parquet`` (built by data_prep from dislikes before the
cutoff). Training sequences are one per user (:func:`training_sequences`): an evaluated user's
history at the *earliest* evaluation cutoff (no row of that user can see its own future), and for
users that only appear in ``rl/train.parquet`` their latest training history. They come from every
row of the split (``EvalData.all_rows``), so they do not depend on ``max_rows``.

Top-K leaves out what the harness's exclusion rule names (``exclusion``: ``none`` | ``dislikes`` |
``interacted``, :data:`conrec_verl.core.eval_data.EXCLUSION_RULES`; model rows obey the same rule
inside the constrained search); candidate scoring never excludes anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

import scipy.sparse as sp

from conrec_verl.core.sid import Codes
from conrec_verl.core.eval_data import DEFAULT_EXCLUSION, EvalData, check_exclusion


def training_sequences(data: EvalData, train_split: str | None = "rl/train.parquet") -> list[list[Codes]]:
    """One negative sequence per user, oldest first, all of it before the user's cutoffs.

    Users with an evaluation row: ``hist_neg`` at their earliest evaluation cutoff. Users that only
    have training rows (``train_split``, when present): ``hist_neg`` at their latest training
    cutoff. Future windows of training rows are never used (they can overlap the test window).
    """
    first: dict[str, tuple[int, list[Codes]]] = {}
    for row in data.all_rows:
        if row.user_id not in first or row.cutoff_day < first[row.user_id][0]:
            first[row.user_id] = (row.cutoff_day, row.hist_neg)
    extra: dict[str, tuple[int, list[Codes]]] = {}
    path = data.data_dir / train_split if train_split else None
    if path is not None and path.is_file():
        import pyarrow.parquet as pq

        from conrec_verl.core.eval_data import EvalInputError, _sid_list

        table = pq.read_table(path, columns=[c for c in ("extra_info", "hist_neg") if c in pq.read_schema(path).names])
        if "hist_neg" in table.column_names and "extra_info" in table.column_names:
            infos = table.column("extra_info").to_pylist()
            hists = table.column("hist_neg").to_pylist()
            for i, (info, hist) in enumerate(zip(infos, hists)):
                if not info or "user_id" not in info or "cutoff_day" not in info:
                    raise EvalInputError(f"{path}: row {i}: column 'extra_info' lacks user_id / cutoff_day")
                user, day = str(info["user_id"]), int(info["cutoff_day"])
                if user in first or (user in extra and extra[user][0] >= day):
                    continue
                seq = _sid_list(hist, f"{path}: row {i}: column 'hist_neg'")
                extra[user] = (day, [s for s in seq if s in data.sid_items])
    return [seq for _, seq in list(first.values()) + list(extra.values()) if seq]


class Baseline(ABC):
    """Scores the whole catalogue for each evaluation row; higher = more likely disliked."""

    name = "baseline"

    def __init__(self, exclusion: str = DEFAULT_EXCLUSION, seed: int = 0, exclude_history: bool | None = None):
        if exclude_history is not None:  # the older boolean form: past dislikes or nothing
            exclusion = "dislikes" if exclude_history else "none"
        self.exclusion = check_exclusion(exclusion)
        self.seed = int(seed)
        self.data: EvalData | None = None
        self.n_rows_not_excluded = 0  # rows where fewer than K items would remain (exclusion skipped)

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
        self.n_rows_not_excluded = 0
        for lo in range(0, len(self.data.rows), batch):
            rows = list(range(lo, min(lo + batch, len(self.data.rows))))
            scores = np.asarray(self.row_scores(rows), dtype=np.float64).copy()
            for j, r in enumerate(rows):
                s = scores[j]
                drop = self._known(self.data.rows[r].excluded(self.exclusion))
                if drop:
                    if n - len(drop) >= k:
                        s[drop] = -np.inf
                    else:
                        self.n_rows_not_excluded += 1
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


def dislike_matrix(data: EvalData, index: dict[Codes, int]) -> sp.csr_matrix:
    """Binary ``(users, items)`` matrix of the training sequences (who disliked what before the cutoff)."""
    seqs = training_sequences(data)
    rows, cols = [], []
    for u, seq in enumerate(seqs):
        for i in {index[s] for s in seq if s in index}:
            rows.append(u)
            cols.append(i)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(seqs), len(index)), dtype=np.float64)


class RecentPopularityBaseline(Baseline):
    """Dislike popularity with recent dislikes weighted up: each training sequence adds
    ``0.5 ** (age / half_life)`` to each item it holds, ``age`` = how many dislikes of that user
    came after it (0 = the latest). Rows carry no timestamps, so recency is counted in a user's own
    dislikes; ``half_life=inf`` is plain popularity (each user counts an item once, at its latest
    occurrence)."""

    name = "recent_popularity"

    def __init__(self, half_life: float = 10.0, **kw):
        super().__init__(**kw)
        if not half_life > 0:
            raise ValueError(f"recent_popularity half_life must be > 0, got {half_life!r}")
        self.half_life = float(half_life)

    def _fit(self, data):
        counts = np.zeros(len(self.catalogue), dtype=np.float64)
        for seq in training_sequences(data):
            latest: dict[int, int] = {}
            for age, i in enumerate(reversed(self._known(seq))):
                latest.setdefault(i, age)
            for i, age in latest.items():
                counts[i] += 0.5 ** (age / self.half_life)
        self.counts = counts

    def row_scores(self, rows):
        return np.broadcast_to(self.counts, (len(rows), len(self.counts)))


class CoDislikeBaseline(Baseline):
    """Item-CF on co-dislike counts: ``score(u, j) = sum_{i in hist_neg(u)} C[i, j]`` with
    ``C = X^T X`` (``X`` the binary user x item dislike matrix of the training sequences, diagonal
    zeroed): how many users disliked both ``i`` and ``j``. ``normalize="cosine"`` divides ``C[i, j]``
    by ``sqrt(n_i n_j)``. Items with no co-dislike signal are ranked by dislike popularity behind
    every item that has one (``backfill``), as in the Swing baseline."""

    name = "codislike"

    def __init__(self, normalize: str = "none", backfill: bool = True, **kw):
        super().__init__(**kw)
        if normalize not in ("none", "cosine"):
            raise ValueError(f"codislike normalize must be 'none' or 'cosine', got {normalize!r}")
        self.normalize, self.backfill = normalize, bool(backfill)

    def _fit(self, data):
        X = dislike_matrix(data, self.index)
        C = (X.T @ X).tocsr()
        C.setdiag(0.0)
        C.eliminate_zeros()
        pop = np.asarray(X.sum(axis=0)).ravel()
        if self.normalize == "cosine":
            inv = 1.0 / np.sqrt(np.maximum(pop, 1.0))
            C = sp.diags(inv) @ C @ sp.diags(inv)
        self.matrix = sp.csr_matrix(C)
        self.pop = pop / (pop.max() + 1.0) if self.backfill else np.zeros(len(pop))

    def row_scores(self, rows):
        assert self.data is not None
        n = len(self.catalogue)
        h_rows, h_cols = [], []
        for j, r in enumerate(rows):
            for idx in set(self._known(self.data.rows[r].hist_neg)):
                h_rows.append(j)
                h_cols.append(idx)
        hist = sp.csr_matrix((np.ones(len(h_rows)), (h_rows, h_cols)), shape=(len(rows), n))
        co = np.asarray((hist @ self.matrix).todense())
        return np.where(co > 0, 1.0 + co, self.pop[None, :])
