"""Time-based samples: (user, cutoff) -> histories before the cutoff and targets after it.

Two split modes (``split.mode``):

* ``global_day`` -- one calendar cutoff for everybody. Event key = day number. History = events on
  days ``<= cutoff`` (the cutoff is the *end* of the cutoff day); future window = days
  ``cutoff+1 .. cutoff+window_days``. Training cutoffs are earlier days: with
  ``split.train_windows: full`` (default) at most ``eval_cutoff - window_days``, so every training
  row sees the same full window as evaluation and nothing of the test window; ``truncated`` allows
  later cutoffs whose windows are cut at the evaluation cutoff (logs too short for full windows).
* ``per_user`` -- each user's evaluation cutoff is the timestamp of the event at
  ``user_fraction`` of the user's events (ties at that timestamp stay in the history); the window
  is ``(cutoff, cutoff + window_days * 24h]``. Training cutoffs sit at ``train_fractions`` of
  the user's events; with ``train_windows: full`` a training cutoff later than the user's
  ``eval_cutoff - window_days`` moves back to the last event at or before it (users with no such
  event have no training row), with ``truncated`` windows are cut at the evaluation cutoff.

"Last N days" (``recent_days``) = the N calendar days ending with the cutoff day (global) or the
``N * 24h`` before the cutoff timestamp (per_user).

Everything here is plain numpy/pandas; SIDs arrive as a lookup array.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from conrec_verl.core.contract import GroundTruth, rl_record
from conrec_verl.core.prompts import render_history_prompt
from conrec_verl.core.schedule import eligible_contexts
from conrec_verl.data_prep.errors import DataPrepError

DAY_MS = 86_400_000
EPOCH = pd.Timestamp("1970-01-01")


def day_number(yyyymmdd: np.ndarray | int) -> np.ndarray:
    """Days since 1970-01-01 of ``YYYYMMDD`` ints."""
    uniq, inverse = np.unique(np.atleast_1d(yyyymmdd), return_inverse=True)
    s = pd.to_datetime(pd.Series(uniq).astype(str), format="%Y%m%d")
    return ((s - EPOCH).dt.days).to_numpy(dtype=np.int64)[inverse]


def yyyymmdd(day_num: int) -> int:
    d = EPOCH + pd.Timedelta(days=int(day_num))
    return d.year * 10000 + d.month * 100 + d.day


@dataclass
class SplitPlan:
    """Per-event key plus, per user, the evaluation cutoff and the training cutoffs (in key units)."""

    mode: str
    key: np.ndarray                 # per event (aligned with the interactions frame)
    window: int                     # in key units
    recent: int                     # in key units
    eval_cut: dict                  # user -> cutoff key
    train_cuts: dict                # user -> list of cutoff keys
    info: dict = field(default_factory=dict)

    def cutoff_day(self, cut: int) -> int:
        if self.mode == "global_day":
            return yyyymmdd(cut)
        d = pd.Timestamp(int(cut), unit="ms")
        return d.year * 10000 + d.month * 100 + d.day

    def event_keys(self, events: pd.DataFrame) -> np.ndarray:
        """The key of each event of ``events`` (any subset of the log): its day number
        (``global_day``) or its timestamp (``per_user``)."""
        return event_keys(self.mode, events)

    def train_mask(self, users: np.ndarray) -> np.ndarray:
        """Events strictly usable for embeddings, SIDs and Swing: key <= the user's eval cutoff."""
        if self.mode == "global_day":  # one cutoff for everybody
            return self.key <= next(iter(self.eval_cut.values()))
        codes, uniq = pd.factorize(pd.Series(users, dtype=object))
        cut = np.array([self.eval_cut[u] for u in uniq.tolist()], dtype=np.int64)
        return self.key <= cut[codes]


def event_keys(mode: str, events: pd.DataFrame) -> np.ndarray:
    """Per event: the day number (``global_day``) or the epoch-ms timestamp (``per_user``)."""
    if mode == "global_day":
        return day_number(events["day"].to_numpy()) if len(events) else np.zeros(0, np.int64)
    return events["ts"].to_numpy(dtype=np.int64)


