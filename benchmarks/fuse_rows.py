"""Reciprocal-rank fusion of predictions files: one predictions file whose top K per evaluation
row is the fused ranking of several rows' top K (an ensemble probe, not a shipped predictor).

    python benchmarks/fuse_rows.py --data runs/ml100k/data --out runs/fused.jsonl \\
        "warm-up=runs/ml100k/eval/predictions/warm-up_SFT.jsonl" "GRPO=runs/x/eval/predictions/progressive_GRPO.jsonl"
    conrec-eval --data runs/ml100k/data --baselines sasrec --predictions "fused=runs/fused.jsonl" ...

Score of item s in a row = sum over the inputs of 1 / (rrf_k + rank of s in that input's list)
(rank 0 = first; an input that does not list s adds nothing); ties break by the first input's
order, then the second's, and so on. Every input is read with the evaluation's own checks
(``read_predictions``: same SID build, every row of the split, K entries), so a file for another
build or split is refused naming it; the output is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Sequence

from conrec_verl.core.eval_data import EvalInputError, load_eval_data
from conrec_verl.evaluation.predictions import read_predictions, write_predictions


def fuse(ranked_lists: Sequence[Sequence], k: int, rrf_k: float = 60.0) -> list:
    """The top ``k`` of the reciprocal-rank fusion of ``ranked_lists`` (None entries skipped)."""
    score: dict = defaultdict(float)
    first_seen: dict = {}
    for lst in ranked_lists:
        for rank, s in enumerate(lst):
            if s is None:
                continue
            score[s] += 1.0 / (rrf_k + rank)
            first_seen.setdefault(s, len(first_seen))
    return sorted(score, key=lambda s: (-score[s], first_seen[s]))[:k]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the data_prep folder the predictions were made on")
    ap.add_argument("--out", required=True, help="the fused predictions file to write")
    ap.add_argument("--k", type=int, default=20, help="entries per row, read and written (default: %(default)s)")
    ap.add_argument("--rrf-k", type=float, default=60.0, help="the fusion's rank offset (default: %(default)s)")
    ap.add_argument("inputs", nargs="+", metavar="NAME=FILE", help="predictions files to fuse (two or more)")
    args = ap.parse_args(argv)
    pairs = [a.split("=", 1) for a in args.inputs]
    if len(pairs) < 2 or any(len(p) != 2 or not p[1] for p in pairs):
        ap.error("give two or more inputs as NAME=FILE")
    data = load_eval_data(args.data)
    try:
        sets = [read_predictions(path, data, args.k, name).sids for name, path in pairs]
    except EvalInputError as e:
        print(f"fuse_rows: {e}", file=sys.stderr)
        return 2
    fused = [fuse([s[i] for s in sets], args.k, args.rrf_k) for i in range(len(data.rows))]
    out = write_predictions(args.out, data, fused)
    print(f"fused {len(pairs)} rows ({', '.join(n for n, _ in pairs)}) over {len(fused)} evaluation rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
