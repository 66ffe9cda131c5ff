"""Benchmark data_prep on synthetic logs at 1M, 3M and 10M events (items and users scale with the
events: 10M events = 1M items, 100k users; 28 days).

    python benchmarks/bench_data_prep.py                      # 1M, 3M, 10M + the Ray engine at 1M
    python benchmarks/bench_data_prep.py --millions 1 --ray-at 1     # quick look
    python benchmarks/bench_data_prep.py --millions 1,3,10 --ray-at 1,10
    python benchmarks/bench_data_prep.py --millions 3,30 --ray-at 3,30 --local-at 3   # 30M with Ray only

Prints, per size, the wall time and peak resident memory of every step (RSS of the build's
process, each build in a fresh one, sampled every 20 ms by a thread; and the peak of its whole
process tree, Ray's processes included), on a log written as ``--shards`` parquet files, then how time and memory grow with the events (ratios against the
smallest size: linear = the size ratio). Baselines measured in the same run: (1) ``engine=ray``
(a local Ray started for the build, partitions by user/item) against ``engine=local`` on the same
log, with its output files compared byte for byte (target: within 1.5x; the local builds use
``embedding.svd=partitioned``, the solver ``engine=ray`` runs, unless ``--local-svd sklearn``); (2) the sparse Swing against
the literal brute-force formula on a small slice of the dislikes (speed-up ratio, results checked
equal). Nothing here is a test; figures go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from conrec_verl.data_prep import build, load_config  # noqa: E402
from conrec_verl.data_prep.distributed import compare_data_folders  # noqa: E402


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pss_bytes(pid: int) -> int:
    """Proportional set size of a process (each shared page divided among the processes that map
    it), from /proc/PID/smaps_rollup; 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes() -> tuple[int, int]:
    """RSS and PSS of this process and every process it started (a local Ray's GCS, raylet and
    workers), summed. The RSS sum counts a shared page (Ray's object store) once per process that
    maps it: an upper bound; the PSS sum counts it once: the memory the tree actually uses. (0, 0)
    without psutil (the `test` extra)."""
    try:
        import psutil
    except ImportError:
        return 0, 0

    me = psutil.Process()
    rss = pss = 0
    for p in [me] + me.children(recursive=True):
        try:
            rss += p.memory_info().rss
            pss += _pss_bytes(p.pid)
        except psutil.Error:  # exited meanwhile
            pass
    return rss, pss


class StepMonitor:
    """Per step: wall time, peak RSS of this process (the driver) and of the whole process tree
    (sampled every 100 ms); over the build: the peak RSS of the whole process tree (sampled every 20 ms; shared pages of Ray's object store count once
    per process that maps them, so the tree figure is an upper bound)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.rows: list[tuple[str, float, int]] = []
        self._peak = 0
        self.tree_peak = 0
        self._tree_step = 0
        self.tree_pss_peak = 0
        self._pss_step = 0
        #: step name -> (peak RSS sum, peak PSS sum) of the whole process tree during that step
        self.tree_by_step: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._t0 = 0.0

    def _run(self):
        n = 0
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            if n % 5 == 0:  # the tree walk costs more: every 100 ms
                tree, pss = tree_rss_bytes()
                self.tree_peak = max(self.tree_peak, tree)
                self._tree_step = max(self._tree_step, tree)
                self.tree_pss_peak = max(self.tree_pss_peak, pss)
                self._pss_step = max(self._pss_step, pss)
            n += 1
            time.sleep(self.interval)

    def hook(self, name: str, phase: str):
        if phase == "start":
            self._peak = rss_bytes()
            self._tree_step = self._pss_step = 0
            self._t0 = time.perf_counter()
        else:
            self._peak = max(self._peak, rss_bytes())
            self.rows.append((name, time.perf_counter() - self._t0, self._peak))
            self.tree_by_step[name] = (self._tree_step, self._pss_step)

    def close(self):
        self._stop.set()
        self._thread.join()


def synth(path: Path, events: int, items: int, users: int, days: int, seed: int = 0, shards: int = 1) -> None:
    """Power-law item popularity (so Swing has co-dislikes), 20% dislikes, uniform days; with
    ``shards`` > 1, ``path`` is a folder of that many parquet files (rows in generation order)."""
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.3, size=events)  # heavy tail, clipped to the catalogue
    item = (ranks - 1) % items
    perm = rng.permutation(items)  # popular items spread over the id space
    item = perm[item]
    user = rng.integers(0, users, size=events)
    start = pd.Timestamp("2024-01-01").value // 10**6
    ts = start + rng.integers(0, days * 86_400_000, size=events)
    label = (rng.random(events) >= 0.2).astype(np.int8)
    df = pd.DataFrame({"user_id": user.astype(np.int64), "item_id": item.astype(np.int64), "timestamp": ts,
                       "label": label})
    if shards <= 1:
        df.to_parquet(path, index=False)
        return
    path.mkdir(parents=True)
    for k, part in enumerate(np.array_split(np.arange(events), shards)):
        df.iloc[part].to_parquet(path / f"part-{k:04d}.parquet", index=False)


def _build_here(log: Path, out: Path, days: int, sizes: str, cutoffs: int, extra: tuple):
    cutoff = (pd.Timestamp("2024-01-01") + pd.Timedelta(days=days - 8)).strftime("%Y%m%d")
    cfg = load_config("generic", [f"input.path={log}", f"out_dir={out}", f"split.eval_cutoff_day={cutoff}",
                                  f"sid.sizes={sizes}", f"split.num_train_cutoffs={cutoffs}", "print_summary=false",
                                  "progress=false", "overwrite=true", *extra])
    mon = StepMonitor()
    t0 = time.perf_counter()
    build(cfg, step_hook=mon.hook)
    wall = time.perf_counter() - t0
    mon.close()
    return wall, mon.rows, mon.tree_peak, mon.tree_by_step, mon.tree_pss_peak


def run_build(log: Path, out: Path, days: int, sizes: str, cutoffs: int,
              extra: tuple = ()) -> tuple[float, StepMonitor]:
    """One build in a fresh process, so its memory figures are its own (not what an earlier build
    left in this interpreter)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # not a multiprocessing.Pool: its workers are daemonic and a local Ray needs child processes
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        wall, rows, tree, by_step, pss = pool.submit(_build_here, log, out, days, sizes, cutoffs,
                                                     tuple(extra)).result()
    mon = StepMonitor.__new__(StepMonitor)
    mon.rows, mon.tree_peak, mon.tree_by_step, mon.tree_pss_peak = rows, tree, by_step, pss
    return wall, mon


