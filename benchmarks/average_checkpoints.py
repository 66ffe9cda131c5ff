"""Average the weights of several Hugging Face checkpoints of one run (a "model soup").

    python benchmarks/average_checkpoints.py --out runs/soup \\
        runs/ml100k_cos/sft/warmup/global_step_1644/huggingface \\
        runs/ml100k_cos/sft/warmup/global_step_1918/huggingface \\
        runs/ml100k_cos/sft/warmup/global_step_2192/huggingface

Every floating-point tensor of ``model.safetensors`` becomes the mean of the checkpoints' tensors
(computed in float32, stored in the first checkpoint's dtype); config and tokenizer files are copied
from the last checkpoint. The checkpoints must hold the same tensor names and shapes (the epoch
exports of one SFT run do). The output folder appears whole or not at all. Used for the "weight
averaging" row of BENCHMARKS.md (evaluate the result with ``conrec-eval --model NAME=OUT``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WEIGHTS = "model.safetensors"


def average(folders: list[Path]) -> dict:
    """The parameter-wise mean of the checkpoints' ``model.safetensors``; SystemExit names the
    folder and tensor that do not match the first checkpoint."""
    import torch
    from safetensors.torch import load_file

    if len(folders) < 2:
        sys.exit("average_checkpoints: give at least two checkpoint folders")
    first = None
    total: dict = {}
    for folder in folders:
        path = folder / WEIGHTS
        if not path.is_file():
            sys.exit(f"average_checkpoints: {path} does not exist (a Hugging Face folder with {WEIGHTS} is needed)")
        sd = load_file(str(path))
        if first is None:
            first = {k: (v.dtype, v.shape) for k, v in sd.items()}
            # non-float tensors (none in a transformers LM, but possible) keep the first value
            total = {k: v.to(torch.float32).clone() if v.is_floating_point() else v for k, v in sd.items()}
            continue
        if set(sd) != set(first):
            diff = sorted(set(sd) ^ set(first))[:3]
            sys.exit(f"average_checkpoints: {path} holds other tensors than {folders[0] / WEIGHTS} (e.g. {diff})")
        for k, v in sd.items():
            if v.shape != first[k][1]:
                sys.exit(f"average_checkpoints: {path}: tensor {k} has shape {tuple(v.shape)}, "
                         f"the first checkpoint {tuple(first[k][1])}")
            if v.is_floating_point():
                total[k] += v.to(torch.float32)
    n = float(len(folders))
    return {k: (v / n).to(first[k][0]) if first[k][0].is_floating_point else v for k, v in total.items()}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="Hugging Face folders (each with model.safetensors)")
    p.add_argument("--out", required=True, help="the averaged model's folder (replaced if it exists)")
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    from conrec_verl.io_utils import atomic_dir

    folders = [Path(c) for c in args.checkpoints]
    weights = average(folders)
    with atomic_dir(args.out) as tmp:
        for f in folders[-1].iterdir():
            if f.is_file() and f.name != WEIGHTS:
                shutil.copy2(f, tmp / f.name)
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
    print(f"averaged {len(folders)} checkpoints ({len(weights)} tensors) -> {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main()
