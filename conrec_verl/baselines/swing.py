"""Swing item-CF over a user's past dislikes.

``score(u, j) = sum_{i in hist_neg(u)} w(i) * swing(i, j)`` with ``swing.parquet`` (item_id,
neighbor_id, score) as the item-item matrix (scipy.sparse) and ``w(i) = recency_decay ** age``
(age 0 = the most recent dislike; decay 1.0 = plain sum). Items without any Swing signal are
ranked by dislike popularity behind every item that has one (``backfill``); on logs where Swing
is almost empty (KuaiRand) this baseline therefore degrades gracefully to popularity.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from conrec_verl.baselines.base import Baseline, PopularityBaseline
from conrec_verl.core.eval_data import EvalData, EvalInputError


class SwingBaseline(Baseline):
    name = "swing"

    def __init__(self, recency_decay: float = 1.0, backfill: bool = True, **kw):
        super().__init__(**kw)
        self.recency_decay = float(recency_decay)
        self.backfill = backfill

    def _fit(self, data: EvalData) -> None:
        path = data.data_dir / "swing.parquet"
        n = len(self.catalogue)
        if not path.is_file():
            raise EvalInputError(f"{path}: file not found (the swing baseline needs it)")
        table = pq.read_table(path)
        for col in ("item_id", "neighbor_id", "score"):
            if col not in table.column_names:
                raise EvalInputError(f"{path}: column {col!r} missing (has {table.column_names})")
        src = table.column("item_id").to_pylist()
        dst = table.column("neighbor_id").to_pylist()
        score = np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(score) | (score < 0))
        if bad.size:
            raise EvalInputError(f"{path}: column 'score', row {int(bad[0])}: {score[bad[0]]!r} is not a finite, non-negative number")
        rows, cols, vals = [], [], []
        self.n_pairs_skipped = 0
        for a, b, s in zip(src, dst, score):
            sa, sb = data.item_sids.get(str(a)), data.item_sids.get(str(b))
            if sa is None or sb is None:
                self.n_pairs_skipped += 1  # an item without a SID cannot be recommended
                continue
            rows.append(self.index[sa])
            cols.append(self.index[sb])
            vals.append(s)
        self.matrix = sp.csr_matrix((vals, (rows, cols)), shape=(n, n), dtype=np.float64)
        self.n_pairs = self.matrix.nnz
        pop = PopularityBaseline().fit(data).counts
        self.pop = pop / (pop.max() + 1.0) if self.backfill else np.zeros(n)

    def row_scores(self, rows):
        assert self.data is not None
        n = len(self.catalogue)
        h_rows, h_cols, h_vals = [], [], []
        for j, r in enumerate(rows):
            hist = self._known(self.data.rows[r].hist_neg)
            for age, idx in enumerate(reversed(hist)):
                h_rows.append(j)
                h_cols.append(idx)
                h_vals.append(self.recency_decay ** age)
        hist = sp.csr_matrix((h_vals, (h_rows, h_cols)), shape=(len(rows), n))
        swing = np.asarray((hist @ self.matrix).todense())
        # swing signal first; popularity (scaled into [0, 1)) only orders items without one
        has = swing > 0
        return np.where(has, 1.0 + swing, self.pop[None, :])
