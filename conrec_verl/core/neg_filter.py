"""The deployment negative filter of CoNRec (pure numpy; no verl, no torch).

Offline, the model predicts a set of negative SIDs per user. Online, each recall/ranking
candidate is compared with those predictions through codebook-reconstructed embeddings
(:meth:`conrec_verl.core.sid.Codebook.embed_many`): a candidate whose cosine similarity to *any*
predicted negative is ``>= threshold`` is removed. No LLM call at serving time.

Everything is matrix operations: a user's candidates against the user's predictions is one
``(C, d) @ (d, P)`` product; :meth:`NegativeFilter.max_similarity_batch` does many users at once
as padded batched products in memory-bounded chunks (``benchmarks/bench_neg_filter.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from conrec_verl.core.sid import Codebook

_EPS = 1e-12


def _as_codes(codes, num_levels: int, what: str) -> np.ndarray:
    arr = np.asarray(codes, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, num_levels)
    if arr.ndim != 2 or arr.shape[1] != num_levels:
        raise ValueError(f"{what}: expected an (N, {num_levels}) array of SID codes, got shape {arr.shape}")
    return arr


class NegativeFilter:
    """Remove candidates too similar to a user's predicted negatives.

    ``threshold`` is on cosine similarity in [-1, 1]; ``max_sim >= threshold`` -> removed.
    """

    def __init__(self, codebook: Codebook, threshold: float = 0.9):
        if not -1.0 <= float(threshold) <= 1.0 + 1e-9:
            raise ValueError(f"threshold is a cosine similarity and must be in [-1, 1], got {threshold}")
        self.codebook = codebook
        self.threshold = float(threshold)

    def unit_embeddings(self, codes) -> np.ndarray:
        """L2-normalised reconstructed embeddings, ``(N, dim)`` float32 (zero vectors stay zero)."""
        codes = _as_codes(codes, self.codebook.num_levels, "SIDs")
        emb = self.codebook.embed_many(codes)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, _EPS)

    def max_similarity(self, predicted, candidates) -> np.ndarray:
        """For each candidate, the highest cosine similarity to any predicted negative.

        ``-inf`` for every candidate when the user has no predictions (nothing is filtered).
        """
        cand = self.unit_embeddings(candidates)
        pred = self.unit_embeddings(predicted)
        if pred.shape[0] == 0:
            return np.full(cand.shape[0], -np.inf, dtype=np.float32)
        return (cand @ pred.T).max(axis=1)

    def keep_mask(self, predicted, candidates) -> np.ndarray:
        """Boolean mask over ``candidates``: True = keep."""
        return self.max_similarity(predicted, candidates) < self.threshold

    def filter(self, predicted, candidates) -> tuple[np.ndarray, np.ndarray]:
        """``(kept_indices, removed_indices)`` into ``candidates``."""
        keep = self.keep_mask(predicted, candidates)
        return np.flatnonzero(keep), np.flatnonzero(~keep)

    def max_similarity_batch(
        self,
        predicted: Sequence,
        candidates: Sequence,
        chunk_elements: int = 8_000_000,
    ) -> list[np.ndarray]:
        """:meth:`max_similarity` for many users at once.

        ``predicted[u]`` and ``candidates[u]`` are user ``u``'s ``(P_u, L)`` / ``(C_u, L)`` code arrays.
        Users are processed in chunks as one padded batched matrix product
        ``(U, C_max, d) @ (U, d, P_max)``; a chunk holds at most ``chunk_elements`` similarity
        entries. Embeddings are computed once for the unique SIDs involved.
        """
        if len(predicted) != len(candidates):
            raise ValueError(f"{len(predicted)} prediction sets for {len(candidates)} candidate lists")
        L = self.codebook.num_levels
        preds = [_as_codes(p, L, f"predictions of user {u}") for u, p in enumerate(predicted)]
        cands = [_as_codes(c, L, f"candidates of user {u}") for u, c in enumerate(candidates)]
        out = [np.full(c.shape[0], -np.inf, dtype=np.float32) for c in cands]
        users = [u for u in range(len(preds)) if preds[u].shape[0] and cands[u].shape[0]]
        if not users:
            return out
        # embed each distinct SID once
        all_codes = np.concatenate([preds[u] for u in users] + [cands[u] for u in users], axis=0)
        # one int64 key per SID (mixed radix over the level sizes) -> fast 1-D unique
        key = np.zeros(all_codes.shape[0], dtype=np.int64)
        for level, size in enumerate(self.codebook.sizes):
            col = all_codes[:, level]
            if col.size and (col.min() < 0 or col.max() >= size):
                raise ValueError(f"level {level} code out of range 0..{size - 1}")
            key = key * int(size) + col
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        emb = self.unit_embeddings(all_codes[first])
        inverse = inverse.reshape(-1)
        sizes = [preds[u].shape[0] for u in users] + [cands[u].shape[0] for u in users]
        ids = np.split(inverse, np.cumsum(sizes)[:-1])
        pred_ids, cand_ids = ids[: len(users)], ids[len(users):]
        # sort users by candidate count so padding stays small
        order = sorted(range(len(users)), key=lambda j: (cand_ids[j].size, pred_ids[j].size))
        lo = 0
        while lo < len(order):
            hi = lo + 1
            c_max, p_max = cand_ids[order[lo]].size, pred_ids[order[lo]].size
            while hi < len(order):
                c2 = max(c_max, cand_ids[order[hi]].size)
                p2 = max(p_max, pred_ids[order[hi]].size)
                if (hi - lo + 1) * c2 * p2 > chunk_elements:
                    break
                c_max, p_max, hi = c2, p2, hi + 1
            chunk = order[lo:hi]
            n = len(chunk)
            c_idx = np.zeros((n, c_max), dtype=np.int64)
            p_idx = np.zeros((n, p_max), dtype=np.int64)
            p_valid = np.zeros((n, p_max), dtype=bool)
            for row, j in enumerate(chunk):
                c_idx[row, : cand_ids[j].size] = cand_ids[j]
                p_idx[row, : pred_ids[j].size] = pred_ids[j]
                p_valid[row, : pred_ids[j].size] = True
            sims = np.matmul(emb[c_idx], emb[p_idx].transpose(0, 2, 1))  # (n, c_max, p_max)
            if not p_valid.all():
                sims += np.where(p_valid, 0.0, -np.inf).astype(np.float32)[:, None, :]
            sims = sims.max(axis=2)
            for row, j in enumerate(chunk):
                out[users[j]] = sims[row, : cand_ids[j].size].astype(np.float32)
            lo = hi
        return out


def removal_sweep(
    max_sims: Sequence[np.ndarray],
    is_dislike: Sequence[np.ndarray],
    thresholds: Sequence[float],
) -> list[dict[str, float]]:
    """How many future dislikes vs future likes a threshold removes.

    ``max_sims[u]`` are the max similarities of user ``u``'s future items to the user's predicted
    negatives and ``is_dislike[u]`` says which of those items are dislikes (the others are likes).
    Returns one dict per threshold: ``threshold``, ``dislikes_removed`` (share of all future
    dislikes removed), ``likes_removed`` (share of future likes wrongly removed), the raw counts,
    and ``precision`` (share of removed items that are dislikes; ``None`` if nothing removed).
    """
    sims = np.concatenate([np.asarray(s, dtype=np.float64) for s in max_sims]) if max_sims else np.zeros(0)
    neg = np.concatenate([np.asarray(d, dtype=bool) for d in is_dislike]) if is_dislike else np.zeros(0, bool)
    if sims.shape != neg.shape:
        raise ValueError("max_sims and is_dislike must have the same lengths per user")
    n_neg = int(neg.sum())
    n_pos = int((~neg).sum())
    rows = []
    for th in thresholds:
        removed = sims >= float(th)
        rn = int((removed & neg).sum())
        rp = int((removed & ~neg).sum())
        rows.append({
            "threshold": float(th),
            "dislikes_removed": rn / n_neg if n_neg else None,
            "likes_removed": rp / n_pos if n_pos else None,
            "n_dislikes_removed": rn,
            "n_likes_removed": rp,
            "n_dislikes": n_neg,
            "n_likes": n_pos,
            "precision": rn / (rn + rp) if (rn + rp) else None,
        })
    return rows
