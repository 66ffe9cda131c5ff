"""Benchmark the one-command pipeline on the bundled sample: wall time per phase, peak memory of
the whole process tree (driver, torchrun, Ray workers), and the final FHR@20 table.

    python benchmarks/bench_pipeline.py [--run-dir runs/bench_pipeline] [--profile cpu_tiny] [--top 15]

Targets (issue: recipes and the full pipeline): at most 10 minutes wall and 6 GB peak on 2 cores.
The run folder is created fresh. Memory is sampled every second with psutil as the sum of the
proportional set sizes (PSS) of the pipeline process and all its descendants (Ray's own daemons
included): shared libraries and Ray's shared-memory object store count once, not once per process
(the sum of RSS, which counts them per process, is printed too). It also prints the peak of every
phase and the processes alive at the overall peak, largest first (Ray workers by their title, e.g.
``ray::WorkerDict``), which is where to look when the peak moves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PHASE_LINE = re.compile(r"\[conrec-pipeline\] \(\d+/\d+\) (.*) \.\.\.$")


def process_label(p: psutil.Process) -> str:
    """A short name for one process of the tree: Ray's title (``ray::TaskRunner.run``), the daemon
    (``raylet``, ``gcs_server``), or the Python module / script it runs."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return p.name() if p.is_running() else "?"
    head = cmd[0]
    if head.startswith("ray::") or " " in head and head.split()[0].startswith("ray::"):
        return head.split()[0]
    name = os.path.basename(head)
    if "python" in name:
        args = cmd[1:]
        for i, a in enumerate(args):
            if a == "-m" and i + 1 < len(args):
                return f"python -m {args[i + 1]}"
            if a == "-c":
                return "python -c"
            if not a.startswith("-"):
                return f"python {os.path.basename(a)}"
    return name


def tree_snapshot(proc: psutil.Process) -> list[tuple[int, str, int, int]]:
    """``(pid, label, pss, rss)`` for the process and each of its descendants.

    ``pss`` (proportional set size) splits shared pages (libtorch, Ray's object store) between the
    processes mapping them; ``rss`` counts them once per process.
    """
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            info = p.memory_full_info()
            out.append((p.pid, process_label(p), info.pss, info.rss))
        except psutil.Error:
            pass
    return out


def tree_memory(proc: psutil.Process, field: str) -> int:
    """Sum of one memory field (``pss`` or ``rss``) over the process and its descendants."""
    idx = 2 if field == "pss" else 3
    return sum(row[idx] for row in tree_snapshot(proc))


class PeakSampler:
    """Samples the tree every ``interval`` seconds; keeps the peak PSS, the peak sum of RSS, the
    per-process breakdown at the PSS peak, the pipeline phase it happened in and the peak PSS of
    every phase."""

    def __init__(self, proc: psutil.Process, phase_of=lambda: None, interval: float = 1.0):
        self.proc, self.phase_of, self.interval = proc, phase_of, interval
        self.peak_pss = self.peak_rss = 0
        self.at_peak: list[tuple[int, str, int, int]] = []
        self.peak_phase = None
        self.peak_time = 0.0
        self.phase_peaks: dict = {}  # phase -> peak PSS in bytes
        self.t0 = time.time()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "PeakSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.is_set():
            rows = tree_snapshot(self.proc)
            pss = sum(r[2] for r in rows)
            self.peak_rss = max(self.peak_rss, sum(r[3] for r in rows))
            phase = self.phase_of()
            self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), pss)
            if pss > self.peak_pss:
                self.peak_pss, self.at_peak = pss, rows
                self.peak_phase, self.peak_time = self.phase_of(), time.time() - self.t0
            self._done.wait(self.interval)

    def breakdown(self, top: int = 15) -> str:
        """Markdown table of the processes at the peak, largest PSS first (same labels summed)."""
        groups: dict[str, list[int]] = {}
        for _pid, label, pss, rss in self.at_peak:
            g = groups.setdefault(label, [0, 0, 0])
            g[0] += 1
            g[1] += pss
            g[2] += rss
        rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
        lines = ["| process | count | PSS GB | RSS GB |", "|---|---|---|---|"]
        for label, (n, pss, rss) in rows[:top]:
            lines.append(f"| `{label}` | {n} | {pss / 2**30:.2f} | {rss / 2**30:.2f} |")
        rest = rows[top:]
        if rest:
            lines.append(f"| ({len(rest)} more) | {sum(v[0] for _, v in rest)} | "
                         f"{sum(v[1] for _, v in rest) / 2**30:.2f} | {sum(v[2] for _, v in rest) / 2**30:.2f} |")
        lines.append(f"| **total** | {len(self.at_peak)} | **{self.peak_pss / 2**30:.2f}** | "
                     f"{sum(r[3] for r in self.at_peak) / 2**30:.2f} |")
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/bench_pipeline")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--max-gb", type=float, default=6.0)
    ap.add_argument("--top", type=int, default=15, help="processes listed at the peak (default: %(default)s)")
    args = ap.parse_args()
    run = Path(args.run_dir).resolve()
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-u", "-m", "conrec_verl.pipeline", "--run-dir", str(run), "--profile", args.profile]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phase = [None]
    sampler = PeakSampler(psutil.Process(proc.pid), phase_of=lambda: phase[0]).start()
    lines = []
    for line in proc.stdout:  # "[conrec-pipeline] (i/n) <title> ..." starts a phase
        lines.append(line.rstrip("\n"))
        m = PHASE_LINE.match(lines[-1])
        if m:
            phase[0] = m.group(1)
    proc.wait()
    sampler.stop()
    wall = time.time() - t0
    print("\n".join(lines[-12:]))
    if proc.returncode != 0:
        print(f"pipeline failed with exit code {proc.returncode}")
        return 1
    state = json.loads((run / "pipeline.json").read_text())
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs; profile {args.profile}")
    # phases print "(i/n) <title> ..." in the order pipeline.json records them (a fresh run folder)
    titles = [m.group(1) for m in map(PHASE_LINE.match, lines) if m]
    peak_of = dict(zip(state["done"], (sampler.phase_peaks.get(t) for t in titles)))
    print("| phase | wall s | peak PSS GB |\n|---|---|---|")
    for name, info in state["done"].items():
        peak = peak_of.get(name)
        print(f"| {name} | {info.get('seconds')} | {'' if peak is None else f'{peak / 2**30:.2f}'} |")
    gb = sampler.peak_pss / 2**30
    print(f"| **total** | **{wall:.0f}** | **{gb:.2f}** |")
    print(f"\npeak memory of the process tree: {gb:.2f} GB PSS (target {args.max_gb} GB; "
          f"sum of RSS {sampler.peak_rss / 2**30:.2f} GB); "
          f"wall {wall / 60:.1f} min (target {args.max_minutes} min)")
    print(f"\nprocesses at the PSS peak ({sampler.peak_time:.0f} s in, phase: {sampler.peak_phase}):\n")
    print(sampler.breakdown(args.top))
    ok = wall <= args.max_minutes * 60 and gb <= args.max_gb
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
