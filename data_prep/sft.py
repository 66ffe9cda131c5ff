"""SFT sets (verl ``MultiTurnSFTDataset`` rows: ``messages`` = [user, assistant] + ``extra_info``)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from conrec_verl.core.prompts import (
    LIKE_INSTRUCTION,
    render_alignment_prompt,
    render_history_prompt,
    render_sid_to_title_prompt,
    render_title_to_sid_prompt,
)
from conrec_verl.core.schedule import eligible_contexts
from conrec_verl.core.sid import SID_TOKEN_RE


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


def alignment_pools(train: pd.DataFrame, users: set, sid_of: dict, cfg: Mapping) -> tuple[dict, dict]:
    """4-way item-level alignment (with :func:`alignment_from_pools`): one item the user disliked (at
    least ``min_neg_count`` times) among 3 items the same user liked (and never disliked); the
    answer is the disliked SID; at most ``max_per_user`` questions per user (different disliked
    items). This half: per user of ``users`` in ``train`` (any part of the log, whole users): the items with a SID
    disliked at least ``min_neg_count`` times and those liked and never disliked, sorted. Pools of
    disjoint users merge by updating the dicts."""
    min_neg = int(cfg.get("min_neg_count", 1))
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

    return by_user(negs), by_user(pos)


def _user_rng(seed: int, user) -> np.random.Generator:
    """A generator of its own per user (seed and user id): a user's draws do not depend on the others,
    so any partition of the users draws the same questions."""
    import hashlib

    h = hashlib.blake2b(repr((seed, "alignment", str(user))).encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(h, "little")])


def alignment_from_pools(neg_of: dict, pos_of: dict, sid_of: dict, cfg: Mapping, seed: int) -> list[dict]:
    """The alignment questions from :func:`alignment_pools`: users in sorted order, each user's draws
    from a generator of its own (:func:`_user_rng`), so a partition of the users (engine=ray: on its
    worker) makes exactly its users' questions. ``extra_info.index`` numbers the questions in order."""
    per_user = int(cfg.get("max_per_user", 3))
    out = []
    for user in sorted(neg_of):
        liked = pos_of.get(user)
        if liked is None or len(liked) < 3:
            continue
        rng = _user_rng(seed, user)
        for neg in rng.permutation(neg_of[user])[:per_user]:
            distract = list(rng.choice(liked, size=3, replace=False))
            answer = int(rng.integers(0, 4))
            options = distract[:answer] + [neg] + distract[answer:]
            sids = [sid_of[i] for i in options]
            out.append({"messages": _msg(render_alignment_prompt(sids), sid_of[neg]),
                        "extra_info": {"task": "alignment", "user_id": str(user), "answer_index": answer,
                                       "index": len(out)}})
    return out


def check_heldout_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"sft.alignment.heldout_fraction must be in [0, 1), got {fraction!r}")


