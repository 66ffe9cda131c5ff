"""CPU SFT step time with one 32-row micro-batch vs token-budgeted micro-batches, same run.

    python benchmarks/bench_sft_step.py [--steps 30] [--work runs/bench_sft_step]
    python benchmarks/bench_sft_step.py --compare precision --steps 40   # bf16 vs fp32 compute

verl's SFT trainer packs a micro-batch into one sequence (``pad_mode: no_padding``); on a CPU the
attention then works on the whole packed length, so its cost grows with the square of the
micro-batch's tokens. The benchmark builds the bundled sample's data folder and the tiny model,
trains the warm-up SFT set for ``--steps`` steps with ``sft_cpu_tiny`` twice -- once with
``use_dynamic_bsz=false micro_batch_size_per_gpu=32`` (the whole batch in one micro-batch), once as
the recipe ships (``use_dynamic_bsz=true max_token_len_per_gpu=1536``) -- and prints the median
step time of each (first 3 steps excluded), their ratio, and the largest difference between the
two runs' per-step training losses (same batches, gradients accumulated: the curves must agree).

``--compare precision``: the recipe as it ships twice instead -- with verl's FSDP mixed precision
as it defaults (parameters cast to bf16 for compute, whatever ``engine.dtype`` says) and with fp32
parameters (``+engine.mixed_precision={param_dtype: fp32, ...}``); on a CPU without bf16 matrix
units the bf16 matmuls are the slower ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from conrec_verl import data_prep
from conrec_verl.model_builder import main as model_builder
from conrec_verl.recipes import CONFIG_PKG
from conrec_verl.runtime.cpu_env import cpu_env

STEP = re.compile(r"step:(\d+) - .*?train/loss:([-0-9.eE]+)")
VARIANTS = {
    "one 32-row micro-batch": ["data.use_dynamic_bsz=false", "data.micro_batch_size_per_gpu=32"],
    "micro-batches of <= 1536 tokens (recipe)": [],
}
FP32 = "+engine.mixed_precision={param_dtype: fp32, reduce_dtype: fp32, buffer_dtype: fp32}"
COMPARISONS = {
    "micro_batching": VARIANTS,
    "precision": {"bf16 compute (verl's FSDP default, the recipe)": [], "fp32 compute": [FP32]},
}


def run(work: Path, name: str, overrides: list[str], steps: int, model: Path, data: Path) -> tuple[list[float], dict]:
    ckpt = work / ("ckpt_" + "".join(c if c.isalnum() else "_" for c in name))
    cmd = [sys.executable, "-m", "conrec_verl.runtime.torchrun", "--standalone", "--nnodes=1",
           "--local-addr=127.0.0.1", "--nproc_per_node=1", "-m", "verl.trainer.sft_trainer",
           "--config-path", CONFIG_PKG, "--config-name", "sft_cpu_tiny", f"model.path={model}",
           f"data.train_files={data / 'sft' / 'warmup.parquet'}", f"trainer.default_local_dir={ckpt}",
           f"trainer.total_training_steps={steps}", "trainer.resume_mode=disable", *overrides]
    env = dict(os.environ, **cpu_env())
    times, losses, last = [], {}, None
    proc = subprocess.Popen(cmd, cwd=str(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        for m in STEP.finditer(line):
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = now
            losses[int(m.group(1))] = float(m.group(2))
    if proc.wait() != 0:
        sys.exit(f"{name}: the SFT run failed (exit {proc.returncode})")
    return times, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--work", default="runs/bench_sft_step")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="micro_batching",
                   help="what the two runs differ in (default: micro-batching)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        data_prep.build(data_prep.load_config("kuairand", [f"out_dir={data}", "progress=false", "print_summary=false"]))
    model = work / "model"
    if not model.exists():
        model_builder(["tiny", "--data-dir", str(data), "--out", str(model), "--seed", "0"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{args.steps} steps of 32 warm-up rows (bundled sample), sft_cpu_tiny")
    results = {}
    for name, overrides in COMPARISONS[args.compare].items():
        times, losses = run(work, name, overrides, args.steps, model, data)
        results[name] = (statistics.median(times[3:] or times), losses)
        print(f"  {name:42s} {results[name][0]:.3f} s/step")
    (a, la), (b, lb) = results.values()
    common = sorted(set(la) & set(lb))
    diff = max(abs(la[s] - lb[s]) for s in common)
    print(f"speed-up of the second run: {a / b:.2f}x; largest per-step loss difference {diff:.4f} over {len(common)} "
          f"steps (losses {la[common[-1]]:.4f} vs {lb[common[-1]]:.4f} at step {common[-1]})")


if __name__ == "__main__":
    main()
