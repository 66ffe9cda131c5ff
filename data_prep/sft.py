"""SFT sets (verl ``MultiTurnSFTDataset`` rows: ``messages`` = [user, assistant] + ``extra_info``)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from conrec_verl.core.prompts import (
    render_alignment_prompt,
    render_history_prompt,
    render_sid_to_title_prompt,
    render_title_to_sid_prompt,
)


def _msg(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def translation_records(items: pd.DataFrame | None, sid_of: dict) -> list[dict]:
    """SID -> title and title -> SID for every item that has both (only when titles exist)."""
    if items is None or "title" not in items.columns:
        return []
    out = []
    for item_id, title in zip(items["item_id"], items["title"]):
        title = str(title).strip()
        if not title or item_id not in sid_of:
            continue
        sid = sid_of[item_id]
        out.append({"messages": _msg(render_sid_to_title_prompt(sid), title),
                    "extra_info": {"task": "sid_to_title", "item_id": str(item_id), "index": len(out)}})
        out.append({"messages": _msg(render_title_to_sid_prompt(title), sid),
                    "extra_info": {"task": "title_to_sid", "item_id": str(item_id), "index": len(out)}})
    return out


def alignment_records(train: pd.DataFrame, users: set, sid_of: dict, cfg: Mapping, seed: int) -> list[dict]:
    """4-way item-level alignment: one item the user disliked (at least ``min_neg_count`` times)
    among 3 items the same user liked (and never disliked); the answer is the disliked SID.
    Only events of ``train`` (before the cutoff) and users in ``users`` are used; at most
    ``max_per_user`` questions per user (different disliked items)."""
    rng = np.random.default_rng(seed)
    min_neg = int(cfg.get("min_neg_count", 1))
    per_user = int(cfg.get("max_per_user", 3))
    df = train.loc[train["user_id"].isin(users) & train["item_id"].isin(sid_of.keys()), ["user_id", "item_id", "polarity"]]
    negs = df[df["polarity"] < 0].groupby(["user_id", "item_id"], sort=True).size().rename("n").reset_index()
    pos = df[df["polarity"] > 0][["user_id", "item_id"]].drop_duplicates()
    pos = pos.merge(negs[["user_id", "item_id"]], how="left", indicator=True)
    pos = pos[pos["_merge"] == "left_only"].sort_values(["user_id", "item_id"], kind="stable")
    negs = negs[negs["n"] >= min_neg]

    def by_user(frame):
        u = frame["user_id"].to_numpy()
        it = frame["item_id"].to_numpy(dtype=object)
        if len(u) == 0:
            return {}
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
        ends = np.r_[starts[1:], len(u)]
        return {u[s]: it[s:e] for s, e in zip(starts, ends)}

    neg_of, pos_of = by_user(negs), by_user(pos)
    out = []
    for user in sorted(neg_of):
        liked = pos_of.get(user)
        if liked is None or len(liked) < 3:
            continue
        for neg in rng.permutation(neg_of[user])[:per_user]:
            distract = list(rng.choice(liked, size=3, replace=False))
            answer = int(rng.integers(0, 4))
            options = distract[:answer] + [neg] + distract[answer:]
            sids = [sid_of[i] for i in options]
            out.append({"messages": _msg(render_alignment_prompt(sids), sid_of[neg]),
                        "extra_info": {"task": "alignment", "user_id": str(user), "answer_index": answer,
                                       "index": len(out)}})
    return out


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split SFT records into (trained, held out): a seeded ``fraction`` of the rows (at least one
    when ``fraction > 0`` and there are two or more rows) is held out of SFT training, e.g. so the
    forget rate of the alignment task is measured on questions the model never trained on.
    ``extra_info.index`` is renumbered within each part."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"sft.alignment.heldout_fraction must be in [0, 1), got {fraction!r}")
    n = len(records)
    n_out = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_out = max(1, n_out)
    out_idx = set(np.random.default_rng([seed, 7]).permutation(n)[:n_out].tolist()) if n_out else set()
    kept = [r for i, r in enumerate(records) if i not in out_idx]
    held = [r for i, r in enumerate(records) if i in out_idx]
    for part in (kept, held):
        for j, r in enumerate(part):
            r["extra_info"] = dict(r["extra_info"], index=j)
    return kept, held


def warmup_records(rows: pd.DataFrame) -> list[dict]:
    """History (stage-2 prompt: all negatives) -> the next future dislike that has a SID."""
    out = []
    for r in rows.itertuples(index=False):
        target = r.gt["next_neg"] or (r.gt["future_neg"][0] if r.gt["future_neg"] else None)
        if target is None:
            continue
        out.append({"messages": _msg(render_history_prompt(2, r.hist_neg_recent, r.hist_neg, r.hist_pos), target),
                    "extra_info": {"task": "warmup", "user_id": r.user_id, "cutoff_day": int(r.cutoff_day),
                                   "index": len(out)}})
    return out
