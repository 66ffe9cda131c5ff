"""A small synthetic data folder for smoke runs of verl with the CoNRec plugins.

It follows ``docs/data-format.md`` (codebook, SID map, RL parquet with histories and a
ground-truth JSON) but is generated from a seeded random log in a second, so CPU smoke tests of
``main_ppo`` need neither the real sample nor a ``data_prep`` build. Users train on real
``data_prep`` folders; this exists for tests, CI and a first "does my install work" run.

``python -m conrec_verl.smoke --out DIR`` writes the folder and a tiny model beside it;
``--train [overrides...]`` then runs two GRPO steps of stock ``main_ppo`` on CPU on it (the install check).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from conrec_verl.core.contract import GroundTruth, rl_record
from conrec_verl.core.prompts import render_history_prompt
from conrec_verl.core.sid import SID_TOKEN_RE, Codebook, format_sid
from conrec_verl.io_utils import atomic_dir


def write_smoke_dataset(out_dir: str | os.PathLike, sid_sizes: Sequence[int] = (16, 16, 16), n_items: int = 200,
                        n_train: int = 64, n_val: int = 8, dim: int = 16, seed: int = 0) -> Path:
    """Write ``codebook.npz``, ``sid_map.parquet``, ``rl/train.parquet``, ``rl/val.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    codebook = Codebook([rng.normal(size=(s, dim)).astype(np.float32) / (level + 1)
                         for level, s in enumerate(sid_sizes)], meta={"source": "conrec_verl.smoke"})
    capacity = int(np.prod(sid_sizes))
    if n_items > capacity:
        raise ValueError(f"n_items={n_items} exceeds the codebook capacity {capacity}")
    flat = rng.choice(capacity, size=n_items, replace=False)
    codes = np.stack(np.unravel_index(flat, tuple(sid_sizes)), axis=1)
    sids = [format_sid(c) for c in codes]
    # items cluster by first level: "users" dislike a few clusters, so the task is learnable
    by_cluster: dict[int, list[int]] = {}
    for idx, c in enumerate(codes):
        by_cluster.setdefault(int(c[0]), []).append(idx)
    clusters = sorted(by_cluster)

    def rows(n: int, split: str, offset: int) -> list[dict]:
        out = []
        for k in range(n):
            disliked = rng.choice(clusters, size=min(2, len(clusters)), replace=False)
            pool = [i for c in disliked for i in by_cluster[int(c)]]
            liked_pool = [i for i in range(n_items) if int(codes[i][0]) not in set(map(int, disliked))]
            hist_neg = [sids[i] for i in rng.choice(pool, size=min(6, len(pool)), replace=True)]
            hist_pos = [sids[i] for i in rng.choice(liked_pool, size=min(6, len(liked_pool)), replace=False)]
            future_neg = sorted({sids[i] for i in rng.choice(pool, size=min(3, len(pool)), replace=False)})
            future_pos = sorted({sids[i] for i in rng.choice(liked_pool, size=min(3, len(liked_pool)), replace=False)})
            truth = GroundTruth(future_neg=future_neg, future_pos=future_pos, next_neg=future_neg[0],
                                sid_build=codebook.fingerprint)
            stage = (1, 2, 3)[k % 3] if split == "train" else 2  # every row is eligible for every context
            out.append(rl_record(
                prompt_text=render_history_prompt(stage, hist_neg[-2:], hist_neg, hist_pos), ground_truth=truth,
                extra_info={"split": split, "index": offset + k, "user_id": f"u{offset + k}",
                            "cutoff_day": 20220414, "context": stage, "long_tail_user": False,
                            "sid_build": codebook.fingerprint},
                hist_neg_recent=hist_neg[-2:], hist_neg=hist_neg, hist_pos=hist_pos))
        return out

    with atomic_dir(out_dir) as tmp:
        (tmp / "rl").mkdir()
        codebook.save(tmp / "codebook.npz")
        sid_table = {"item_id": [f"i{i}" for i in range(n_items)], "sid": sids}
        for level in range(len(sid_sizes)):
            sid_table[f"code_{level}"] = codes[:, level].astype(np.int32)
        sid_table["cold"] = np.zeros(n_items, dtype=bool)
        pq.write_table(pa.table(sid_table), tmp / "sid_map.parquet")
        pq.write_table(pa.Table.from_pylist(rows(n_train, "train", 0)), tmp / "rl" / "train.parquet")
        pq.write_table(pa.Table.from_pylist(rows(n_val, "val", n_train)), tmp / "rl" / "val.parquet")
        manifest = {"sid_build": codebook.fingerprint, "sid_sizes": list(sid_sizes), "source": "synthetic smoke",
                    "seed": seed, "counts": {"items": n_items, "rl_train": n_train, "rl_val": n_val}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, num_levels: int = 3, **kwargs) -> float:
    """A dense *format* reward for smoke runs: the share of one SID's tokens present in the output.

    ``min(1, #SID tokens / num_levels)``. A randomly initialised model emits a SID token now and
    then, so the reward varies inside a GRPO group from the first step and the smoke run sees
    real, non-zero policy gradients. Training runs use the CoNRec reward instead.
    """
    if not isinstance(solution_str, str):
        return 0.0
    return min(1.0, len(SID_TOKEN_RE.findall(solution_str)) / max(1, int(num_levels)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conrec_verl.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (data/ and model/ inside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true",
                        help="then run two GRPO steps of stock verl main_ppo on CPU on it (the recipe smoke_cpu, "
                             "from the installed package); a folder already built is reused")
    parser.add_argument("overrides", nargs="*", help="with --train: hydra overrides for main_ppo (key=value)")
    args = parser.parse_args(argv)
    if args.overrides and not args.train:
        parser.error(f"overrides {args.overrides} need --train")
    out = Path(args.out).resolve()
    if not (args.train and (out / "data" / "rl" / "train.parquet").is_file() and (out / "model" / "config.json").is_file()):
        from conrec_verl.model_builder import save_tiny_model

        data = write_smoke_dataset(out / "data", seed=args.seed)
        model = save_tiny_model(out / "model", Codebook.load(data / "codebook.npz").sizes)
        print(f"smoke data: {data}\nsmoke model: {model}", flush=True)
    if args.train:
        import sys

        from conrec_verl.recipes import CONFIG_PKG
        from conrec_verl.runtime.cpu_env import cpu_env
        from conrec_verl.runtime.own_ray import own_ray_overrides

        cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", CONFIG_PKG, "--config-name", "smoke_cpu",
               f"smoke_dir={out}", f"hydra.run.dir={out / 'outputs'}",  # nothing written outside --out
               *own_ray_overrides(args.overrides), *args.overrides]
        print("+ " + " ".join(cmd), flush=True)
        os.execvpe(cmd[0], cmd, {**os.environ, **cpu_env()})


if __name__ == "__main__":
    main()
