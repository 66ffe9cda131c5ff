"""Benchmark the one-command pipeline on the bundled sample: wall time per phase, peak memory of
the whole process tree (driver, torchrun, Ray workers), and the final FHR@20 table.

    python benchmarks/bench_pipeline.py [--run-dir runs/bench_pipeline] [--profile cpu_tiny]

Targets (issue: recipes and the full pipeline): at most 10 minutes wall and 6 GB peak on 2 cores.
The run folder is created fresh. Memory is sampled every second with psutil as the sum of the
proportional set sizes (PSS) of the pipeline process and all its descendants (Ray's own daemons
included): shared libraries and Ray's shared-memory object store count once, not once per process
(the sum of RSS, which counts them per process, is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def tree_memory(proc: psutil.Process, field: str) -> int:
    """Sum of one memory field over the process and its descendants.

    ``pss`` (proportional set size) splits shared pages (libtorch, Ray's object store) between the
    processes mapping them; ``rss`` counts them once per process.
    """
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info() if field == "pss" else p.memory_info()
            total += getattr(info, field)
        except psutil.Error:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/bench_pipeline")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--max-gb", type=float, default=6.0)
    args = ap.parse_args()
    run = Path(args.run_dir).resolve()
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "conrec_verl.pipeline", "--run-dir", str(run), "--profile", args.profile]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0]
    peak_rss = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_memory(ps, "pss"))
            peak_rss[0] = max(peak_rss[0], tree_memory(ps, "rss"))
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    proc.wait()
    done.set()
    sampler.join()
    wall = time.time() - t0
    print(out.strip().splitlines()[-12:] and "\n".join(out.strip().splitlines()[-12:]))
    if proc.returncode != 0:
        print(f"pipeline failed with exit code {proc.returncode}")
        return 1
    state = json.loads((run / "pipeline.json").read_text())
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs; profile {args.profile}")
    print("| phase | wall s |\n|---|---|")
    for name, info in state["done"].items():
        print(f"| {name} | {info.get('seconds')} |")
    gb = peak[0] / 2**30
    print(f"| **total** | **{wall:.0f}** |")
    print(f"\npeak memory of the process tree: {gb:.2f} GB PSS (target {args.max_gb} GB; "
          f"sum of RSS {peak_rss[0] / 2**30:.2f} GB); "
          f"wall {wall / 60:.1f} min (target {args.max_minutes} min)")
    ok = wall <= args.max_minutes * 60 and gb <= args.max_gb
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