def plan_split(inter: pd.DataFrame, cfg: Mapping, day_range: tuple[int, int] | None = None) -> SplitPlan:
    """The split plan of ``inter`` (the log, or with ``day_range`` = the whole log's first and last
    day numbers, any subset of its users: a partition of the Ray engine; ``per_user`` plans need no
    range, every user's cutoffs come from the user's own events)."""
    mode = cfg.get("mode", "global_day")
    window_days = int(cfg.get("window_days", 7))
    recent_days = int(cfg.get("recent_days", 3))
    if window_days < 1 or recent_days < 1:
        raise DataPrepError("split.window_days and split.recent_days must be >= 1")
    windows = cfg.get("train_windows", "full")
    if windows not in ("full", "truncated"):
        raise DataPrepError(f"split.train_windows must be 'full' or 'truncated', got {windows!r}")
    full = windows == "full"
    users = inter["user_id"].to_numpy(dtype=object)
    if mode == "global_day":
        uniq = pd.unique(users)
        key = event_keys(mode, inter)
        first, last = day_range if day_range is not None else (int(key.min()), int(key.max()))
        ec = cfg.get("eval_cutoff_day")
        if ec is None or ec == "???":
            raise DataPrepError(f"split.eval_cutoff_day (YYYYMMDD, or auto) is required for split.mode=global_day; "
                                f"the log covers {yyyymmdd(first)}..{yyyymmdd(last)}, and auto would take "
                                f"{yyyymmdd(max(first, last - window_days))} (the last window_days={window_days} held "
                                "out for evaluation)")
        if ec == "auto":  # the last window_days of the log are the evaluation window
            ec = yyyymmdd(max(first, last - window_days))
        try:
            t_e = int(day_number(int(ec))[0])
        except (ValueError, TypeError) as exc:
            raise DataPrepError(f"split.eval_cutoff_day must be YYYYMMDD, got {ec!r}") from exc
        if not first <= t_e < last:
            raise DataPrepError(f"split.eval_cutoff_day={ec} must fall inside the log ({yyyymmdd(first)}.."
                                f"{yyyymmdd(last)}) and leave at least one later day")
        tc = cfg.get("train_cutoff_days", "auto")
        last_cut = t_e - window_days if full else t_e - 1
        if tc in (None, "auto"):
            n = int(cfg.get("num_train_cutoffs", 5))
            min_hist = int(cfg.get("min_history_days", 1))
            cuts = [t for t in range(last_cut - n + 1, last_cut + 1) if t >= first + min_hist - 1]
            if not cuts:
                raise DataPrepError(
                    f"no training cutoff fits: the log starts {yyyymmdd(first)}, and with split.train_windows=full a "
                    f"training cutoff must be on or before {yyyymmdd(last_cut)} (eval cutoff {ec} - window_days "
                    f"{window_days}); use a later split.eval_cutoff_day, a shorter split.window_days, or "
                    "split.train_windows=truncated")
        else:
            cuts = sorted(int(day_number(int(d))[0]) for d in tc)
            bad = [yyyymmdd(c) for c in cuts if c > last_cut or c < first]
            if bad:
                raise DataPrepError(f"split.train_cutoff_days {bad} must be inside the log and on or before "
                                    f"{yyyymmdd(last_cut)} (" + (f"eval cutoff {ec} - window_days {window_days}, "
                                    "split.train_windows=full" if full else f"before the evaluation cutoff {ec}") + ")")
        info = {"mode": mode, "eval_cutoff_day": yyyymmdd(t_e), "eval_cutoff_from": "auto" if
                cfg.get("eval_cutoff_day") == "auto" else "config",
                "train_cutoff_days": [yyyymmdd(c) for c in cuts],
                "window_days": window_days, "recent_days": recent_days, "train_windows": windows,
                "log_days": [yyyymmdd(first), yyyymmdd(last)],
                "eval_window_complete": bool(t_e + window_days <= last)}
        return SplitPlan(mode, key, window_days, recent_days, {u: t_e for u in uniq}, {u: list(cuts) for u in uniq},
                         info)
    if mode == "per_user":
        frac = float(cfg.get("user_fraction", 0.7))
        fracs = [float(f) for f in (cfg.get("train_fractions") or [])]
        if not 0 < frac < 1 or any(not 0 < f < frac for f in fracs):
            raise DataPrepError(f"split.user_fraction must be in (0, 1) and every train_fraction in (0, user_fraction); "
                                f"got {frac} and {fracs}")
        key = event_keys(mode, inter)
        # events are sorted by (user, ts): positions within each user
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(users)]
        eval_cut, train_cuts = {}, {}
        moved = dropped = 0
        for s, e in zip(starts, ends):
            n = e - s
            ec_u = int(key[s + max(1, math.ceil(frac * n)) - 1])
            eval_cut[users[s]] = ec_u
            cuts = {int(key[s + max(1, math.ceil(f * n)) - 1]) for f in fracs}
            if full:
                latest = ec_u - window_days * DAY_MS
                fixed = set()
                for c in cuts:
                    if c <= latest:
                        fixed.add(c)
                        continue
                    j = int(np.searchsorted(key[s:e], latest, side="right"))  # events at or before `latest`
                    if j == 0:
                        dropped += 1
                    else:
                        moved += 1
                        fixed.add(int(key[s + j - 1]))
                cuts = fixed
            train_cuts[users[s]] = sorted(cuts)
        info = {"mode": mode, "user_fraction": frac, "train_fractions": fracs, "window_days": window_days,
                "recent_days": recent_days, "train_windows": windows}
        if full:
            info.update(train_cutoffs_moved_back=moved, train_cutoffs_without_full_window=dropped)
        return SplitPlan(mode, key, window_days * DAY_MS, recent_days * DAY_MS, eval_cut, train_cuts, info)
    raise DataPrepError(f"split.mode must be global_day or per_user, got {mode!r}")


