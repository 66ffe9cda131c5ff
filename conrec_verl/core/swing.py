"""Swing co-dislike similarity on the negative-feedback graph (pure; scipy.sparse, no verl).

The CoNRec formula (``docs`` of the method: "Swing on the negative graph")::

    Swi(i, j) = sum_{u in C} sum_{v in C, v != u}
                1 / ((|I(u)| + a1)^theta * (|I(v)| + a1)^theta)
                * Id(|C|) / (|I(u) & I(v)| + a2) * 1 / sqrt(N_j)

with ``C = U(i) & U(j)`` (users who disliked both), ``I(u)`` the items ``u`` disliked, ``N_j`` the
number of users who disliked ``j`` and ``Id(x) = 1 if x >= min_co_dislikers else 0`` (the paper's
"x > 5" is ``min_co_dislikers=6``). A (user, item) pair counts once however often it repeats.
``Swi`` is not symmetric: only the ``1/sqrt(N_j)`` factor differs between ``(i, j)`` and ``(j, i)``.

Computation, with ``R`` the binary user x item dislike matrix:

1. ``C = R^T R`` gives every item pair's co-dislikers count; keep pairs ``i < j`` that pass ``Id``.
2. ``P[u, p] = R[u, i_p] * R[u, j_p]`` marks the co-dislikers of each kept pair ``p``.
3. ``W[u, v] = w_u w_v / (|I(u) & I(v)| + a2)`` for ``u != v``, ``w_u = (|I(u)| + a1)^-theta``, only
   for the user pairs in the pattern of ``P P^T`` (overlaps by sparse row dot products).
4. ``S_p = sum_u P[u, p] (W P)[u, p]`` is the double sum; divide by ``sqrt(N_j)`` or ``sqrt(N_i)``.

No Python loop runs over users or user pairs; kept pairs are processed in column blocks to bound
memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: The paper's co-occurrence threshold "|U(i) & U(j)| > 5".
PAPER_MIN_CO_DISLIKERS = 6


@dataclass(frozen=True)
class SwingParams:
    alpha1: float = 5.0
    alpha2: float = 1.0
    theta: float = 0.5
    min_co_dislikers: int = 2

    def __post_init__(self):
        if self.alpha2 <= -1:
            raise ValueError(f"swing alpha2 must be > -1 (|I(u)&I(v)| >= 1), got {self.alpha2}")
        if self.alpha1 <= -1:
            raise ValueError(f"swing alpha1 must be > -1 (|I(u)| >= 1), got {self.alpha1}")
        if int(self.min_co_dislikers) < 1:
            raise ValueError(f"swing min_co_dislikers must be >= 1, got {self.min_co_dislikers}")


def dislike_matrix(users: Sequence, items: Sequence) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Binary CSR user x item matrix from parallel id sequences, plus the user and item labels."""
    u_codes, u_labels = pd.factorize(pd.Series(users), sort=True)
    i_codes, i_labels = pd.factorize(pd.Series(items), sort=True)
    data = np.ones(len(u_codes), dtype=np.float64)
    m = sp.csr_matrix((data, (u_codes, i_codes)), shape=(len(u_labels), len(i_labels)))
    m.data[:] = 1.0  # duplicates were summed: binarise
    return m, np.asarray(u_labels), np.asarray(i_labels)


def co_dislike_counts(R: sp.csr_matrix) -> sp.csr_matrix:
    """Upper-triangular (``i < j``) item pair co-dislikers counts ``|U(i) & U(j)|``."""
    C = (R.T @ R).tocsr()
    return sp.triu(C, k=1).tocsr()


def pairs_at_thresholds(R: sp.csr_matrix, thresholds: Sequence[int]) -> dict[int, int]:
    """How many unordered item pairs have at least ``t`` co-dislikers, for each ``t``."""
    C = co_dislike_counts(R)
    return {int(t): int((C.data >= max(int(t), 2)).sum()) for t in thresholds}


def item_coverage_at_thresholds(R: sp.csr_matrix, thresholds: Sequence[int]) -> dict[int, float]:
    """Share of disliked items that have at least one partner with ``>= t`` co-dislikers."""
    C = co_dislike_counts(R).tocoo()
    n_items = int((np.asarray(R.sum(axis=0)).ravel() > 0).sum())
    out = {}
    for t in thresholds:
        keep = C.data >= max(int(t), 2)
        covered = np.unique(np.concatenate([C.row[keep], C.col[keep]]))
        out[int(t)] = float(len(covered) / n_items) if n_items else 0.0
    return out


