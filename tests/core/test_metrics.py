import math

import pytest

from conrec_verl.core.metrics import (
    EvalTarget,
    candidate_accuracy,
    compute_metrics,
    forget_rate,
    hit_at_k,
    prefix_hit_at_k,
)

A, B, C, D, E = (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 2, 2)


def test_hit_and_prefix_hit():
    preds = [A, None, C]
    assert hit_at_k(preds, [C], 3) and not hit_at_k(preds, [C], 2)
    assert not hit_at_k(preds, [D], 3)
    assert prefix_hit_at_k([B], [A], 1, 2)  # share (0, 0)
    assert not prefix_hit_at_k([C], [A], 1, 2)  # share only (0,)
    assert prefix_hit_at_k([C], [A], 1, 1)
    with pytest.raises(ValueError):
        prefix_hit_at_k([A], [A], 1, 0)


def test_candidate_accuracy_ties_share_credit():
    assert candidate_accuracy([0.1, 0.9, 0.3], 1) == 1.0
    assert candidate_accuracy([0.1, 0.9, 0.3], 2) == 0.0
    assert candidate_accuracy([0.5] * 4, 3) == 0.25
    assert candidate_accuracy([0.9, 0.9, 0.1], 0) == 0.5
    with pytest.raises(ValueError):
        candidate_accuracy([0.1], 3)


def test_forget_rate():
    assert forget_rate(0.8, 0.6) == pytest.approx(0.25)
    assert forget_rate(0.5, 0.6) == pytest.approx(-0.2)
    with pytest.raises(ValueError):
        forget_rate(0.0, 0.1)


def test_compute_metrics_hand_computed():
    targets = [
        # row 0: next A, future {A, C}; long-tail user; long-tail item C
        EvalTarget(future_neg=[A, C], next_neg=A, long_tail_items=[C], long_tail_user=True,
                   candidates=[A, B, C], candidate_target=0),
        # row 1: next D, future {D}; one cold dislike too
        EvalTarget(future_neg=[D], next_neg=D, n_future_neg_cold=1, candidates=[D, E, A], candidate_target=0),
        # row 2: only cold future dislikes, next is cold
        EvalTarget(future_neg=[], next_neg=None, n_future_neg_cold=2, long_tail_user=True),
        # row 3: no future dislike at all -> not scored
        EvalTarget(future_neg=[], next_neg=None),
    ]
    preds = [
        [C, B, A],      # FHR@1 yes (C), HR@1 no, HR@3 yes; LIF@1 yes
        [E, B, None],   # nothing exact; B shares (0,) with nothing in {D}? D=(1,0,0): no prefix
        [A, B, C],      # cold only: always miss
        [A],
    ]
    cand = [[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], None, None]
    m = compute_metrics(preds, targets, ks=(1, 3), candidate_scores=cand)
    assert m["n_rows"] == 4 and m["n_rows_scored"] == 3
    assert m["FHR@1"] == pytest.approx(1 / 3)
    assert m["FHR@3"] == pytest.approx(1 / 3)
    assert m["HR@1"] == 0.0
    assert m["HR@3"] == pytest.approx(1 / 3)
    assert m["FHR_warm@3"] == pytest.approx(1 / 2)
    assert m["LUF@1"] == pytest.approx(1 / 2)  # rows 0 (hit) and 2 (miss)
    assert m["LIF@1"] == 1.0 and m["n_rows_long_tail_item"] == 1
    # prefix: row0 yes at depth 2 (C itself); row1: E/B vs D -> depth 0
    assert m["P1HR@1"] == pytest.approx(1 / 3)
    assert m["P2HR@3"] == pytest.approx(1 / 3)
    # candidates: row0 target best -> 1; row1 target ties with one other -> 0.5
    assert m["CandAcc"] == pytest.approx(0.75)
    # invalid: 1 of 10 slots; no duplicates
    assert m["invalid_rate"] == pytest.approx(1 / 10)
    assert m["duplicate_rate"] == 0.0
    # cold share: warm 3 (A, C, D), cold 3
    assert m["cold_share"] == pytest.approx(0.5)
    assert m["fhr_ceiling"] == pytest.approx(2 / 3)  # row 2 has only cold dislikes


def test_duplicates_use_slots_and_are_counted():
    t = [EvalTarget(future_neg=[C], next_neg=C)]
    m = compute_metrics([[A, A, C]], t, ks=(2, 3))
    assert m["FHR@2"] == 0.0 and m["FHR@3"] == 1.0
    assert m["duplicate_rate"] == pytest.approx(1 / 3)


def test_empty_denominators_are_none_and_mismatch_raises():
    m = compute_metrics([[A]], [EvalTarget(future_neg=[A])], ks=(1,))
    assert m["LUF@1"] is None and m["LIF@1"] is None and m["CandAcc"] is None
    assert m["HR@1"] == 0.0  # next_neg unknown -> miss
    with pytest.raises(ValueError, match="prediction rows"):
        compute_metrics([[A], [B]], [EvalTarget(future_neg=[A])])
    with pytest.raises(ValueError):
        compute_metrics([[A]], [EvalTarget(future_neg=[A])], ks=(0,))
    assert not math.isnan(m["FHR@1"])
