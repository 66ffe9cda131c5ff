import math

import numpy as np
import pytest

from conrec_verl.core.metrics import compute_metrics, metric_samples
from conrec_verl.core.stats import bootstrap_ci, mcnemar


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_rows():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    large = rng.random(5000) < 0.3
    lo_s, hi_s = bootstrap_ci(small, n_boot=2000, seed=1)
    lo_l, hi_l = bootstrap_ci(large, n_boot=2000, seed=1)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    # a binomial proportion's 95% half-width is about 1.96 sqrt(p(1-p)/n)
    half = 1.96 * math.sqrt(large.mean() * (1 - large.mean()) / large.size)
    assert (hi_l - lo_l) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(small, n_boot=500, seed=3) == bootstrap_ci(small, n_boot=500, seed=3)
    assert bootstrap_ci([], seed=0) is None
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_mcnemar_is_the_exact_binomial_on_discordant_rows():
    # 10 rows only A hits, 2 only B hits, 30 both, 58 neither
    a = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 58
    b = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 58
    t = mcnemar(a, b)
    assert (t.n, t.only_a, t.only_b) == (100, 10, 2)
    # two-sided exact: 2 * P(X <= 2), X ~ Binomial(12, 1/2)
    assert t.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert t.diff == pytest.approx(0.08)
    assert mcnemar(b, a).p_value == pytest.approx(t.p_value) and mcnemar(b, a).diff == pytest.approx(-0.08)
    assert mcnemar([1, 0, 1], [1, 0, 1]).p_value == 1.0
    with pytest.raises(ValueError, match="binary"):
        mcnemar([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="aligned"):
        mcnemar([1, 0], [1])


def test_metric_samples_are_the_rows_behind_each_mean():
    from conrec_verl.core.metrics import EvalTarget

    rng = np.random.default_rng(4)
    sids = [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]
    targets, preds, cands = [], [], []
    for i in range(40):
        fut = [sids[j] for j in rng.choice(len(sids), size=int(rng.integers(0, 3)), replace=False)]
        targets.append(EvalTarget(fut, fut[0] if fut else None, fut[:1], bool(i % 3 == 0), int(i % 4 == 0),
                                  candidates=sids[:5] if fut else None, candidate_target=0 if fut else None))
        preds.append([sids[j] for j in rng.choice(len(sids), size=6, replace=False)])
        cands.append(list(rng.random(5)) if fut else None)
    m = compute_metrics(preds, targets, [1, 5], cands)
    buckets, rows, _ = metric_samples(preds, targets, [1, 5], cands)
    for key, vals in buckets.items():
        assert m[key] == pytest.approx(np.mean(vals))
        assert len(rows[key]) == len(vals) and rows[key] == sorted(rows[key])
    # every predictor is scored on the same rows: the paired test lines them up
    other = [p[::-1] for p in preds]
    assert metric_samples(other, targets, [1, 5], cands)[1] == rows
