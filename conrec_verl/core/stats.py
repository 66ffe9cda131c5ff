"""Uncertainty of evaluation metrics, pure (numpy + scipy, no verl, no torch).

* :func:`bootstrap_ci` -- percentile bootstrap interval of a mean over evaluation rows: resample the
  rows with replacement ``n_boot`` times (seeded), take the mean of each resample, report the
  ``alpha/2`` and ``1 - alpha/2`` quantiles. Rows are the unit of resampling because they are the
  independent draws (one user x cutoff each).
* :func:`mcnemar` -- paired test of two predictors' binary per-row outcomes (e.g. FHR@20 hits of a
  model row and of the best baseline on the *same* rows). Only discordant rows carry information:
  ``b`` = rows only A hits, ``c`` = rows only B hits; under H0 (equal hit rates) ``b ~ Binomial(b +
  c, 1/2)``. The exact two-sided binomial p-value is used (no continuity approximation), so it is
  valid for few discordant rows too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float] | None:
    """``(low, high)`` percentile interval of ``mean(values)``; None for no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot), dtype=np.float64)
    # resample in chunks: bounded memory for long splits
    chunk = max(1, int(4_000_000 // max(1, x.size)))
    for lo in range(0, int(n_boot), chunk):
        hi = min(int(n_boot), lo + chunk)
        idx = rng.integers(0, x.size, size=(hi - lo, x.size))
        means[lo:hi] = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class McNemarResult:
    n: int          # paired rows
    only_a: int     # rows A hits and B misses
    only_b: int     # rows B hits and A misses
    p_value: float  # exact two-sided binomial test on the discordant rows

    @property
    def diff(self) -> float:
        """Hit-rate difference A - B over the paired rows."""
        return (self.only_a - self.only_b) / self.n if self.n else 0.0


def mcnemar(a: Sequence[float], b: Sequence[float]) -> McNemarResult:
    """Exact McNemar test of paired binary outcomes ``a`` and ``b`` (same rows, same order)."""
    from scipy.stats import binomtest

    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired outcomes must be 1-D and aligned, got shapes {xa.shape} and {xb.shape}")
    for name, x in (("a", xa), ("b", xb)):
        if not np.isin(x, (0.0, 1.0)).all():
            raise ValueError(f"McNemar needs binary outcomes; {name} has values outside {{0, 1}}")
    only_a = int(np.count_nonzero((xa == 1) & (xb == 0)))
    only_b = int(np.count_nonzero((xa == 0) & (xb == 1)))
    n_disc = only_a + only_b
    p = 1.0 if n_disc == 0 else float(binomtest(only_a, n_disc, 0.5, alternative="two-sided").pvalue)
    return McNemarResult(int(xa.size), only_a, only_b, p)