def _stable_uniform(seed: int, *parts) -> float:
    """A reproducible number in [0, 1) from ``seed`` and the parts (independent of row order)."""
    import hashlib

    h = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2 ** 64


def is_val_user(seed: int, user, fraction: float) -> bool:
    """Held-out validation users: a seeded hash of the user id (independent of row order)."""
    return _stable_uniform(seed, "val", str(user)) < fraction


@dataclass
class SampleContext:
    inter: pd.DataFrame
    plan: SplitPlan
    sid_of: dict                  # item_id -> SID string (items with a SID)
    neighbors: dict               # item_id -> list of Swing neighbour ids, best first (already top-n)
    item_neg_count: dict          # item_id -> dislikes in the training period
    sid_build: str
    seed: int
    cfg: Mapping                  # the ``samples`` config group


@dataclass
class _Lookup:
    """Item-code-indexed arrays (built once) so rows are made with numpy, not dict lookups."""

    labels: np.ndarray     # code -> item id
    sid: np.ndarray        # code -> SID string or None
    has_sid: np.ndarray    # code -> bool
    neg_count: np.ndarray  # code -> training-period dislikes
    neighbors: dict        # code -> array of neighbour codes (with SIDs), best first


def _lookup(ctx: SampleContext, labels: np.ndarray) -> _Lookup:
    code_of = {l: c for c, l in enumerate(labels.tolist())}
    sid = np.array([ctx.sid_of.get(l) for l in labels.tolist()], dtype=object)
    has = np.array([l in ctx.sid_of for l in labels.tolist()], dtype=bool)
    cnt = np.array([ctx.item_neg_count.get(l, 0) for l in labels.tolist()], dtype=np.int64)
    nb = {}
    for i, js in ctx.neighbors.items():
        if i in code_of:
            nb[code_of[i]] = np.array([code_of[j] for j in js if j in code_of and j in ctx.sid_of], dtype=np.int64)
    return _Lookup(labels, sid, has, cnt, nb)


def _first_occurrences(x: np.ndarray) -> np.ndarray:
    """Distinct values in order of first occurrence (a dict keeps that order; per-row arrays are
    short, where this is several times faster than ``np.unique(return_index=True)``)."""
    if len(x) < 2:
        return x
    return np.fromiter(dict.fromkeys(x.tolist()), dtype=x.dtype)


