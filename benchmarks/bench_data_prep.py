"""Benchmark data_prep on a synthetic log (default 10M events, 1M items, 100k users, 28 days).

    python benchmarks/bench_data_prep.py                      # full size (target: < 10 min, < 12 GB on 2 cores)
    python benchmarks/bench_data_prep.py --events 1000000 --items 100000 --users 10000   # quick look

Prints wall time and peak resident memory per step (RSS sampled every 20 ms by a thread) and,
as baselines measured in the same run: (1) the same build at 1/10 of the size (scaling ratio) and
(2) the sparse Swing against the literal brute-force formula on a small slice of the dislikes
(speed-up ratio, results checked equal). Nothing here is a test; figures go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conrec_verl.core.swing import SwingParams, swing_bruteforce, swing_scores  # noqa: E402
from data_prep import build, load_config  # noqa: E402


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepMonitor:
    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.rows: list[tuple[str, float, int]] = []
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._t0 = 0.0

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def hook(self, name: str, phase: str):
        if phase == "start":
            self._peak = rss_bytes()
            self._t0 = time.perf_counter()
        else:
            self._peak = max(self._peak, rss_bytes())
            self.rows.append((name, time.perf_counter() - self._t0, self._peak))

    def close(self):
        self._stop.set()
        self._thread.join()


def synth(path: Path, events: int, items: int, users: int, days: int, seed: int = 0) -> None:
    """Power-law item popularity (so Swing has co-dislikes), 20% dislikes, uniform days."""
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.3, size=events)  # heavy tail, clipped to the catalogue
    item = (ranks - 1) % items
    perm = rng.permutation(items)  # popular items spread over the id space
    item = perm[item]
    user = rng.integers(0, users, size=events)
    start = pd.Timestamp("2024-01-01").value // 10**6
    ts = start + rng.integers(0, days * 86_400_000, size=events)
    label = (rng.random(events) >= 0.2).astype(np.int8)
    pd.DataFrame({"user_id": user.astype(np.int64), "item_id": item.astype(np.int64), "timestamp": ts,
                  "label": label}).to_parquet(path, index=False)


def run_build(log: Path, out: Path, days: int, sizes: str, cutoffs: int) -> tuple[float, StepMonitor]:
    cutoff = (pd.Timestamp("2024-01-01") + pd.Timedelta(days=days - 8)).strftime("%Y%m%d")
    cfg = load_config("generic", [f"input.path={log}", f"out_dir={out}", f"split.eval_cutoff_day={cutoff}",
                                  f"sid.sizes={sizes}", f"split.num_train_cutoffs={cutoffs}", "print_summary=false",
                                  "progress=false", "overwrite=true"])
    mon = StepMonitor()
    t0 = time.perf_counter()
    build(cfg, step_hook=mon.hook)
    wall = time.perf_counter() - t0
    mon.close()
    return wall, mon


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--sizes", default="[256,256,256]")
    ap.add_argument("--train-cutoffs", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to put the synthetic log and outputs (default: a temp dir)")
    ap.add_argument("--skip-small", action="store_true", help="skip the 1/10-size baseline build")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"workdir {work}; cores {os.cpu_count()}")
        results = {}
        scales = [("full", 1)] + ([] if args.skip_small else [("1/10", 10)])
        for label, div in scales:
            log = work / f"log_{div}.parquet"
            t0 = time.perf_counter()
            synth(log, args.events // div, max(args.items // div, 1000), max(args.users // div, 100), args.days)
            gen = time.perf_counter() - t0
            wall, mon = run_build(log, work / f"out_{div}", args.days, args.sizes, args.train_cutoffs)
            results[label] = wall
            print(f"\n[{label}] {args.events // div:,} events, {max(args.items // div, 1000):,} items, "
                  f"{max(args.users // div, 100):,} users (log generated in {gen:.1f} s)")
            print(f"{'step':<12}{'wall s':>10}{'peak RSS GB':>14}")
            for name, sec, peak in mon.rows:
                print(f"{name:<12}{sec:>10.1f}{peak / 2**30:>14.2f}")
            peak = max(p for _, _, p in mon.rows)
            print(f"{'total':<12}{wall:>10.1f}{peak / 2**30:>14.2f}")
            import json

            m = json.loads((work / f"out_{div}" / "manifest.json").read_text())
            print("rows:", {k: v for k, v in m["counts"].items() if "/" in k})
        if "1/10" in results:
            print(f"\nscaling: full / (1/10 size) wall-time ratio = {results['full'] / results['1/10']:.1f} "
                  "(10.0 = linear)")

        # Swing: sparse vs the literal formula on a slice of the dislikes
        df = pd.read_parquet(work / "log_1.parquet")
        neg = df[df.label == 0]
        hot = neg["item_id"].value_counts().index[:1500]
        sl = neg[neg["item_id"].isin(hot)].head(30000)
        p = SwingParams(min_co_dislikers=2)
        t0 = time.perf_counter()
        brute = swing_bruteforce(sl.user_id.tolist(), sl.item_id.tolist(), p)
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = swing_scores(sl.user_id.to_numpy(), sl.item_id.to_numpy(), p)
        tf = time.perf_counter() - t0
        got = {(a, b): s for a, b, s in zip(fast.item_id, fast.neighbor_id, fast.score)}
        same = set(got) == set(brute) and all(abs(got[k] - v) <= 1e-9 * max(1, abs(v)) for k, v in brute.items())
        print(f"\nswing on {len(sl):,} dislikes / {sl.item_id.nunique()} items: brute force {tb:.2f} s, "
              f"sparse {tf:.3f} s, speed-up x{tb / max(tf, 1e-9):.0f}, equal={same}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
