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
    df = train[train["user_id"].isin(users) & train["item_id"].isin(sid_of.keys())]
    out = []
    for user, grp in df.groupby("user_id", sort=True):
        neg_counts = grp.loc[grp["polarity"] < 0, "item_id"].value_counts()
        disliked_set = set(neg_counts.index)
        negs = sorted(neg_counts[neg_counts >= min_neg].index)
        pos = sorted(set(grp.loc[grp["polarity"] > 0, "item_id"]) - disliked_set)
        if not negs or len(pos) < 3:
            continue
        negs = list(rng.permutation(np.asarray(negs, dtype=object)))[:per_user]
        for neg in negs:
            distract = list(rng.choice(np.asarray(pos, dtype=object), size=3, replace=False))
            answer = int(rng.integers(0, 4))
            options = distract[:answer] + [neg] + distract[answer:]
            sids = [sid_of[i] for i in options]
            out.append({"messages": _msg(render_alignment_prompt(sids), sid_of[neg]),
                        "extra_info": {"task": "alignment", "user_id": str(user), "answer_index": answer,
                                       "index": len(out)}})
    return out


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
