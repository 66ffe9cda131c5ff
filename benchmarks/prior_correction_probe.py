"""Does dividing out the model's item prior rank future dislikes better? A decoding probe.

    python benchmarks/prior_correction_probe.py --data runs/ml100k/data \\
        --model runs/ml100k/models/grpo [--model OTHER ...] --alphas=-0.3,-0.1,0,0.1,0.2,0.3,0.5

Each model folder's exact catalogue log-probabilities (``harness.catalogue_scores``; several folders
are averaged as a ``conrec-eval --ensemble`` row) are re-ranked per row as
``score(i) - alpha * log prior(i)``, where ``prior(i)`` is the model's mean probability of item i over
the split's rows (alpha 0: the model's own ranking; alpha > 0 favours items the model proposes to
few users, alpha < 0 to many). FHR@K under the evaluation's exclusion rule is printed on the
validation users' rows (``rl/val.parquet``, where alpha would be chosen) and on the evaluation split.
A probe that prints figures, not a shipped ranking.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy.special import logsumexp

from conrec_verl.core.eval_data import DEFAULT_EXCLUSION, EvalInputError, load_eval_data
from conrec_verl.core.metrics import metric_samples
from conrec_verl.evaluation.harness import catalogue_scores, rank_catalogue


def log_prior(scores: np.ndarray) -> np.ndarray:
    """log of the mean over rows of each item's probability (columns of a log-probability matrix)."""
    return logsumexp(scores, axis=0) - np.log(scores.shape[0])


def corrected_fhr(data, scores: np.ndarray, alpha: float, k: int, exclusion: str) -> float:
    top, _, _ = rank_catalogue(data, scores - alpha * log_prior(scores), k, exclusion)
    values = metric_samples(top, [r.target for r in data.rows], [k])[0].get(f"FHR@{k}", [])
    return float(np.mean(values)) if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeat: an ensemble)")
    ap.add_argument("--alphas", default="-0.3,-0.1,0,0.1,0.2,0.3,0.5")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--context", type=int, default=3)
    ap.add_argument("--budget", type=int, default=384)
    ap.add_argument("--exclusion", default=DEFAULT_EXCLUSION)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        splits = {}
        for split in ("rl/val.parquet", "eval/test.parquet"):
            data = load_eval_data(args.data, split, unique_rows=False)
            mean = np.mean([catalogue_scores(data, m, args.context, args.budget, args.device)[0] for m in args.model],
                           axis=0)
            splits[split] = (data, mean)
    except (ValueError, EvalInputError, OSError) as exc:
        print(f"prior_correction_probe: {exc}", file=sys.stderr)
        return 2
    print("| alpha | " + " | ".join(f"FHR@{args.k} {s} ({len(d.rows)} rows)" for s, (d, _) in splits.items()) + " |")
    print("|---|" + "---|" * len(splits))
    for a in alphas:
        cells = [f"{corrected_fhr(d, m, a, args.k, args.exclusion):.4f}" for d, m in splits.values()]
        print(f"| {a:+.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
