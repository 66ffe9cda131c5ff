"""The paper's offline metrics, pure (no verl, no torch).

Per evaluation row (one user x cutoff day) a predictor supplies its top-K SIDs, best first, and
optionally a score for each of the row's 20 candidates. Hits reuse the reward's scoring code
(:func:`conrec_verl.core.sid.exact_hit` / :func:`best_prefix_depth`), so "a hit" means the
same thing in training and evaluation.

Definitions (K configurable, default 20; NDCG deliberately absent, as in the paper):

* ``HR@K``   the single next dislike is in the top K.
* ``FHR@K``  any dislike of the future window (``future_neg``) is in the top K. Main metric.
* ``LUF@K``  FHR@K restricted to long-tail users (``extra_info.long_tail_user``).
* ``LIF@K``  over rows that have long-tail future dislikes: one of *those* is in the top K.
* ``P1HR@K`` / ``P2HR@K``  some top-K prediction shares the first 1 / 2 SID levels with a future
  dislike (informative where most future dislikes are new items, e.g. KuaiRand).
* ``FHR_warm@K``  FHR@K over rows whose future window has at least one dislike with a SID.
* ``CandAcc``  the real future dislike gets the highest score among the row's candidates; ties at
  the top share the credit (1 / number tied), so a constant scorer gets exactly chance level.
* ``invalid_rate``  share of the top-K entries that are not a SID of this build.
* ``duplicate_rate`` share of the top-K entries repeating an earlier entry of the same row.
* ``fhr_ceiling``  share of scored rows with at least one future dislike that has a SID: no
  predictor can exceed it (far below 1 on cold-start-heavy logs).
* ``forget_rate(acc_after_alignment, acc_now)`` the paper's Table 3 forgetting measure.

Denominator [gap, our choice]: HR, FHR, LUF and the prefix hits count every row with at least one
future dislike, *including dislikes of items without a SID (cold)*; such a row is a miss unless a
warm dislike is hit, and a row whose next dislike is cold is an HR miss. This is the honest
number on cold-start-heavy logs; ``FHR_warm`` and ``cold_share`` are reported beside it. Rows with
no future dislike at all are not counted (nothing can be hit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from conrec_verl.core.sid import best_prefix_depth, exact_hit
from conrec_verl.core.sid import Codes

DEFAULT_KS = (1, 5, 10, 20)


@dataclass
class EvalTarget:
    """What one evaluation row's ground truth says (SIDs as code tuples)."""

    future_neg: list[Codes]
    next_neg: Codes | None = None
    long_tail_items: list[Codes] = field(default_factory=list)
    long_tail_user: bool = False
    n_future_neg_cold: int = 0
    candidates: list[Codes] | None = None
    candidate_target: int | None = None

    @property
    def has_future_dislike(self) -> bool:
        return bool(self.future_neg) or self.n_future_neg_cold > 0


#: a hit-rate metric name a checkpoint can be chosen by (``FHR@20``, ``HR@5``; :mod:`conrec_verl.evaluation.select`)
HIT_METRIC_RE = re.compile(r"^(FHR|HR)@([1-9][0-9]*)$")


def hit_at_k(preds: Sequence[Codes | None], targets: Sequence[Codes], k: int) -> bool:
    """Whether one of the first ``k`` predictions is exactly one of ``targets``."""
    return any(p is not None and exact_hit(p, targets) for p in preds[:k])


def prefix_hit_at_k(preds: Sequence[Codes | None], targets: Sequence[Codes], k: int, depth: int) -> bool:
    """Whether one of the first ``k`` predictions shares at least ``depth`` leading levels with a target."""
    if depth < 1:
        raise ValueError(f"prefix depth must be >= 1, got {depth}")
    return any(p is not None and best_prefix_depth(p, targets) >= depth for p in preds[:k])


