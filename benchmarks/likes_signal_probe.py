"""Do a user's likes carry signal about the user's future dislikes that the dislikes alone lack?
An item-CF probe over *all* interactions, scored by the evaluation harness beside co-dislike.

    python benchmarks/likes_signal_probe.py --data runs/ml100k/data --out runs/likes_probe

Co-interaction item-CF: C[i, j] = number of users with both i and j (liked or disliked) before
their evaluation cutoff (each user's ``hist_neg`` and ``hist_pos`` of the split); a row scores
item j as ``sum_{h in history} w_h * C[h, j] * propensity(j)``, with w_h = ``--neg-weight`` for the
row's dislikes and ``--pos-weight`` for its likes, and propensity(j) = (dislikes(j) + 1) /
(dislikes(j) + likes(j) + 5), the item's smoothed share of dislikes among its interactions (1
without it). Variants written to the report: likes and dislikes (``allcf``), the same without the
propensity (``allcf_noprop``), dislikes only (``allcf_negonly``). The same exclusion rule, intervals
and K as every other row; a probe, not a registered baseline.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import scipy.sparse as sp

from conrec_verl.baselines import BASELINES
from conrec_verl.baselines.base import Baseline
from conrec_verl.evaluation.harness import run_evaluation


class CoInteraction(Baseline):
    name = "allcf"
    neg_weight, pos_weight, propensity = 1.0, 1.0, True

    def _fit(self, data) -> None:
        n = len(self.catalogue)
        users, items = [], []
        self.neg_count, pos_count = np.zeros(n), np.zeros(n)
        for u, row in enumerate(data.all_rows):
            neg, pos = set(self._known(row.hist_neg)), set(self._known(row.hist_pos))
            self.neg_count[list(neg)] += 1
            pos_count[list(pos)] += 1
            both = sorted(neg | pos)
            users += [u] * len(both)
            items += both
        x = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=(len(data.all_rows), n))
        self.co = (x.T @ x).tocsr()
        self.co.setdiag(0)
        self.prop = ((self.neg_count + 1) / (self.neg_count + pos_count + 5) if self.propensity else np.ones(n))

    def row_scores(self, rows):
        out = np.zeros((len(rows), len(self.catalogue)))
        for k, r in enumerate(rows):
            row = self.data.rows[r]
            w = np.zeros(len(self.catalogue))
            np.add.at(w, self._known(row.hist_neg), self.neg_weight)
            np.add.at(w, self._known(row.hist_pos), self.pos_weight)
            out[k] = (self.co.T @ w) * self.prop + 1e-6 * self.neg_count  # dislike popularity breaks ties
        return out


VARIANTS = {"allcf": {}, "allcf_noprop": {"propensity": False}, "allcf_negonly": {"pos_weight": 0.0}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a data_prep folder")
    ap.add_argument("--out", required=True, help="the report folder to write")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    for name, attrs in VARIANTS.items():
        BASELINES[name] = type(name, (CoInteraction,), {"name": name, **attrs})
    run_evaluation(args.data, args.out, baselines=[*VARIANTS, "codislike", "popularity"], thresholds=[],
                   n_boot=args.bootstrap)
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