def heldout_positions(n: int, fraction: float, seed: int) -> set[int]:
    """Which of ``n`` rows (positions in order) :func:`split_heldout` holds out: a seeded ``fraction``
    of them, at least one when ``fraction > 0`` and ``n >= 2``."""
    check_heldout_fraction(fraction)
    n_out = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_out = max(1, n_out)
    return set(np.random.default_rng([seed, 7]).permutation(n)[:n_out].tolist()) if n_out else set()


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split SFT records into (trained, held out): the rows at :func:`heldout_positions` are held out
    of SFT training, e.g. so the forget rate of the alignment task is measured on questions the
    model never trained on. ``extra_info.index`` is renumbered within each part."""
    out_idx = heldout_positions(len(records), fraction, seed)
    kept = [r for i, r in enumerate(records) if i not in out_idx]
    held = [r for i, r in enumerate(records) if i in out_idx]
    for part in (kept, held):
        for j, r in enumerate(part):
            r["extra_info"] = dict(r["extra_info"], index=j)
    return kept, held


WARMUP_DEFAULTS = {"rows": "every_dislike", "contexts": [1, 2, 3], "max_history_items": 96, "targets": "next",
                   "likes": 0.0}


def warmup_config(raw) -> dict:
    """``sft.warmup``: ``true`` (defaults), ``false`` (no warm-up set) or a mapping of
    :data:`WARMUP_DEFAULTS` keys; unknown keys and values are errors naming the key."""
    from conrec_verl.data_prep.errors import DataPrepError

    if raw is False or raw is None:
        return {}
    cfg = dict(WARMUP_DEFAULTS)
    if raw is not True:
        if not isinstance(raw, Mapping):
            raise DataPrepError(f"sft.warmup must be true, false or a mapping, got {raw!r}")
        unknown = sorted(set(raw) - set(WARMUP_DEFAULTS))
        if unknown:
            raise DataPrepError(f"sft.warmup: unknown key(s) {unknown}; known: {sorted(WARMUP_DEFAULTS)}")
        cfg.update(raw)
    if cfg["rows"] not in ("every_dislike", "cutoffs"):
        raise DataPrepError(f"sft.warmup.rows must be every_dislike or cutoffs, got {cfg['rows']!r}")
    if cfg["targets"] not in ("next", "window"):
        raise DataPrepError(f"sft.warmup.targets must be next or window, got {cfg['targets']!r}")
    if cfg["targets"] == "window" and cfg["rows"] != "every_dislike":
        raise DataPrepError("sft.warmup.targets=window needs sft.warmup.rows=every_dislike (the cutoffs rows "
                            "answer the next future dislike of an RL row)")
    ctx = [int(c) for c in cfg["contexts"]]
    if not ctx or any(c not in (1, 2, 3) for c in ctx):
        raise DataPrepError(f"sft.warmup.contexts must be a non-empty list of 1, 2, 3, got {cfg['contexts']!r}")
    cfg["contexts"] = sorted(set(ctx))
    cfg["max_history_items"] = int(cfg["max_history_items"] or 0)
    try:
        if isinstance(cfg["likes"], bool):  # `likes: true` is no share
            raise TypeError
        cfg["likes"] = float(cfg["likes"] or 0.0)
    except (TypeError, ValueError):
        raise DataPrepError(f"sft.warmup.likes must be a number in [0, 1], got {cfg['likes']!r}") from None
    if not 0.0 <= cfg["likes"] <= 1.0:
        raise DataPrepError(f"sft.warmup.likes must be in [0, 1] (the share of like events kept), got {cfg['likes']!r}")
    if cfg["likes"] > 0 and cfg["rows"] != "every_dislike":
        raise DataPrepError("sft.warmup.likes needs sft.warmup.rows=every_dislike (like rows are asked at every "
                            "like of the sequence)")
    return cfg


def _pick_context(seed: int, user, key, allowed: Sequence[int]) -> int:
    from conrec_verl.data_prep.samples import _stable_uniform

    u = _stable_uniform(seed, "warmup_context", str(user), int(key))
    return allowed[min(int(u * len(allowed)), len(allowed) - 1)]


def every_dislike_records(train: pd.DataFrame, key: np.ndarray, recent: int, users: set, sid_of: dict,
                          cfg: Mapping, seed: int, num_levels: int, window: int = 0,
                          with_likes: bool = False) -> list[dict]:
    """Warm-up SFT at the baselines' scale: one row per dislike (of an item with a SID) of every
    training user before the user's evaluation cutoff, whose history before it holds a dislike.

    History = the user's events strictly earlier (by timestamp) than the dislike (likes and dislikes
    of items with a SID; ``recent`` = those with ``key > key_dislike - recent``, the split plan's
    key: day number or ms), target = the dislike's SID: the
    next-negative question asked at every position of the sequence, as SASRec learns it. Each row's
    prompt context is drawn (seeded per user and event) among ``cfg["contexts"]`` that its history
    can show with a non-empty negative section (:func:`eligible_contexts`), so warm-up SFT teaches
    every context GRPO and evaluation ask in; at most ``max_history_items`` SIDs (oldest dropped).
    ``train`` holds only events up to each user's evaluation cutoff (no test-window event).

    ``cfg["targets"] == "window"``: the same rows (same histories, contexts and prompts), but each
    row's target is drawn (seeded per user and event) uniformly among the user's dislikes in the
    ``window`` (key units, the split's ``window_days``) that starts at the anchor dislike: the
    dislike itself, those at the same time and later ones with ``key < key_anchor + window``, an
    item already in the history excluded. In expectation the model learns which items the user
    dislikes *within the window*, the question FHR and GTS ask, instead of the exact next one
    (the "dense all-action" target of future-window recommenders). Still no event after the
    evaluation cutoff: ``train`` ends there.

    ``with_likes`` and ``cfg["likes"] = s > 0`` (the training users' set; validation rows stay
    dislikes only, so the epoch chosen is the one that answers the dislike question best): a share
    ``s`` of the like events (kept by a seeded draw per user and event) become rows too, under the
    same eligibility and history rules, whose prompt asks for an item the user will like
    (:data:`conrec_verl.core.prompts.LIKE_INSTRUCTION`) and whose target is the liked item
    (``extra_info.task = "warmup_like"``; ``targets=window`` changes only the dislike rows). Likes
    outnumber dislikes in most logs (MovieLens-100K: about 3 to 1), so these rows teach which items
    go together from more of the sequence, as pre-training on the whole interaction log would."""
    from conrec_verl.data_prep.samples import _stable_uniform

    contexts = list(cfg["contexts"])
    in_window = cfg.get("targets", "next") == "window"
    if in_window and window <= 0:
        raise ValueError("every_dislike_records: targets=window needs the split's window in key units (window > 0)")
    fits = _sid_count_fits(int(cfg.get("max_history_items", 0) or 0), num_levels)
    df = train.assign(_key=key)
    df = df[df["user_id"].isin(users) & df["item_id"].isin(sid_of.keys())]
    df = df.sort_values(["user_id", "ts"], kind="stable")
    out: list[dict] = []
    u_arr = df["user_id"].to_numpy(dtype=object)
    if len(u_arr) == 0:
        return out
    items = df["item_id"].to_numpy(dtype=object)
    pol = df["polarity"].to_numpy()
    keys = df["_key"].to_numpy(dtype=np.int64)
    times = df["ts"].to_numpy(dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, u_arr[1:] != u_arr[:-1]])
    ends = np.r_[starts[1:], len(u_arr)]
    like_share = float(cfg.get("likes", 0.0) or 0.0) if with_likes else 0.0
    for s, e in zip(starts, ends):
        user = u_arr[s]
        sids = [sid_of[i] for i in items[s:e]]
        p, k, ts = pol[s:e], keys[s:e], times[s:e]
        asked = p < 0
        if like_share > 0:
            asked = asked | np.array([p[t] > 0 and _stable_uniform(seed, "warmup_like", str(user),
                                                                   int(k[t] * 1000 + t)) < like_share
                                      for t in range(len(p))], dtype=bool)
        for j in np.flatnonzero(asked):
            like = p[j] > 0
            h = int(np.searchsorted(ts, ts[j], side="left"))  # strictly earlier events only
            if h == 0:
                continue
            neg = [sids[t] for t in range(h) if p[t] < 0]
            allowed = [c for c in contexts if c in eligible_contexts(1, len(neg))]
            if not neg or not allowed:
                continue
            r0 = h - int(np.count_nonzero(k[:h] > k[j] - recent))  # keys rise with time: a suffix
            recent_neg = [sids[t] for t in range(r0, h) if p[t] < 0]
            allowed = [c for c in allowed if c in eligible_contexts(len(recent_neg), len(neg))]
            if not allowed:
                continue
            ctx = _pick_context(seed, user, k[j] * 1000 + j, allowed)
            pos = [sids[t] for t in range(h) if p[t] > 0] if ctx == 3 else []
            prompt = render_history_prompt(ctx, recent_neg, neg, pos, fits=fits,
                                           **({"instruction": LIKE_INSTRUCTION} if like else {}))
            target = sids[j]
            if in_window and not like:
                seen = set(sids[:h])
                end = h + int(np.searchsorted(k[h:], k[j] + window - 1, side="right"))
                pool = list(dict.fromkeys(sids[t] for t in range(h, end) if p[t] < 0 and sids[t] not in seen))
                if pool:  # empty only when every dislike in the window repeats a history item
                    u = _stable_uniform(seed, "warmup_target", str(user), int(k[j] * 1000 + j))
                    target = pool[min(int(u * len(pool)), len(pool) - 1)]
            out.append({"messages": _msg(prompt, target),
                        "extra_info": {"task": "warmup_like" if like else "warmup", "user_id": str(user),
                                       "cutoff_day": -1, "context": ctx, "index": len(out)}})
    return out


def _sid_count_fits(max_items: int, num_levels: int):
    if max_items <= 0:
        return None
    return lambda text: len(SID_TOKEN_RE.findall(text)) <= max_items * num_levels


def warmup_records(rows: pd.DataFrame, keys: list | None = None):
    """``sft.warmup.rows: cutoffs``: one row per RL training row, history (context 2: all
    negatives) -> the next future dislike that has a SID. With ``keys`` (one per row of ``rows``)
    returns ``(records, the keys of the rows kept)``."""
    out, kept = [], []
    for j, r in enumerate(rows.itertuples(index=False)):
        target = r.gt["next_neg"] or (r.gt["future_neg"][0] if r.gt["future_neg"] else None)
        if target is None:
            continue
        out.append({"messages": _msg(render_history_prompt(2, r.hist_neg_recent, r.hist_neg, r.hist_pos), target),
                    "extra_info": {"task": "warmup", "user_id": r.user_id, "cutoff_day": int(r.cutoff_day),
                                   "context": 2, "index": len(out)}})
        if keys is not None:
            kept.append(keys[j])
    return (out, kept) if keys is not None else out
