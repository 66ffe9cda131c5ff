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

from conrec_verl.core.eval_data import DEFAULT_EXCLUSION, EXCLUSION_RULES, EvalInputError, load_eval_data
from conrec_verl.evaluation.harness import mean_catalogue_scores, rank_catalogue
from conrec_verl.evaluation.select import hit_rate

SPLITS = ("rl/val.parquet", "eval/test.parquet")


def log_prior(scores: np.ndarray) -> np.ndarray:
    """log of the mean over rows of each item's probability (columns of a log-probability matrix)."""
    return logsumexp(scores, axis=0) - np.log(scores.shape[0])


def corrected_fhr(data, scores: np.ndarray, alpha: float, k: int, exclusion: str) -> float:
    top, _, _ = rank_catalogue(data, scores - alpha * log_prior(scores), k, exclusion)
    return hit_rate(top, [r.target for r in data.rows], "FHR", k)[0]


def main(argv=None) -> int:
    from conrec_verl.evaluation.cli import _budget

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeat: an ensemble)")
    ap.add_argument("--alphas", default="-0.3,-0.1,0,0.1,0.2,0.3,0.5")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--context", default="3", choices=["1", "2", "3", "row"])
    ap.add_argument("--budget", default="384", help="prompt token budget, or none")
    ap.add_argument("--exclusion", default=DEFAULT_EXCLUSION, choices=list(EXCLUSION_RULES))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        context = args.context if args.context == "row" else int(args.context)
        budget = _budget(args.budget, "--budget")
        splits = {}
        for split in SPLITS:
            data = load_eval_data(args.data, split, unique_rows=False)
            if not 1 <= args.k <= len(data.sid_items):
                raise EvalInputError(f"--k must be between 1 and the {len(data.sid_items)} items with a SID, got {args.k}")
            splits[split] = (data, mean_catalogue_scores(data, args.model, context, budget, args.device)[0])
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