def _row(ctx: SampleContext, lk: _Lookup, user, cut: int, horizon: int, key, items, pol, days,
         split: str) -> dict | str:
    """One sample dict, or the reason it is skipped. ``items`` are item codes of ``lk``."""
    cfg = ctx.cfg
    p = ctx.plan
    h = int(np.searchsorted(key, cut, side="right"))
    if h == 0:
        return "empty_history"
    end = int(np.searchsorted(key, min(cut + p.window, horizon), side="right"))
    r0 = int(np.searchsorted(key, cut - p.recent, side="right"))
    hist_items, hist_pol = items[:h], pol[:h]
    neg_hist_items = hist_items[hist_pol < 0]
    if len(neg_hist_items) == 0 and cfg.get("require_negative_history", False):
        return "no_negative_history"
    fut_items, fut_pol = items[h:end], pol[h:end]
    fut_neg_mask = fut_pol < 0
    fut_neg_all = _first_occurrences(fut_items[fut_neg_mask])
    if len(fut_neg_all) == 0:
        return "no_future_negative"
    fut_neg = fut_neg_all[lk.has_sid[fut_neg_all]]
    n_cold = len(fut_neg_all) - len(fut_neg)
    if len(fut_neg) == 0 and (split != "test" or not cfg.get("eval_keep_cold_only_rows", True)):
        return "only_cold_future_negatives"
    max_hist = int(cfg.get("max_history", 0) or 0)

    def sids(codes):
        codes = codes[lk.has_sid[codes]]
        if max_hist > 0:
            codes = codes[-max_hist:]
        return lk.sid[codes].tolist()

    rec_items, rec_pol = items[r0:h], pol[r0:h]
    swing: list = []
    seen = set(fut_neg.tolist())
    for i in fut_neg.tolist():
        for j in lk.neighbors.get(i, ()).tolist() if i in lk.neighbors else ():
            if j not in seen:
                seen.add(j)
                swing.append(j)
    fut_pos = _first_occurrences(fut_items[fut_pol > 0])
    if len(fut_pos):
        neg_set = set(fut_neg_all.tolist())
        fut_pos = fut_pos[lk.has_sid[fut_pos] & np.fromiter((v not in neg_set for v in fut_pos.tolist()), bool,
                                                           len(fut_pos))]
    first_neg = fut_items[fut_neg_mask][0]
    target_day = -1
    if len(fut_neg):
        hit = np.flatnonzero(fut_neg_mask & (fut_items == fut_neg[0]))
        target_day = int(days[h + hit[0]])
    lt_item_max = int(cfg.get("long_tail_item_max_neg", 5))
    lt_user_max = int(cfg.get("long_tail_user_max_neg", 3))
    gt = {"future_neg": lk.sid[fut_neg].tolist(),
          "swing": lk.sid[np.asarray(swing, dtype=np.int64)].tolist(),
          "future_pos": lk.sid[fut_pos].tolist(),
          "next_neg": lk.sid[first_neg],
          "long_tail_items": lk.sid[fut_neg[lk.neg_count[fut_neg] < lt_item_max]].tolist(),
          "n_future_neg_cold": int(n_cold),
          "n_future_neg": int(len(fut_neg_all)),
          "sid_build": ctx.sid_build}
    window_end = min(cut + p.window, horizon)
    return {
        "user_id": str(user), "cut": int(cut), "split": split,
        "cutoff_day": _cutoff_day(p.mode, int(cut)),
        "window_days": int(round((window_end - cut) / (1 if p.mode == "global_day" else DAY_MS))),
        "hist_neg_recent": sids(rec_items[rec_pol < 0]), "hist_neg": sids(neg_hist_items),
        "hist_pos": sids(hist_items[hist_pol > 0]),
        "gt": gt, "long_tail_user": bool(len(neg_hist_items) < lt_user_max),
        "future_neg_items": lk.labels[fut_neg].tolist(), "target_day": target_day,
    }


@functools.lru_cache(maxsize=4096)
def _cutoff_day(mode: str, cut: int) -> int:
    """``SplitPlan.cutoff_day`` memoised: a row's cutoff is one of few values (global_day) and the
    date arithmetic costs more than the rest of the row."""
    return SplitPlan(mode, np.zeros(0), 0, 0, {}, {}).cutoff_day(cut)