def print_steps(title: str, wall: float, mon: StepMonitor) -> None:
    print(f"\n[{title}]")
    print(f"{'step':<12}{'wall s':>10}{'peak RSS GB':>14}{'tree RSS GB':>14}{'tree PSS GB':>14}")
    for name, sec, peak in mon.rows:
        t_rss, t_pss = mon.tree_by_step.get(name, (0, 0))
        print(f"{name:<12}{sec:>10.1f}{peak / 2**30:>14.2f}{t_rss / 2**30:>14.2f}{t_pss / 2**30:>14.2f}")
    print(f"{'total':<12}{wall:>10.1f}{max(p for _, _, p in mon.rows) / 2**30:>14.2f}")
    print(f"process tree peak RSS {mon.tree_peak / 2**30:.2f} GB, PSS {mon.tree_pss_peak / 2**30:.2f} GB "
          "(driver + the processes it started; RSS counts a shared page once per process, PSS once)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--millions", default="1,3,10", help="log sizes in millions of events")
    ap.add_argument("--items-per-event", type=float, default=0.1)
    ap.add_argument("--users-per-event", type=float, default=0.01)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--sizes", default="[256,256,256]", help="sid.sizes")
    ap.add_argument("--train-cutoffs", type=int, default=3)
    ap.add_argument("--ray-at", default="1", help="sizes (millions) also built with engine=ray; '' = none")
    ap.add_argument("--local-at", default=None, help="sizes (millions) built with engine=local (default: all of "
                    "--millions; a size left out is built with engine=ray only, e.g. one too big for this machine's "
                    "memory with the local engine)")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--ray-partitions", type=int, default=None, help="ray.partitions (default: 2 per CPU)")
    ap.add_argument("--local-svd", default="partitioned", choices=["partitioned", "sklearn"],
                    help="embedding.svd of the engine=local builds: partitioned (default; the solver engine=ray "
                    "runs, so the outputs can be compared byte for byte) or sklearn (the local engine's auto)")
    ap.add_argument("--shards", type=int, default=8, help="files the synthetic log is written in (a folder)")
    ap.add_argument("--workdir", default=None, help="where to put the synthetic logs and outputs (default: a temp dir)")
    args = ap.parse_args(argv)
    millions = [float(x) for x in args.millions.split(",") if x.strip()]
    ray_at = {float(x) for x in args.ray_at.split(",") if x.strip()}
    local_at = set(millions) if args.local_at is None else {float(x) for x in args.local_at.split(",") if x.strip()}
    if not set(millions) <= local_at | ray_at:
        ap.error("every size of --millions must be in --local-at or --ray-at")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; workdir {work}")
        results = {}
        ray_rows = []
        for mil in millions:
            events = int(mil * 1_000_000)
            items, users = max(int(events * args.items_per_event), 1000), max(int(events * args.users_per_event), 100)
            log = work / (f"log_{mil:g}M" if args.shards > 1 else f"log_{mil:g}M.parquet")
            t0 = time.perf_counter()
            synth(log, events, items, users, args.days, shards=args.shards)
            gen = time.perf_counter() - t0
            print(f"\n[{mil:g}M events, {items:,} items, {users:,} users (log generated in {gen:.1f} s)]")
            wall = mon = None
            if mil in local_at:
                wall, mon = run_build(log, work / f"out_{mil:g}M", args.days, args.sizes, args.train_cutoffs,
                                      (f"embedding.svd={args.local_svd}",))
                results[mil] = (wall, mon)
                print_steps(f"{mil:g}M events; engine=local", wall, mon)
                m = json.loads((work / f"out_{mil:g}M" / "manifest.json").read_text())
                print("rows:", {k: v for k, v in m["counts"].items() if "/" in k})
            if mil in ray_at:
                extra = (("engine=ray",) + ((f"ray.num_cpus={args.ray_cpus}",) if args.ray_cpus else ())
                         + ((f"ray.partitions={args.ray_partitions}",) if args.ray_partitions else ()))
                rwall, rmon = run_build(log, work / f"out_{mil:g}M_ray", args.days, args.sizes, args.train_cutoffs, extra)
                print_steps(f"{mil:g}M events; engine=ray (per step: driver RSS)", rwall, rmon)
                if mon is None:
                    m = json.loads((work / f"out_{mil:g}M_ray" / "manifest.json").read_text())
                    print("rows:", {k: v for k, v in m["counts"].items() if "/" in k})
                same = (not compare_data_folders(work / f"out_{mil:g}M", work / f"out_{mil:g}M_ray")
                        if mon is not None else None)
                ray_rows.append((mil, wall, rwall, same, max(p for _, _, p in mon.rows) if mon else None,
                                 max(p for _, _, p in rmon.rows), mon.tree_peak if mon else None, rmon.tree_peak,
                                 mon.tree_pss_peak if mon else None, rmon.tree_pss_peak))
                shutil.rmtree(work / f"out_{mil:g}M_ray", ignore_errors=True)
            shutil.rmtree(work / f"out_{mil:g}M", ignore_errors=True)
            shutil.rmtree(log) if log.is_dir() else log.unlink()

        base = min(results) if results else None
        steps = [name for name, _, _ in results[base][1].rows] if results else []
        if results:
            print(f"\n## engine=local: time (s) and peak RSS (GB) per step by log size; growth = value / value at "
                  f"{base:g}M")
            print("| step | " + " | ".join(f"{m:g}M s" for m in results) + " | "
                  + " | ".join(f"{m:g}M GB" for m in results)
                  + " | time growth " + ", ".join(f"{m / base:g}x" for m in results if m != base) + " |")
            print("|---" * (1 + 2 * len(results) + 1) + "|")
            for i, name in enumerate(steps + ["total"]):
                secs = [r[0] if name == "total" else r[1].rows[i][1] for r in results.values()]
                peaks = [max(p for _, _, p in r[1].rows) if name == "total" else r[1].rows[i][2]
                         for r in results.values()]
                growth = [s / secs[0] if secs[0] > 0 else float("nan") for s in secs[1:]]
                print(f"| {name} | " + " | ".join(f"{s:.1f}" for s in secs) + " | "
                      + " | ".join(f"{p / 2**30:.2f}" for p in peaks) + " | "
                      + ", ".join(f"{g:.1f}" for g in growth) + " |")
            for mil in results:
                if mil != base:
                    print(f"scaling {mil:g}M / {base:g}M: wall x{results[mil][0] / results[base][0]:.1f} "
                          f"(linear: x{mil / base:g})")
        if ray_rows:
            gb = lambda v: "–" if v is None else f"{v / 2**30:.2f}"  # noqa: E731
            r0 = ray_rows[0]
            print("\n## engine=ray vs engine=local (same log, same run; – = not built with the local engine); "
                  f"growth = value / value at {r0[0]:g}M")
            print("| events | local s | ray s | ray / local | local peak GB | ray driver peak GB | "
                  "local tree GB | ray tree GB (RSS sum) | ray tree GB (PSS sum) | identical outputs | "
                  "ray time growth | ray driver growth | ray tree growth (RSS, PSS) |")
            print("|---" * 13 + "|")
            for mil, lw, rw, same, lp, rp, lt, rt, _, rpss in ray_rows:
                print(f"| {mil:g}M | {'–' if lw is None else f'{lw:.1f}'} | {rw:.1f} | "
                      f"{'–' if lw is None else f'{rw / lw:.2f}'} | {gb(lp)} | {gb(rp)} | {gb(lt)} | {gb(rt)} | "
                      f"{gb(rpss)} | {'–' if same is None else same} | {rw / r0[2]:.2f} | {rp / r0[5]:.2f} | "
                      f"{rt / r0[7] if r0[7] else float('nan'):.2f}, "
                      f"{rpss / r0[9] if r0[9] else float('nan'):.2f} |")

        # Swing: sparse vs the literal formula on a slice of the dislikes
        synth(work / "swing_log.parquet", 1_000_000, 100_000, 10_000, args.days)
        df = pd.read_parquet(work / "swing_log.parquet")
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
