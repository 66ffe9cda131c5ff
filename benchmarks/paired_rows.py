"""Paired test of two rows of one conrec-eval report: per-row FHR@K hits of row A vs row B, exact
McNemar (``conrec_verl.core.stats.mcnemar``), on the rows' predictions files.

    python benchmarks/paired_rows.py --data runs/ml100k/data --eval runs/ml100k/eval \\
        --a "+ cross-stage cleaning" --b "+ positive penalty" [--k 20]

conrec-eval pairs every row with the best baseline only; this compares two model rows (e.g. one
ablation step against the previous one) on the same evaluation rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conrec_verl.core.stats import mcnemar
from conrec_verl.core.eval_data import load_eval_data
from conrec_verl.evaluation.predictions import hit_samples, predictions_file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the data_prep folder the report was made on")
    ap.add_argument("--eval", required=True, help="the conrec-eval output folder (with predictions/)")
    ap.add_argument("--a", required=True, help="row name A")
    ap.add_argument("--b", required=True, help="row name B")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args(argv)
    data = load_eval_data(args.data)
    files = {}
    for name in (args.a, args.b):
        path = predictions_file(Path(args.eval) / "predictions", name)
        if not path.is_file():
            print(f"paired_rows: error: {path} not found (row {name!r})", file=sys.stderr)
            return 2
        files[name] = path
    a, b = hit_samples(files[args.a], data, args.k), hit_samples(files[args.b], data, args.k)
    t = mcnemar(a, b)
    print(f"FHR@{args.k}: {args.a} {sum(a) / len(a):.4f}, {args.b} {sum(b) / len(b):.4f} on {len(a)} rows; "
          f"only A hits {t.only_a}, only B hits {t.only_b}; exact McNemar p = {t.p_value:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
