"""Small, deterministic fixtures for the plugin tests: a codebook and RL parquet rows that follow
``docs/data-format.md``."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conrec_verl.core import prompts
from conrec_verl.core.contract import GroundTruth, parse_ground_truth, rl_record
from conrec_verl.core.sid import Codebook, format_sid

SIZES = (4, 5, 6)
DIM = 8


def make_codebook(seed: int = 0, sizes=SIZES, dim: int = DIM) -> Codebook:
    rng = np.random.default_rng(seed)
    return Codebook([rng.normal(size=(s, dim)).astype(np.float32) for s in sizes], meta={"test": True})


def sid(*codes: int) -> str:
    return format_sid(codes)


def ground_truth(future_neg=(), swing=(), future_pos=(), next_neg=None, as_json=True, sid_build=None):
    gt = GroundTruth(future_neg=tuple(future_neg), swing=tuple(swing), future_pos=tuple(future_pos), next_neg=next_neg,
                     sid_build=make_codebook().fingerprint if sid_build is None else sid_build)
    return gt.to_json() if as_json else parse_ground_truth(gt.to_json())


def random_sid(rng, sizes=SIZES) -> str:
    return format_sid([int(rng.integers(0, s)) for s in sizes])


def make_rl_rows(n: int, seed: int = 0, sizes=SIZES, hist_len=(2, 12)) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        neg = [random_sid(rng, sizes) for _ in range(int(rng.integers(*hist_len)))]
        n_recent = int(rng.integers(0, len(neg) + 1)) if i % 3 else max(1, len(neg) // 2)
        recent = neg[len(neg) - n_recent:] if neg and n_recent else []
        pos = [random_sid(rng, sizes) for _ in range(int(rng.integers(*hist_len)) * 3)]
        gt = ground_truth([random_sid(rng, sizes)], [], [random_sid(rng, sizes)])
        rows.append(rl_record(
            prompt_text=prompts.render_history_prompt(2, recent, neg, pos), ground_truth=GroundTruth.parse(gt),
            extra_info={"split": "train", "index": i, "user_id": f"u{i}", "cutoff_day": 20220501,
                        # as data_prep assigns: one context the row is eligible for
                        "context": [c for c in (1, 2, 3) if c != 1 or recent][i % (3 if recent else 2)] if neg else 2,
                        "long_tail_user": False,
                        "sid_build": make_codebook().fingerprint},
            hist_neg_recent=recent, hist_neg=neg, hist_pos=pos))
    return rows


def write_parquet(rows: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