def choose_min_co_dislikers(R: sp.csr_matrix, target_coverage: float,
                            candidates: Sequence[int] = (6, 5, 4, 3, 2)) -> int:
    """The strictest threshold (``Id(x) = x >= t``, candidates tried from strict to loose) under
    which at least ``target_coverage`` of the disliked items have a co-disliked partner; the
    loosest candidate when none does. The paper's ``x > 5`` (6) leaves Swing almost empty on
    small public logs, hence a data-driven default."""
    cov = item_coverage_at_thresholds(R, candidates)
    ordered = sorted({int(c) for c in candidates}, reverse=True)
    for t in ordered:
        if cov[t] >= target_coverage:
            return t
    return ordered[-1]


def _row_overlaps(R: sp.csr_matrix, us: np.ndarray, vs: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
    """``|I(u) & I(v)|`` for each pair ``(us[k], vs[k])`` (row dot products, chunked)."""
    out = np.empty(len(us), dtype=np.float64)
    for s in range(0, len(us), chunk):
        a = R[us[s:s + chunk]]
        b = R[vs[s:s + chunk]]
        out[s:s + chunk] = np.asarray(a.multiply(b).sum(axis=1)).ravel()
    return out


def kept_pairs(R: sp.csr_matrix, min_co_dislikers: int, items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Item pairs ``(i, j)``, ``i < j``, with at least ``min_co_dislikers`` (and 2) co-dislikers,
    sorted by ``(i, j)``. ``items`` restricts ``i`` to those item columns (an item partition: the
    pairs of disjoint partitions are disjoint and together give all pairs)."""
    thr = max(int(min_co_dislikers), 2)  # u != v needs two co-dislikers
    if items is None:
        C = co_dislike_counts(R).tocoo()
        keep = C.data >= thr
        I, J = C.row[keep].astype(np.int64), C.col[keep].astype(np.int64)
    else:
        items = np.asarray(items, dtype=np.int64)
        C = (R[:, items].T @ R).tocoo()  # rows: the partition's items, columns: every item
        I = items[C.row]
        keep = (C.data >= thr) & (C.col > I)
        I, J = I[keep], C.col[keep].astype(np.int64)
    order = np.lexsort((J, I))
    return I[order], J[order]


def swing_pair_scores(R: sp.csr_matrix, params: SwingParams, block: int = 100_000,
                      items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The symmetric double sum ``S`` for every kept unordered pair: arrays ``(i, j, S)`` with ``i < j``,
    sorted by ``(i, j)`` (only pairs whose ``i`` is in ``items`` when given).

    ``Swi(i, j) = S / sqrt(N_j)``, ``Swi(j, i) = S / sqrt(N_i)``. User overlaps ``|I(u) & I(v)|``
    are computed only for user pairs that co-dislike some kept item pair (never a full ``R R^T``).
    Every pair's ``S`` is summed in ascending user order whatever else shares its block, so the
    result is bit-identical for any ``block`` and any item partition (the Ray path relies on it).
    """
    R = sp.csr_matrix(R, dtype=np.float64, copy=True)  # (a shared, read-only R from Ray's object store)
    R.data[:] = 1.0
    R.sort_indices()
    I, J = kept_pairs(R, params.min_co_dislikers, items)
    if I.size == 0:
        return I, J, np.zeros(0)
    n_users = R.shape[0]
    w = np.power(np.asarray(R.sum(axis=1)).ravel() + params.alpha1, -params.theta)
    Rc = R.tocsc()
    Rc.sort_indices()
    S = np.empty(I.size, dtype=np.float64)
    for start in range(0, I.size, block):
        stop = min(start + block, I.size)
        P = Rc[:, I[start:stop]].multiply(Rc[:, J[start:stop]]).tocsc()  # users x pairs: co-dislikers
        P.sort_indices()
        Q = (P @ P.T).tocoo()  # the user pairs that co-occur in some pair of this block
        off = Q.row != Q.col
        us, vs = Q.row[off].astype(np.int64), Q.col[off].astype(np.int64)
        del Q
        overlap = _row_overlaps(R, us, vs)
        W = sp.csr_matrix((w[us] * w[vs] / (overlap + params.alpha2), (us, vs)), shape=(n_users, n_users))
        W.sort_indices()  # (W P)[u, p] sums over v in ascending order
        WP = (W @ P).tocsc()
        WP.sort_indices()
        M = P.multiply(WP).tocsc()
        M.eliminate_zeros()
        S[start:stop] = _column_sums(M, stop - start)
    return I, J, S


def _column_sums(M: sp.csc_matrix, n_cols: int) -> np.ndarray:
    """Per-column sums of a CSC matrix, each a left-to-right sum in ascending row order."""
    M.sort_indices()
    out = np.zeros(n_cols, dtype=np.float64)
    nnz = np.diff(M.indptr)
    cols = np.flatnonzero(nnz)
    if cols.size:
        out[cols] = np.add.reduceat(M.data, M.indptr[:-1][cols])
    return out


def cap_dislikers(users: Sequence, items: Sequence, times: Sequence, max_per_item: int):
    """Keep, per item, only its ``max_per_item`` most recent dislikers (one row per (user, item),
    at its latest time). Bounds the cost of hot items (``sum_p |C_p|^2``); Swing is then exact on the
    capped graph."""
    df = pd.DataFrame({"u": np.asarray(users), "i": np.asarray(items), "t": np.asarray(times)})
    df = df.sort_values(["t", "u"], kind="stable").drop_duplicates(["u", "i"], keep="last")
    rank = df.groupby("i", sort=False).cumcount(ascending=False)
    df = df[rank.to_numpy() < int(max_per_item)]
    return df["u"].to_numpy(), df["i"].to_numpy()


def swing_scores(users: Sequence, items: Sequence, params: SwingParams = SwingParams(),
                 pair_scores=None) -> pd.DataFrame:
    """Directed Swing scores ``Swi(item, neighbor) > 0`` from a dislike log (one row per event).

    Returns columns ``item_id``, ``neighbor_id`` (labels as given) and ``score`` (float64).
    ``pair_scores(R, params)`` replaces :func:`swing_pair_scores` (data_prep's Ray engine passes its
    item-partitioned version).
    """
    R, _, i_labels = dislike_matrix(users, items)
    I, J, S = (pair_scores or swing_pair_scores)(R, params)
    n_dislikers = np.asarray(R.sum(axis=0)).ravel()
    pos = S > 0
    I, J, S = I[pos], J[pos], S[pos]
    src = np.concatenate([I, J])
    dst = np.concatenate([J, I])
    score = np.concatenate([S / np.sqrt(n_dislikers[J]), S / np.sqrt(n_dislikers[I])])
    return pd.DataFrame({"item_id": i_labels[src], "neighbor_id": i_labels[dst], "score": score})


def top_k_neighbors(scores: pd.DataFrame, k: int, min_score: float = 0.0) -> pd.DataFrame:
    """Each item's ``k`` best neighbours with ``score > min_score``; ties broken by neighbour id."""
    if k < 1:
        raise ValueError(f"swing top_k must be >= 1, got {k}")
    df = scores[scores["score"] > min_score]
    df = df.sort_values(["item_id", "score", "neighbor_id"], ascending=[True, False, True], kind="mergesort")
    return df.groupby("item_id", sort=False).head(k).reset_index(drop=True)


def swing_bruteforce(users: Sequence, items: Sequence, params: SwingParams = SwingParams()) -> dict:
    """The formula evaluated literally with Python loops (for tests on tiny logs only)."""
    I_of: dict = {}
    U_of: dict = {}
    for u, i in zip(users, items):
        I_of.setdefault(u, set()).add(i)
        U_of.setdefault(i, set()).add(u)
    out = {}
    for i in U_of:
        for j in U_of:
            if i == j:
                continue
            common = U_of[i] & U_of[j]
            if len(common) < params.min_co_dislikers:
                continue
            total = 0.0
            for u in common:
                for v in common:
                    if u == v:
                        continue
                    total += (1.0 / ((len(I_of[u]) + params.alpha1) ** params.theta
                                     * (len(I_of[v]) + params.alpha1) ** params.theta)
                              / (len(I_of[u] & I_of[v]) + params.alpha2))
            total /= np.sqrt(len(U_of[j]))
            if total > 0:
                out[(i, j)] = total
    return out