def _per_user_arrays(inter: pd.DataFrame, key: np.ndarray, item_codes: np.ndarray):
    users = inter["user_id"].to_numpy()
    # sorted integer codes order users exactly as the ids sort, and lexsort on integers is fast
    u_codes, _ = pd.factorize(users, sort=True)
    order = np.lexsort((inter["ts"].to_numpy(), key, u_codes))
    users, key = users[order], key[order]
    items = item_codes[order]
    pol = inter["polarity"].to_numpy()[order]
    days = inter["day"].to_numpy()[order]
    codes = u_codes[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], len(users)]
    for s, e in zip(starts, ends):
        yield users[s], key[s:e], items[s:e], pol[s:e], days[s:e]


def item_lookup(ctx: SampleContext, items: np.ndarray | None = None) -> _Lookup:
    """The item tables every sample is made from (SIDs, Swing neighbours, dislike counts), indexed by
    the codes of ``items`` (default: ``ctx.inter``'s items; the codes are internal, the rows do not
    depend on them); built once and shared by every user partition."""
    if items is None:
        _, items = pd.factorize(ctx.inter["item_id"])
    return _lookup(ctx, np.asarray(items, dtype=object))


def build_samples(ctx: SampleContext, lookup: _Lookup | None = None,
                  progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Training/validation samples (``split`` = train | val) and test samples, plus counts.

    Users are independent: ``ctx.inter`` may hold any subset of users (a partition, with
    ``ctx.plan.key`` aligned to it) and ``lookup`` the item tables of the whole log
    (:func:`item_lookup`); the rows of a user do not depend on the other users."""
    p = ctx.plan
    cfg = ctx.cfg
    val_frac = float(cfg.get("val_user_fraction", 0.1))
    counts: dict = {"train": {}, "test": {}}
    train_rows, test_rows = [], []
    n_users = ctx.inter["user_id"].nunique()
    lk = lookup if lookup is not None else item_lookup(ctx)
    codes = pd.Index(lk.labels).get_indexer(ctx.inter["item_id"])
    if len(codes) and codes.min() < 0:
        raise ValueError("build_samples: the lookup lacks items of the interactions")
    test_horizon = np.iinfo(np.int64).max // 2
    for user, key, items, pol, days in tqdm(_per_user_arrays(ctx.inter, p.key, codes.astype(np.int64)), total=n_users,
                                            desc="samples", leave=False, disable=not progress):
        is_val = is_val_user(ctx.seed, user, val_frac)
        e_cut = p.eval_cut[user]
        for cut in p.train_cuts.get(user, ()):
            row = _row(ctx, lk, user, cut, e_cut, key, items, pol, days, "val" if is_val else "train")
            if isinstance(row, str):
                counts["train"][row] = counts["train"].get(row, 0) + 1
            else:
                train_rows.append(row)
        row = _row(ctx, lk, user, e_cut, test_horizon, key, items, pol, days, "test")
        if isinstance(row, str):
            counts["test"][row] = counts["test"].get(row, 0) + 1
        else:
            test_rows.append(row)
    return pd.DataFrame(train_rows), pd.DataFrame(test_rows), counts


def assign_stages(rows: pd.DataFrame, cfg: Mapping, seed: int) -> pd.DataFrame:
    """Progressive-GRPO stage per training row.

    ``partition`` (default): every row gets one stage at random (reproducible per user x cutoff)
    among the contexts it is eligible for (:func:`conrec_verl.core.schedule.eligible_contexts`:
    context 1 needs negatives in the last ``recent_days``, every context needs a negative);
    ``replicate``: every row appears once per eligible stage. Rows with no negative history fit no
    stage and are dropped here. Rows are ordered by stage, then cutoff, then user. The dataset
    adapter trains stage k on the rows assigned to k (``data.conrec.stage_rows: assigned``).
    """
    stages = [int(s) for s in cfg.get("contexts") or [1, 2, 3]]
    how = cfg.get("context_assignment") or "partition"
    if rows.empty:
        return rows.assign(stage=pd.Series(dtype=np.int64))
    ok = [eligible_contexts(len(a), len(b)) for a, b in zip(rows["hist_neg_recent"], rows["hist_neg"])]
    if how == "replicate":
        parts = []
        for s in stages:
            part = rows[[s in e for e in ok]]
            parts.append(part.assign(stage=s))
        out = pd.concat(parts, ignore_index=True)
    elif how == "partition":
        st = []
        for r, e in zip(rows.itertuples(), ok):
            allowed = [s for s in stages if s in e]
            if not allowed:
                st.append(-1)
                continue
            u = _stable_uniform(seed, "stage", r.user_id, r.cut)
            st.append(allowed[min(int(u * len(allowed)), len(allowed) - 1)])
        out = rows.assign(stage=st)
        out = out[out["stage"] > 0]
    else:
        raise DataPrepError(f"rl.context_assignment must be partition or replicate, got {how!r}")
    return out.sort_values(["stage", "cut", "user_id"], kind="stable").reset_index(drop=True)


def rl_records(rows: pd.DataFrame, split: str, sid_build: str, stage_col: str | int = "stage") -> list[dict]:
    """verl RL rows (see docs/data-format.md), written with the contract's one writer."""
    out = []
    for idx, r in enumerate(rows.itertuples(index=False)):
        stage = int(getattr(r, stage_col)) if isinstance(stage_col, str) else int(stage_col)
        out.append(rl_record(
            prompt_text=render_history_prompt(stage, r.hist_neg_recent, r.hist_neg, r.hist_pos),
            ground_truth=GroundTruth(**r.gt),
            extra_info={"split": split, "index": idx, "user_id": r.user_id, "cutoff_day": int(r.cutoff_day),
                        "context": stage, "long_tail_user": bool(r.long_tail_user), "sid_build": sid_build,
                        "window_days": int(r.window_days), "n_hist_neg": len(r.hist_neg)},
            hist_neg_recent=r.hist_neg_recent, hist_neg=r.hist_neg, hist_pos=r.hist_pos))
    return out


def _group_arrays(df: pd.DataFrame, keys: list[str]) -> dict:
    """``{key (tuple when several): sorted array of item_id}`` without a per-group pandas apply."""
    if df.empty:
        return {}
    df = df.sort_values(keys + ["item_id"], kind="stable")
    items = df["item_id"].to_numpy(dtype=object)
    kcols = [df[k].to_numpy() for k in keys]
    change = np.zeros(len(df), dtype=bool)
    change[0] = True
    for col in kcols:
        change[1:] |= col[1:] != col[:-1]
    starts = np.flatnonzero(change)
    ends = np.r_[starts[1:], len(df)]
    out = {}
    for s, e in zip(starts, ends):
        key = tuple(col[s] for col in kcols) if len(keys) > 1 else kcols[0][s]
        out[key] = items[s:e]
    return out


def candidate_wanted(test_rows: pd.DataFrame) -> pd.DataFrame:
    """The (user, day) pairs whose same-day likes the candidate sets draw from."""
    return pd.DataFrame({"user_id": test_rows["user_id"].to_numpy(),
                         "day": test_rows["target_day"].to_numpy()}).drop_duplicates()


def day_item_pairs(inter: pd.DataFrame, sid_of: dict) -> pd.DataFrame:
    """The distinct (day, item) pairs of items with a SID in any part of the log; pairs of disjoint
    user partitions merge by concatenating (then :func:`day_item_pools`)."""
    with_sid = inter.loc[inter["item_id"].isin(sid_of.keys()), ["day", "item_id"]]
    return with_sid.drop_duplicates()


def user_day_likes(inter: pd.DataFrame, sid_of: dict, wanted: pd.DataFrame) -> dict:
    """Per wanted (user, day): the items with a SID the user liked that day (sorted). Needs the
    wanted users' events only."""
    likes = inter.loc[(inter["polarity"].to_numpy() > 0) & inter["item_id"].isin(sid_of.keys()).to_numpy(),
                      ["user_id", "day", "item_id"]].drop_duplicates()
    return _group_arrays(likes.merge(wanted, on=["user_id", "day"]), ["user_id", "day"])


@dataclass
class CandidatePools:
    """What :func:`candidate_sets` draws from besides a user's own likes, built once for the whole
    log: every item with a SID (sorted) and, per day, the positions in it of the items anyone
    interacted with that day (sorted; int32 positions instead of item ids keep the pools of a big
    log small enough to send to every worker)."""

    items: np.ndarray
    day: dict

    @classmethod
    def from_pairs(cls, sid_of: dict, pairs: pd.DataFrame, items: np.ndarray | None = None) -> "CandidatePools":
        """``items``: ``sorted(sid_of)`` when the caller has it already."""
        items = np.asarray(sorted(sid_of), dtype=object) if items is None else items
        pairs = pairs.drop_duplicates()
        pos = pd.Index(items).get_indexer(pairs["item_id"].to_numpy(dtype=object)).astype(np.int32)
        frame = pd.DataFrame({"day": pairs["day"].to_numpy(), "pos": pos}).sort_values(["day", "pos"], kind="stable")
        days, pos = frame["day"].to_numpy(), frame["pos"].to_numpy()
        starts = np.flatnonzero(np.r_[True, days[1:] != days[:-1]]) if len(days) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(days)]
        return cls(items, {int(days[s]): pos[s:e] for s, e in zip(starts, ends)})


