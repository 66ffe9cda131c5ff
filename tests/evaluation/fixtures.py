"""Tiny data folders that follow docs/data-format.md, built here (no data_prep needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conrec_verl.core.contract import GroundTruth, rl_record
from conrec_verl.core.prompts import render_alignment_prompt, render_history_prompt
from conrec_verl.core.sid import Codebook, format_sid


def make_data_folder(root: Path, n_users: int = 12, n_items: int = 40, sizes=(4, 4, 4), dim: int = 8,
                     seed: int = 0, with_alignment: bool = True) -> Path:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    book = Codebook([rng.normal(size=(s, dim)).astype(np.float32) for s in sizes])
    book.save(root / "codebook.npz")
    all_codes = [(a, b, c) for a in range(sizes[0]) for b in range(sizes[1]) for c in range(sizes[2])]
    codes = rnd.sample(all_codes, n_items)
    items = [f"i{j}" for j in range(n_items)]
    sid = {it: format_sid(c) for it, c in zip(items, codes)}
    pq.write_table(pa.table({
        "item_id": items, "sid": [sid[i] for i in items],
        **{f"code_{lv}": pa.array([c[lv] for c in codes], pa.int32()) for lv in range(len(sizes))},
        "cold": [False] * n_items, "source": ["collab"] * n_items,
    }), root / "sid_map.parquet")
    pairs = [(rnd.choice(items), rnd.choice(items)) for _ in range(60)]
    pairs = [(a, b) for a, b in dict.fromkeys(pairs) if a != b]
    pq.write_table(pa.table({"item_id": [a for a, _ in pairs], "neighbor_id": [b for _, b in pairs],
                             "score": [rnd.random() for _ in pairs]}), root / "swing.parquet")
    popular = items[:5]  # a few items many users dislike
    rows = []
    for u in range(n_users):
        hist = rnd.sample(popular, rnd.randint(0, 3)) + rnd.sample(items[5:], rnd.randint(0, 4))
        rest = [i for i in items if i not in hist]
        future = rnd.sample(rest, rnd.randint(0, 3))
        if rnd.random() < 0.5:
            future.insert(0, rnd.choice([p for p in popular if p not in hist and p not in future] or [rest[0]]))
            future = list(dict.fromkeys(future))
        n_cold = rnd.randint(0, 2) if future else rnd.randint(1, 2)
        pos = rnd.sample([i for i in rest if i not in future], 3)
        next_neg = sid[future[0]] if future and rnd.random() < 0.8 else None
        gt = GroundTruth(future_neg=tuple(sid[i] for i in future), future_pos=tuple(sid[i] for i in pos),
                         next_neg=next_neg, long_tail_items=tuple(sid[i] for i in future if i not in popular),
                         n_future_neg_cold=n_cold, sid_build=book.fingerprint)
        row = rl_record(
            prompt_text=render_history_prompt(2, [], [sid[i] for i in hist], []), ground_truth=gt,
            extra_info={"split": "test", "index": u, "user_id": str(u), "cutoff_day": 20220414, "context": 2,
                        "long_tail_user": len(hist) < 3, "sid_build": book.fingerprint},
            hist_neg_recent=[sid[i] for i in hist[-2:]], hist_neg=[sid[i] for i in hist], hist_pos=[sid[i] for i in pos[:1]])
        if future:
            others = rnd.sample([i for i in items if i not in future], 19)
            t = rnd.randrange(20)
            row["candidates"] = [sid[i] for i in others[:t]] + [sid[future[0]]] + [sid[i] for i in others[t:]]
            row["candidate_target"] = t
        else:
            row["candidates"] = []  # as data_prep writes a row without a candidate task
            row["candidate_target"] = -1
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), root / "eval" / "test.parquet")
    (root / "manifest.json").write_text(json.dumps({"sid_build": book.fingerprint, "counts": {"items": n_items}}))
    if with_alignment:
        (root / "sft").mkdir(exist_ok=True)
        al = []
        for _ in range(6):
            opts = rnd.sample(items, 4)
            al.append({"messages": [{"role": "user", "content": render_alignment_prompt([sid[i] for i in opts])},
                                    {"role": "assistant", "content": sid[opts[rnd.randrange(4)]]}]})
        pq.write_table(pa.Table.from_pylist(al[:3]), root / "sft" / "alignment.parquet")
        # data_prep holds a share of the questions out of SFT: the forget rate is measured on them
        pq.write_table(pa.Table.from_pylist(al[3:]), root / "sft" / "alignment_heldout.parquet")
    return root
