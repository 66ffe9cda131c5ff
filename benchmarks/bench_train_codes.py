"""What the worker that runs the item embeddings and Swing holds, per training event: the events'
table with string ids (how ``engine=ray`` gathered them until 2026-11-27) against their integer
codes (``data_prep/train_codes.py``, what it gathers now), on the synthetic logs of
``bench_data_prep.py``.

    python benchmarks/bench_train_codes.py --millions 1,10

Per size: bytes per event of the table (pandas ``memory_usage(deep=True)``, the columns the steps
read, ids as Python ``str`` objects, as the gathering task cast them) and of the codes (the per-event arrays plus
the sorted id arrays, deep); the time to code 16 user partitions and join them, and that the
joined codes decode to the table (checked, not timed). Both forms are measured in the same run.
Nothing here is a test; figures go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conrec_verl.data_prep.train_codes import TrainCodes  # noqa: E402


def table(events: int, seed: int = 0) -> pd.DataFrame:
    """bench_data_prep.synth's log (items = events / 10, users = events / 100, 28 days) as the
    training table: string ids, sorted by (user, time, item)."""
    rng = np.random.default_rng(seed)
    items, users = max(events // 10, 1), max(events // 100, 1)
    item = rng.permutation(items)[(rng.zipf(1.3, size=events) - 1) % items]
    df = pd.DataFrame({"user_id": rng.integers(0, users, size=events).astype(str).astype(object),
                       "item_id": item.astype(str).astype(object),
                       "ts": rng.integers(0, 28 * 86_400_000, size=events).astype(np.int64),
                       "polarity": np.where(rng.random(events) >= 0.2, 1, -1).astype(np.int8),
                       "weight": np.ones(events, dtype=np.float32)})
    df["day"] = df["ts"] // 86_400_000
    df = df.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    # ids as Python objects, as the gathering task cast them (pandas 3 would otherwise store them as
    # its compact string dtype)
    return df.astype({"user_id": object, "item_id": object})


def deep_bytes(a: np.ndarray) -> int:
    return int(pd.Series(a).memory_usage(deep=True, index=False))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--millions", default="1,10")
    ap.add_argument("--partitions", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    print("| events | table bytes/event | codes bytes/event | table / codes | code + join s |")
    print("|---|---|---|---|---|")
    for mil in (float(m) for m in args.millions.split(",")):
        n = int(mil * 1_000_000)
        df = table(n)
        cols = ["user_id", "item_id", "ts", "day", "polarity", "weight"]
        table_bytes = int(df[cols].memory_usage(deep=True, index=False).sum())
        part = pd.util.hash_array(df["user_id"].to_numpy()) % args.partitions
        groups = [df[part == k] for k in range(args.partitions)]
        t0 = time.perf_counter()
        codes = TrainCodes.concat([TrainCodes.from_frame(g) for g in groups])
        wall = time.perf_counter() - t0
        assert (codes.users[codes.user] == df["user_id"].to_numpy()).all()
        assert (codes.items[codes.item] == df["item_id"].to_numpy()).all()
        code_bytes = codes.nbytes + deep_bytes(codes.users) + deep_bytes(codes.items)
        print(f"| {mil:g}M | {table_bytes / n:.1f} | {code_bytes / n:.1f} | {table_bytes / code_bytes:.1f}x | "
              f"{wall:.1f} |", flush=True)
        del df, groups, codes


if __name__ == "__main__":
    main()
