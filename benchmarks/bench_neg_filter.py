"""Benchmark: the vectorised deployment negative filter vs a per-user loop (both numpy).

Random codebook (``--sizes``, ``--dim``), a catalogue of ``--items`` SIDs, ``--users`` users each
with ``--preds`` predicted negative SIDs and ``--cands`` candidates drawn from the catalogue. Prints candidates/second for the batched
``NegativeFilter.max_similarity_batch`` and for a loop calling ``max_similarity`` per user
(the baseline, measured in the same run), their ratio, and checks both agree.

    python benchmarks/bench_neg_filter.py --users 20000 --cands 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from conrec_verl.core.neg_filter import NegativeFilter
from conrec_verl.core.sid import Codebook


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256,256,256")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--items", type=int, default=50000, help="catalogue size (items with a SID)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--preds", type=int, default=20)
    p.add_argument("--cands", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    sizes = [int(x) for x in args.sizes.split(",")]
    book = Codebook([rng.normal(size=(s, args.dim)).astype(np.float32) for s in sizes])
    filt = NegativeFilter(book, args.threshold)

    catalogue = np.unique(np.stack([rng.integers(0, s, args.items) for s in sizes], axis=1), axis=0)

    def codes(n):
        return catalogue[rng.integers(0, len(catalogue), n)]

    preds = [codes(args.preds) for _ in range(args.users)]
    cands = [codes(args.cands) for _ in range(args.users)]
    total = args.users * args.cands

    t = time.perf_counter()
    loop = [filt.max_similarity(pu, cu) for pu, cu in zip(preds, cands)]
    t_loop = time.perf_counter() - t
    t = time.perf_counter()
    batch = filt.max_similarity_batch(preds, cands)
    t_batch = time.perf_counter() - t
    agree = all(np.allclose(a, b, atol=1e-5) for a, b in zip(loop, batch))
    removed = sum(int((b >= args.threshold).sum()) for b in batch)
    print(f"items={len(catalogue)} users={args.users} preds/user={args.preds} candidates/user={args.cands} dim={args.dim} sizes={sizes}")
    print(f"per-user loop (baseline): {t_loop:.3f} s  {total / t_loop:,.0f} candidates/s")
    print(f"batched:                  {t_batch:.3f} s  {total / t_batch:,.0f} candidates/s")
    print(f"speed-up batched / loop: {t_loop / t_batch:.2f}x; results agree: {agree}; "
          f"removed at threshold {args.threshold}: {removed / total:.3%}")
    if not agree:
        raise SystemExit("batched and per-user results differ")


if __name__ == "__main__":
    main()