def candidate_accuracy(scores: Sequence[float], target: int) -> float:
    """1 if ``target`` has the strictly highest score; 1/n if it ties with n-1 others at the top."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("candidate scores must be a non-empty 1-D sequence")
    if not 0 <= int(target) < arr.size:
        raise ValueError(f"candidate_target {target} outside 0..{arr.size - 1}")
    if np.isnan(arr).any():
        raise ValueError("candidate scores contain NaN")
    top = arr.max()
    if arr[int(target)] < top:
        return 0.0
    return 1.0 / float(np.count_nonzero(arr == top))


def forget_rate(acc_after_alignment: float, acc_now: float) -> float:
    """(acc after alignment SFT - acc now) / acc after alignment SFT (Table 3 of the paper)."""
    if not acc_after_alignment > 0:
        raise ValueError(f"accuracy after alignment must be > 0 to measure forgetting, got {acc_after_alignment}")
    return (float(acc_after_alignment) - float(acc_now)) / float(acc_after_alignment)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def metric_samples(
    predictions: Sequence[Sequence[Codes | None]],
    targets: Sequence[EvalTarget],
    ks: Sequence[int] = DEFAULT_KS,
    candidate_scores: Sequence[Sequence[float] | None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, int]]:
    """Per-row outcomes behind :func:`compute_metrics`.

    Returns ``(samples, row_index, counts)``: ``samples[name]`` is the list of per-row values whose
    mean is the metric (1/0 hits; CandAcc may be fractional on ties), ``row_index[name]`` the
    evaluation rows they come from (the same rows for every predictor of one split, so two
    predictors' samples are paired), and ``counts`` the slot counts of the invalid/duplicate rates.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction rows for {len(targets)} evaluation rows")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"K values must be >= 1, got {ks}")
    kmax = ks[-1]
    buckets: dict[str, list[float]] = {}
    rows_of: dict[str, list[int]] = {}

    def add(name: str, value: float, row: int) -> None:
        buckets.setdefault(name, []).append(float(value))
        rows_of.setdefault(name, []).append(row)

    n_slots = n_invalid = n_dup = 0
    warm = cold = 0
    for i, (preds, t) in enumerate(zip(predictions, targets)):
        top = list(preds[:kmax])
        n_slots += len(top)
        n_invalid += sum(p is None for p in top)
        seen: set[Codes] = set()
        for p in top:
            if p is None:
                continue
            n_dup += p in seen
            seen.add(p)
        warm += len(t.future_neg)
        cold += int(t.n_future_neg_cold)
        if not t.has_future_dislike:
            continue
        for k in ks:
            fhr = hit_at_k(top, t.future_neg, k)
            add(f"FHR@{k}", fhr, i)
            add(f"HR@{k}", t.next_neg is not None and hit_at_k(top, [t.next_neg], k), i)
            add(f"P1HR@{k}", prefix_hit_at_k(top, t.future_neg, k, 1) if t.future_neg else False, i)
            add(f"P2HR@{k}", prefix_hit_at_k(top, t.future_neg, k, 2) if t.future_neg else False, i)
            if t.future_neg:
                add(f"FHR_warm@{k}", fhr, i)
            if t.long_tail_user:
                add(f"LUF@{k}", fhr, i)
            if t.long_tail_items:
                add(f"LIF@{k}", hit_at_k(top, t.long_tail_items, k), i)
    if candidate_scores is not None:
        if len(candidate_scores) != len(targets):
            raise ValueError(f"{len(candidate_scores)} candidate-score rows for {len(targets)} evaluation rows")
        for i, (scores, t) in enumerate(zip(candidate_scores, targets)):
            if scores is None or t.candidates is None or t.candidate_target is None:
                continue
            if len(scores) != len(t.candidates):
                raise ValueError(f"{len(scores)} candidate scores for {len(t.candidates)} candidates")
            add("CandAcc", candidate_accuracy(scores, t.candidate_target), i)
    counts = {"slots": n_slots, "invalid": n_invalid, "duplicate": n_dup, "warm": warm, "cold": cold}
    return buckets, rows_of, counts


def compute_metrics(
    predictions: Sequence[Sequence[Codes | None]],
    targets: Sequence[EvalTarget],
    ks: Sequence[int] = DEFAULT_KS,
    candidate_scores: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, float | int | None]:
    """All metrics for one predictor over aligned ``predictions`` / ``targets`` rows.

    ``predictions[i]`` is row i's ranked list; ``None`` marks an entry that was not a valid SID
    (it still uses up a slot of the top K). A metric whose denominator is empty is ``None``.
    The per-row values behind each mean come from :func:`metric_samples`.
    """
    buckets, _, c = metric_samples(predictions, targets, ks, candidate_scores)
    ks = sorted({int(k) for k in ks})
    out: dict[str, float | int | None] = {}
    for k in ks:
        for name in ("HR", "FHR", "LUF", "LIF", "P1HR", "P2HR", "FHR_warm"):
            key = f"{name}@{k}"
            out[key] = _mean(buckets.get(key, []))
    out["CandAcc"] = _mean(buckets.get("CandAcc", []))
    out["invalid_rate"] = c["invalid"] / c["slots"] if c["slots"] else None
    out["duplicate_rate"] = c["duplicate"] / c["slots"] if c["slots"] else None
    out["n_rows"] = len(targets)
    out["n_rows_scored"] = len(buckets.get(f"FHR@{ks[0]}", []))
    out["n_rows_long_tail_user"] = len(buckets.get(f"LUF@{ks[0]}", []))
    out["n_rows_long_tail_item"] = len(buckets.get(f"LIF@{ks[0]}", []))
    out["n_rows_candidates"] = len(buckets.get("CandAcc", []))
    warm, cold = c["warm"], c["cold"]
    out["cold_share"] = cold / (warm + cold) if (warm + cold) else None
    # the best FHR any predictor could reach: scored rows that have a future dislike with a SID
    n_scored = len(buckets.get(f"FHR@{ks[0]}", []))
    out["fhr_ceiling"] = len(buckets.get(f"FHR_warm@{ks[0]}", [])) / n_scored if n_scored else None
    return out


def metric_names(ks: Sequence[int]) -> list[str]:
    """Column order used by reports."""
    names = []
    for k in sorted(set(ks)):
        names += [f"HR@{k}", f"FHR@{k}", f"LUF@{k}", f"LIF@{k}", f"P1HR@{k}", f"P2HR@{k}", f"FHR_warm@{k}"]
    return names + ["CandAcc", "invalid_rate", "duplicate_rate"]