def row_rng(seed: int, *parts) -> np.random.Generator:
    """A generator of its own for one row (seeded by ``seed`` and the row's key, e.g. its user): draws
    that do not depend on which other rows exist or in which order, or on which worker, they are made."""
    import hashlib

    h = hashlib.blake2b(repr((int(seed),) + tuple(str(p) for p in parts)).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def candidate_sets(test_rows: pd.DataFrame, sid_of: dict, seed: int, n_candidates: int, pools: CandidatePools,
                   own_likes: dict) -> tuple[list, list, dict]:
    """Candidate Acc sets: the target is the first future dislike that has a SID; the other
    ``n_candidates - 1`` come, in order, from (1) items the same user liked that same calendar day
    (``own_likes``: :func:`user_day_likes`), (2) items anyone interacted with that day, (3) any item
    with a SID (``pools``). None of them is a future dislike of the user. The log holds likes/hates
    only (no impressions), so (1)+(2) is the closest equivalent of "the others shown that day". Rows
    without a SID'd future dislike get ``[]``, -1. Each row draws from a generator seeded by ``seed``
    and its user (:func:`row_rng`), so a user's set is the same whichever users are built with it."""
    items = pools.items
    no_pos = np.empty(0, np.int32)
    cands, targets = [], []
    used = {"same_user_same_day": 0, "same_day": 0, "random": 0, "rows": 0, "rows_without_target": 0}
    for r in test_rows.itertuples(index=False):
        if not r.future_neg_items:
            cands.append([])
            targets.append(-1)
            used["rows_without_target"] += 1
            continue
        rng = row_rng(seed, "candidates", r.user_id, r.cutoff_day)
        target = r.future_neg_items[0]
        day = int(r.target_day)
        exclude = set(r.future_neg_items) | {target}
        picked: list = []
        chosen = set()
        own = own_likes.get((r.user_id, day))
        day_pos = pools.day.get(day, no_pos)
        for source, n, take in (("same_user_same_day", 0 if own is None else len(own), lambda idx: own[idx]),
                                ("same_day", len(day_pos), lambda idx: items[day_pos[idx]]),
                                ("random", len(items), lambda idx: items[idx])):
            need = n_candidates - 1 - len(picked)
            if need <= 0 or n == 0:
                continue
            # draw random positions (no full shuffle of big pools); exhaustive when the pool is small
            order = rng.permutation(n) if n <= 8 * n_candidates else None
            tries = 0
            while len(picked) < n_candidates - 1 and tries < 20:
                tries += 1
                idx = order if order is not None else rng.integers(0, n, size=4 * n_candidates)
                for i in take(idx):
                    if len(picked) >= n_candidates - 1:
                        break
                    if i not in exclude and i not in chosen:
                        picked.append(i)
                        chosen.add(i)
                        used[source] += 1
                if order is not None:
                    break
        pos = int(rng.integers(0, len(picked) + 1))
        row_items = picked[:pos] + [target] + picked[pos:]
        cands.append([sid_of[i] for i in row_items])
        targets.append(pos)
        used["rows"] += 1
    return cands, targets, used
