"""The steps of one data_prep build, each a function from the typed results of the steps before it
to a typed result of its own; :func:`conrec_verl.data_prep.pipeline.build` runs them in order:

=========== ====================== ===========================================================
step        function               result
=========== ====================== ===========================================================
read        :func:`read_log`        :class:`Log`: the validated interactions, item table, checksums
split       :func:`split_log`       :class:`Split`: the split plan, the training events, warm items
embeddings  ``build_item_embeddings``  item vectors (``data_prep/embeddings.py``)
sids        :func:`item_sids`       :class:`Sids`: codebook, item -> SID, ``sid_map`` table, report
swing       :func:`swing_neighbours` :class:`SwingResult`: co-dislike neighbours and their stats
samples     :func:`rl_samples`      :class:`Samples`: RL training / validation rows, evaluation rows
sft         :func:`sft_sets`        :class:`SftSets`: translation, alignment, warm-up SFT rows
write       :func:`write_folder`    every file of the data folder and its manifest
=========== ====================== ===========================================================
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conrec_verl.core.contract import EVAL_SCHEMA, MESSAGES, RL_SCHEMA
from conrec_verl.core.sid import Codebook, format_sid
from conrec_verl.core.swing import (
    cap_dislikers,
    choose_min_co_dislikers,
    dislike_matrix,
    item_coverage_at_thresholds,
    swing_scores,
)
from conrec_verl.data_prep import distributed as D
from conrec_verl.data_prep import samples as S
from conrec_verl.data_prep.embeddings import ItemEmbeddings
from conrec_verl.data_prep.errors import DataPrepError
from conrec_verl.data_prep.readers import read_input
from conrec_verl.data_prep.sft import (
    alignment_from_pools,
    alignment_pools,
    check_heldout_fraction,
    every_dislike_records,
    split_heldout,
    translation_records,
    warmup_config,
    warmup_records,
)
from conrec_verl.data_prep.shards import (RowWriter, ShardedRows, merge_shards_split, row_tables, write_records,
                                          write_rows)
from conrec_verl.data_prep.sids import build_sids
from conrec_verl.data_prep.train_codes import TrainCodes

# the RL / evaluation row layout is the data contract's (conrec_verl.core.contract)
SFT_SCHEMAS = {
    "translation": pa.schema([("messages", MESSAGES), ("extra_info", pa.struct(
        [("task", pa.string()), ("item_id", pa.string()), ("index", pa.int64())]))]),
    "alignment": pa.schema([("messages", MESSAGES), ("extra_info", pa.struct(
        [("task", pa.string()), ("user_id", pa.string()), ("answer_index", pa.int64()), ("index", pa.int64())]))]),
    "warmup": pa.schema([("messages", MESSAGES), ("extra_info", pa.struct(
        [("task", pa.string()), ("user_id", pa.string()), ("cutoff_day", pa.int64()), ("context", pa.int64()),
         ("index", pa.int64())]))]),
}


# ---------------------------------------------------------------------------------------------
# read, split
# ---------------------------------------------------------------------------------------------


@dataclass
class Log:
    #: the interaction table; None for a log read on Ray: it stays on the cluster (``parts``)
    interactions: pd.DataFrame | None
    items: pd.DataFrame | None
    stats: dict
    #: per input file: name, sha256, bytes
    checksums: dict
    #: engine=ray, a log read on Ray Data: its events partitioned by user (a materialized Ray
    #: Dataset, ``data_prep.distributed.read_log_ray``), which the distributed steps map over;
    #: None otherwise
    parts: Any = None
    #: with ``parts``: an ``ObjectRef`` to the log's distinct items (sorted; they stay on the cluster)
    #: and the log's first and last day (YYYYMMDD)
    item_ids: Any = None
    day_range: tuple | None = None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_log(cfg: dict, ray_partitions: int | None = None) -> Log:
    """The validated log; with ``ray_partitions`` (engine=ray) a generic/kuairand log's files are read
    on Ray Data (:func:`data_prep.distributed.read_log_ray`)."""
    on_cluster: dict = {}

    def on_ray(icfg, files, source):
        inter, stats, ds = D.read_log_ray(icfg, files, source, ray_partitions)
        on_cluster.update(parts=ds, item_ids=stats.pop("item_ids"), day_range=stats.pop("day_range"))
        if ((icfg.get("items") or {}).get("path")):  # an item table is read on the driver, checked against the log's ids
            stats["item_ids"] = D.fetch(on_cluster["item_ids"])
        return inter, stats

    data = read_input(cfg.get("input", {}) or {}, on_ray if ray_partitions else None)
    return Log(data.interactions, data.items, data.stats, input_checksums(data.files), **on_cluster)


def input_checksums(files: list[str]) -> dict:
    """Per input file: its name, sha256 and size. The name is the file name; where two files share
    one (shards in sub-folders: ``day=1/part-0.parquet``), the path relative to their common folder."""
    names = [os.path.basename(f) for f in files]
    if len(set(names)) < len(names):
        base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        names = [os.path.relpath(os.path.abspath(f), base) for f in files]
    return {name: {"path_name": name, "sha256": sha256_file(f), "bytes": os.path.getsize(f)}
            for name, f in zip(names, files)}


@dataclass
class Split:
    """The split. With a log on a Ray cluster (``train_on_cluster`` set) ``plan``, ``all_items`` and
    ``warm`` are ``ObjectRef`` s: that per-user and per-item state stays on the cluster, and the
    driver holds only the counts below."""

    plan: Any  # samples.SplitPlan
    #: per interaction: whether it falls in the training part of the log (None for a log on a Ray
    #: cluster: its training events stay there, ``train_on_cluster``)
    train_mask: np.ndarray | None
    train: pd.DataFrame | None
    #: every item id of the log (sorted)
    all_items: Any
    #: items seen in training (their SIDs are fitted; the others are cold): a set
    warm: Any
    #: events before the evaluation cutoff
    train_events: int = 0
    #: engine=ray: the training events kept on the cluster (``distributed.train_events_ray``)
    train_on_cluster: Any = None
    #: the plan's report (cutoffs, windows) for the manifest
    info: dict = field(default_factory=dict)
    n_items: int = 0
    n_warm: int = 0
    #: the day of the earliest evaluation cutoff: the candidate pools hold the items of the days from it on
    first_eval_day: int = 0


NO_TRAIN_DISLIKE = "no dislike falls before the evaluation cutoff; move split.eval_cutoff_day later"


def split_log(log: Log, cfg: dict) -> Split:
    scfg = cfg.get("split", {}) or {}
    if log.parts is not None:  # planned on the partitions: the plan and the warm items stay there
        plan, warm, c = D.split_ray(log.parts, scfg, log.day_range)
        if c["train_dislikes"] == 0:
            raise DataPrepError(NO_TRAIN_DISLIKE)
        return Split(plan, None, None, log.item_ids, warm, c["train_events"], D.train_events_ray(log.parts, plan),
                     c["info"], int(log.stats["items"]), c["warm_items"], c["first_eval_day"])
    inter = log.interactions
    plan = S.plan_split(inter, scfg)
    train_mask = plan.train_mask(inter["user_id"].to_numpy())
    train = inter[train_mask]
    if not (train["polarity"] < 0).any():
        raise DataPrepError(NO_TRAIN_DISLIKE)
    all_items = np.asarray(sorted(inter["item_id"].unique()), dtype=object)
    warm = set(train["item_id"].unique().tolist())
    first = plan.cutoff_day(min(plan.eval_cut.values())) if plan.eval_cut else 0
    return Split(plan, train_mask, train, all_items, warm, int(len(train)), None, plan.info, len(all_items),
                 len(warm), int(first))


# ---------------------------------------------------------------------------------------------
# SIDs, Swing
# ---------------------------------------------------------------------------------------------


@dataclass
class Sids:
    book: Codebook
    #: item id -> SID string
    sid_of: dict | None
    #: the ``sid_map.parquet`` table
    table: pd.DataFrame | None
    #: ``sid_report.json`` (Swing's stats are added by :func:`write_files`)
    report: dict
    n_cold_items: int
    #: items with a SID (the rows of ``table``)
    n_with_sid: int = 0

    def brief(self) -> "Sids":
        """What the driver reads of a result kept on a Ray cluster: the codebook, report and counts."""
        return replace(self, sid_of=None, table=None)


def item_sids(emb: ItemEmbeddings, warm: set, all_items: np.ndarray, cfg: dict, seed: int) -> Sids:
    """SIDs for every embedded item, the codebook fitted on the ``warm`` ones (seen in training)."""
    fit_mask = pd.Series(emb.item_ids).isin(warm).to_numpy()
    sres = build_sids(emb.vectors, fit_mask, emb.item_ids, cfg.get("sid", {}) or {}, seed)
    book = sres.codebook
    sid_strings = [format_sid(c) for c in sres.codes]
    sid_of = dict(zip(emb.item_ids.tolist(), sid_strings))
    table = pd.DataFrame({"item_id": emb.item_ids.astype(str), "sid": sid_strings})
    for level in range(book.num_levels):
        table[f"code_{level}"] = sres.codes[:, level].astype(np.int32)
    table["cold"] = ~fit_mask
    table["source"] = emb.source.astype(str)
    n_cold_items = len(set(all_items.tolist()) - warm)
    report = dict(sres.report)
    report.update(sid_build=book.fingerprint, embedding=emb.stats,
                  cold_items={"total": n_cold_items, "with_sid": int((~fit_mask).sum()),
                              "without_sid": int(n_cold_items - (~fit_mask).sum())},
                  warm_items_without_sid=int(len(warm - set(sid_of))))
    return Sids(book, sid_of, table, report, n_cold_items, len(table))


@dataclass
class SwingResult:
    #: the ``swing.parquet`` table: item_id, neighbor_id, score
    frame: pd.DataFrame
    #: item id -> its first ``gts_neighbors`` neighbours (the GTS additions)
    neighbors: dict
    stats: dict
    #: item id -> dislikes in training
    item_neg_count: dict | None

    def brief(self) -> "SwingResult":
        """What the driver reads of a result kept on a Ray cluster: the stats."""
        return replace(self, frame=None, neighbors=None, item_neg_count=None)


@dataclass
class OnCluster:
    """A step's result kept on the Ray cluster (engine=ray with a log read there): ``ref`` an
    ``ObjectRef`` to it, ``brief`` its small part that the driver reads (``result.brief()``: counts,
    reports, the codebook) and, for :class:`Sids`, ``sid_of`` a reference to the item -> SID map alone
    (what the per-user steps read). The steps take either this or the result itself."""

    ref: Any
    brief: Any
    sid_of: Any = None


def on_cluster(fn, *args, blas: bool = False) -> OnCluster:
    """``fn(*args)`` in a task on the cluster (:func:`data_prep.distributed.call_on_worker`; ``ObjectRef``
    arguments are resolved there), its result kept there: an :class:`OnCluster`."""
    full, sid_of, brief = D.call_on_worker(_kept_with_brief, fn, *args, blas=blas, keep=True, num_returns=3)
    brief = D.fetch(brief)
    return OnCluster(full, brief, sid_of if isinstance(brief, Sids) else None)


def _kept_with_brief(fn, *args) -> tuple:
    result = fn(*args)
    return result, getattr(result, "sid_of", None), result.brief()


def _kept(value):
    """The result itself, or the reference to it of an :class:`OnCluster`."""
    return value.ref if isinstance(value, OnCluster) else value


def _brief(value):
    return value.brief if isinstance(value, OnCluster) else value


def swing_neighbours(train: TrainCodes, sw: dict, ray_partitions: int | None = None) -> SwingResult:
    """Swing over the dislikes of ``train`` (the events before each user's evaluation cutoff). Runs
    on the codes (their order is the ids' order, so ties break as on the ids) and labels the result
    with the ids."""
    from conrec_verl.data_prep.swing_ray import finish, swing_options, swing_params

    opts = swing_options(sw)  # the config read, checked and labelled as on the Ray engine
    neg = train.dislike
    neg_users, neg_items = train.user[neg], train.item[neg]
    cap = opts["cap"]
    if cap:
        sw_users, sw_items = cap_dislikers(neg_users, neg_items, train.neg_ts, cap)
    else:
        sw_users, sw_items = neg_users, neg_items
    R, _, _ = dislike_matrix(sw_users, sw_items)
    coverage = item_coverage_at_thresholds(R, opts["thresholds"])
    mcd = choose_min_co_dislikers(R, opts["target"], opts["candidates"]) if opts["auto"] else opts["fixed"]
    pair_scores = (lambda R, p: D.swing_pair_scores_ray(R, p, ray_partitions)) if ray_partitions else None
    scores = swing_scores(sw_users, sw_items, swing_params(opts, mcd), pair_scores)
    capped = 0
    if cap:
        pairs = np.unique(neg_users.astype(np.int64) * len(train.items) + neg_items)  # distinct (user, item)
        capped = int((np.bincount(pairs % len(train.items)) > cap).sum())
    neg_count = np.bincount(neg_items, minlength=len(train.items))
    disliked = np.flatnonzero(neg_count)
    counts = {"dislike_events": int(neg.sum()), "graph_edges": int(len(sw_users)), "capped_items": capped,
              "item_neg_count": dict(zip(train.items[disliked].tolist(), neg_count[disliked].tolist()))}
    return finish([(scores, len(scores))], train.items, counts, coverage, mcd, opts)


# ---------------------------------------------------------------------------------------------
# RL and evaluation samples, SFT sets
# ---------------------------------------------------------------------------------------------


#: the RL / evaluation files of a data folder, each with its row layout (``rl/train_context{k}``
#: are the stages' slices of ``rl/train``, written together with it)
RL_FILES = {"rl/val": RL_SCHEMA, "eval/test": EVAL_SCHEMA}


def rl_set_schema(name: str) -> pa.Schema:
    if name.startswith("rl/train_context"):
        return RL_SCHEMA
    if name.startswith("sft/"):
        return SFT_SCHEMAS["warmup"]
    return RL_FILES[name]


@dataclass
class RowSets:
    """The RL / evaluation rows of some users (the whole log, or one Ray partition's users), per
    file of the data folder (``rl/train_context{k}``, ``rl/val``, ``eval/test``, and with
    ``sft.warmup.rows: cutoffs`` ``sft/warmup`` and ``sft/warmup_val``): ``records[name]`` in the
    file's order and ``keys[name]``, each row's merge key in that order (sets of disjoint users
    interleave by it into the file's order); ``stats``: additive counts
    (:func:`sample_stat_sums`)."""

    records: dict
    keys: dict
    stats: dict


def user_row_sets(events: pd.DataFrame, plan, lookup, sid_of: dict, pools: "S.CandidatePools", sid_build: str,
                  seed: int, scfg: dict, rcfg: dict, warmup_cutoffs: bool, progress: bool = False) -> RowSets:
    """Every RL training / validation row and evaluation row of the users in ``events`` (whole users;
    ``plan.key`` aligned with ``events``), rendered and ordered as their files hold them:

    - ``rl/train_context{k}``: the training rows assigned to stage k (:func:`data_prep.samples.assign_stages`),
      by (cutoff, user); ``rl/train`` is the stages one after another;
    - ``rl/val``: the validation users' rows, by (cutoff, user);
    - ``eval/test``: one row per user (by user) with its candidate set
      (:func:`data_prep.samples.candidate_sets`, drawn per user from the whole log's ``pools``).

    A user's rows depend on that user's events and on item-level tables only, so the rows of the
    whole log are the union of any user partition's, merged by key (the Ray engine's workers run
    this on their partitions; the local engine on the log)."""
    ctx = S.SampleContext(events, plan, sid_of, {}, {}, sid_build, seed, scfg)
    rows, test_rows, skips = S.build_samples(ctx, lookup, progress=progress)
    tr = rows[rows["split"] == "train"] if len(rows) else rows
    va = rows[rows["split"] == "val"] if len(rows) else rows
    n_tr = len(tr)
    tr = S.assign_stages(tr, rcfg, seed)
    records: dict = {}
    keys: dict = {}

    def keyed(frame: pd.DataFrame, *cols) -> list:
        return list(zip(*(frame[c].tolist() for c in cols)))

    for stage, part in tr.groupby("stage", sort=True):  # tr is sorted by (stage, cut, user)
        name = f"rl/train_context{int(stage)}"
        records[name] = S.rl_records(part, "train", sid_build)
        keys[name] = keyed(part, "cut", "user_id")
    va_sorted = va.sort_values(["cut", "user_id"], kind="stable") if len(va) else va
    records["rl/val"] = (S.rl_records(va_sorted, "val", sid_build, int(rcfg.get("val_context", 2)))
                         if len(va) else [])
    keys["rl/val"] = keyed(va_sorted, "cut", "user_id") if len(va) else []
    te = test_rows.sort_values(["user_id"], kind="stable").reset_index(drop=True) if len(test_rows) else test_rows
    records["eval/test"] = (S.rl_records(te, "test", sid_build, int(rcfg.get("eval_context", 3)))
                            if len(te) else [])
    keys["eval/test"] = te["user_id"].tolist() if len(te) else []
    cand_stats: dict = {}
    if len(te):
        own = S.user_day_likes(events, sid_of, S.candidate_wanted(te))
        cands, targets, cand_stats = S.candidate_sets(te, sid_of, seed, int(scfg.get("n_candidates", 20)), pools,
                                                      own)
        for rec, c, t in zip(records["eval/test"], cands, targets):
            rec["candidates"] = c
            rec["candidate_target"] = t
    if warmup_cutoffs:  # one warm-up row per training row (in rl/train's order), per validation row
        records["sft/warmup"], keys["sft/warmup"] = (warmup_records(tr, keyed(tr, "stage", "cut", "user_id"))
                                                     if len(tr) else ([], []))
        records["sft/warmup_val"], keys["sft/warmup_val"] = (warmup_records(va, keyed(va, "user_id", "cut"))
                                                             if len(va) else ([], []))
    stats = sample_stat_sums(tr, va, te, skips)
    stats["rl_rows_without_negative_history_dropped"] = int(n_tr - (tr.drop_duplicates(["user_id", "cut"]).shape[0]
                                                                    if len(tr) else 0))
    stats["candidates"] = cand_stats
    return RowSets(records, keys, stats)


@dataclass
class Samples:
    #: per file (the names of :class:`RowSets`): its rows, records in file order; or (engine=ray) an
    #: ``ObjectRef`` to that dict with :class:`data_prep.shards.ShardedRows` the workers wrote, merged
    #: when the folder is written
    sets: Any
    stats: dict


def item_tables(sid_of: dict, swing: SwingResult, all_items: np.ndarray) -> tuple:
    """The item tables every user's rows are made from: the lookup (:func:`data_prep.samples.item_lookup`:
    SIDs, Swing neighbours, dislike counts by item code) and the SID'd items, sorted (the candidate
    pools' positions)."""
    ctx = S.SampleContext(None, None, sid_of, swing.neighbors, swing.item_neg_count, "", 0, {})
    return S.item_lookup(ctx, all_items), np.asarray(sorted(sid_of), dtype=object)


def finish_row_sets(sets: dict, sums: dict, warmup_cutoffs: bool) -> dict:
    """``sets`` as the folder writes them: no warm-up rows of either kind when ``sft.warmup.rows:
    cutoffs`` made no training row."""
    if warmup_cutoffs and not sums["train"]["rows"]:
        sets = dict(sets, **{"sft/warmup": [], "sft/warmup_val": []})
    return sets


def rl_samples(log: Log, split: Split, sids, swing, cfg: dict, rcfg: dict, seed: int,
               ray_partitions: int | None = None, staging: Path | None = None) -> Samples:
    """``rcfg``: the ``rl`` options with the context names (``pipeline.rl_options``). With
    ``ray_partitions`` (engine=ray) the rows are made and written as shards under ``staging`` by the
    workers (:func:`data_prep.distributed.row_sets_ray`); the driver keeps a reference to them and
    their counts. ``sids`` and ``swing``: the results, or (a log read on the cluster) their
    :class:`OnCluster`, whose item tables are then made and kept on the cluster too."""
    scfg = cfg.get("samples", {}) or {}
    sid_build = _brief(sids).book.fingerprint
    wcfg = warmup_config((cfg.get("sft", {}) or {}).get("warmup", True))
    cutoffs = wcfg.get("rows") == "cutoffs"
    sid_of = sids.sid_of  # a reference to the map with an OnCluster
    if isinstance(sids, OnCluster):  # made beside the SIDs and Swing; the driver holds references
        lookup, pool_items = D.call_on_worker(item_tables, sid_of, swing.ref, split.all_items, keep=True,
                                              num_returns=2)
        pools = D.candidate_pools_ray(log.parts, sid_of, pool_items, split.first_eval_day)
    else:
        lookup, pool_items = item_tables(sid_of, swing, split.all_items)
        inter = log.interactions
        pools = S.CandidatePools.from_pairs(sid_of, S.day_item_pairs(inter[inter["day"].to_numpy()
                                                                           >= split.first_eval_day], sid_of),
                                            pool_items)
    args = (sid_of, pools, sid_build, seed, dict(scfg), dict(rcfg), cutoffs)
    if ray_partitions:
        if staging is None:
            raise ValueError("rl_samples: engine=ray needs a staging folder for the workers' shards")
        sets, sums = D.row_sets_ray(log, split.plan, lookup, args, ray_partitions, staging)
    else:
        out = user_row_sets(log.interactions, split.plan, lookup, *args, progress=bool(cfg.get("progress", True)))
        sets, sums = finish_row_sets(out.records, out.stats, cutoffs), out.stats
    return Samples(sets, finish_sample_stats(sums))


def _block_sums(df: pd.DataFrame | None) -> dict:
    if df is None or len(df) == 0:
        return {"rows": 0}
    gt = df["gt"]
    out = {"rows": int(len(df)), "users": int(df["user_id"].nunique()),
           "future_neg_items": int(gt.map(lambda g: g["n_future_neg"]).sum()),
           "future_neg_cold": int(gt.map(lambda g: g["n_future_neg_cold"]).sum()),
           "gts_items": int(gt.map(lambda g: len(g["future_neg"]) + len(g["swing"])).sum()),
           "gts_from_swing": int(gt.map(lambda g: len(g["swing"])).sum()),
           "rows_with_swing": int(gt.map(lambda g: len(g["swing"]) > 0).sum()),
           "fps_items": int(gt.map(lambda g: len(g["future_pos"])).sum()),
           "long_tail_user_rows": int(df["long_tail_user"].sum()),
           "rows_only_cold": int(gt.map(lambda g: len(g["future_neg"]) == 0).sum())}
    if "window_days" in df.columns:
        w = df["window_days"].to_numpy()
        out.update(window_days_min=int(w.min()), window_days_sum=int(w.sum()), window_days_max=int(w.max()))
    if "stage" in df.columns:  # the context assigned to each training row
        out["contexts"] = {str(k): int(v) for k, v in df["stage"].value_counts().items()}
    return out


def sample_stat_sums(tr: pd.DataFrame, va: pd.DataFrame, te: pd.DataFrame, skips: dict) -> dict:
    """The samples' counts of some users, additive over disjoint users (:func:`add_stat_sums`; users
    count once: a user's rows are all in one part); :func:`finish_sample_stats` makes the manifest's
    block of them."""
    return {"train": _block_sums(tr), "val": _block_sums(va), "test": _block_sums(te),
            "skipped": {"train_and_val": dict(skips.get("train", {})), "test": dict(skips.get("test", {}))}}


def add_stat_sums(a: dict, b: dict) -> dict:
    """Two :func:`sample_stat_sums` (or any nested dicts of counts) added: ``*_min``/``*_max`` by
    min/max, dicts key by key, numbers summed."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = add_stat_sums(out[k], v)
        elif k.endswith("_min"):
            out[k] = min(out[k], v)
        elif k.endswith("_max"):
            out[k] = max(out[k], v)
        else:
            out[k] = out[k] + v
    return out


def finish_sample_stats(sums: dict) -> dict:
    """The manifest's ``samples`` block from the summed counts."""
    def block(b: dict) -> dict:
        if not b.get("rows"):
            return {"rows": 0}
        out = {k: v for k, v in b.items() if not k.startswith("window_days_") and k != "contexts"}
        n_neg = b["future_neg_items"]
        out["cold_share"] = float(b["future_neg_cold"] / n_neg) if n_neg else 0.0
        if "window_days_sum" in b:
            out["window_days"] = {"min": b["window_days_min"], "mean": round(b["window_days_sum"] / b["rows"], 2),
                                  "max": b["window_days_max"]}
        if "contexts" in b:
            out["contexts"] = {k: b["contexts"][k] for k in sorted(b["contexts"], key=int)}
        return out

    stats = {name: block(sums[name]) for name in ("train", "val", "test")}
    stats["skipped"] = sums["skipped"]
    stats["rl_rows_without_negative_history_dropped"] = sums["rl_rows_without_negative_history_dropped"]
    stats["candidates"] = sums["candidates"]
    return stats


@dataclass
class SftSets:
    translation: Any
    #: records, or (engine=ray) :class:`data_prep.shards.ShardedRows` with ``held_out`` set; then
    #: ``alignment_heldout`` is None (the split happens as the shards are merged)
    alignment: Any
    alignment_heldout: Any
    #: records, or (engine=ray) :class:`data_prep.shards.ShardedRows` the workers wrote
    warmup: Any
    warmup_val: Any
    #: (a log read on the cluster) the translation rows (with an item table), the alignment and
    #: warm-up sets are ``ObjectRef`` s to them, read where the folder is written (:func:`write_files`)


def sft_sets(log: Log, split: Split, sids, samples: Samples, cfg: dict, seed: int,
             staging: Path | None = None) -> SftSets:
    """``staging``: with engine=ray, the folder under which the workers write their alignment and
    warm-up shards (inside the build's output folder; :func:`write_folder` merges them, the build
    removes them). ``sids``: the result or its :class:`OnCluster`."""
    sft_cfg = cfg.get("sft", {}) or {}
    scfg = cfg.get("samples", {}) or {}
    make_translation = bool(sft_cfg.get("translation", True)) and log.items is not None
    vfrac = float(scfg.get("val_user_fraction", 0.1))
    align_cfg = sft_cfg.get("alignment", {}) or {}
    heldout = float(align_cfg.get("heldout_fraction", 0.1))
    check_heldout_fraction(heldout)  # here, not in the task that splits the shards later
    wcfg = warmup_config(sft_cfg.get("warmup", True))
    every = wcfg.get("rows") == "every_dislike"
    if split.train_on_cluster is not None:  # engine=ray: per-user work on the partitions
        if staging is None:
            raise ValueError("sft_sets: engine=ray needs a staging folder for the workers' shards")
        translation = D.call_on_worker(translation_records, log.items, sids.sid_of, keep=True) \
            if make_translation else []
        alignment, warmup, warmup_val = D.sft_parts_ray(split.train_on_cluster, split.plan, sids.sid_of,
                                                        align_cfg, wcfg if every else None, seed, vfrac,
                                                        _brief(sids).book.num_levels, staging, heldout)
        alignment_heldout = None
    else:
        translation = translation_records(log.items, sids.sid_of) if make_translation else []
        train = split.train
        train_users = {u for u in train["user_id"].unique().tolist() if not S.is_val_user(seed, u, vfrac)}
        neg_of, pos_of = alignment_pools(train, train_users, sids.sid_of, align_cfg)
        warmup, warmup_val = [], []
        if every:
            keys, recent, levels = split.plan.key[split.train_mask], split.plan.recent, sids.book.num_levels
            warmup = every_dislike_records(train, keys, recent, train_users, sids.sid_of, wcfg, seed, levels,
                                           window=split.plan.window, with_likes=True)
            # the same questions for the validation users (never in SFT): what picks SFT epochs
            val_users = {u for u in train["user_id"].unique().tolist() if S.is_val_user(seed, u, vfrac)}
            warmup_val = every_dislike_records(train, keys, recent, val_users, sids.sid_of, wcfg, seed,
                                               levels, window=split.plan.window) if val_users else []
        alignment = alignment_from_pools(neg_of, pos_of, sids.sid_of, align_cfg, seed)
        alignment, alignment_heldout = split_heldout(alignment, heldout, seed)
    if wcfg.get("rows") == "cutoffs":  # made with the RL rows (:func:`user_row_sets`)
        if isinstance(samples.sets, dict):
            warmup, warmup_val = samples.sets["sft/warmup"], samples.sets["sft/warmup_val"]
        else:  # a reference: the two sets stay where the rows' runs are
            warmup, warmup_val = D.call_on_worker(_warmup_sets, samples.sets, keep=True, num_returns=2)
    return SftSets(translation, alignment, alignment_heldout, warmup, warmup_val)


def _warmup_sets(sets: dict) -> tuple:
    return sets["sft/warmup"], sets["sft/warmup_val"]


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------


def write_parquet(records, schema: pa.Schema, path: Path, renumber: bool = False) -> int:
    """Rows to one file in fixed row groups (:class:`data_prep.shards.RowWriter`): ``records`` a list
    of dicts, or :class:`data_prep.shards.ShardedRows` that workers wrote (merged here, streaming, in
    user order with ``extra_info.index`` renumbered, as the local engine numbers them)."""
    if isinstance(records, ShardedRows) or renumber:
        return write_rows(records, schema, path)
    return write_records(records, schema, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_rl_files(sets: dict, folder: Path) -> dict:
    """``rl/train.parquet`` (the stages' rows one after another), ``rl/train_context{k}.parquet`` (stage
    k's slice, keeping its numbers in ``rl/train``), ``rl/val.parquet`` and ``eval/test.parquet``;
    returns their row counts. Each set is a list of records or worker shards (merged, streaming)."""
    stages = sorted(int(n[len("rl/train_context"):]) for n in sets if n.startswith("rl/train_context"))
    counts = {}
    train = RowWriter(folder / "rl" / "train.parquet", RL_SCHEMA, renumber=True)
    for k in stages:
        name = f"rl/train_context{k}"
        for table in row_tables(sets[name], RL_SCHEMA):
            train.write(table)
    counts["rl/train"] = train.close()
    start = 0
    for k in stages:
        name = f"rl/train_context{k}"
        counts[name] = write_rows(sets[name], RL_SCHEMA, folder / "rl" / f"train_context{k}.parquet", start=start)
        start += counts[name]
    for name, schema in RL_FILES.items():
        counts[name] = write_rows(sets[name], schema, folder / f"{name}.parquet")
    return counts


SWING_SCHEMA = pa.schema([("item_id", pa.string()), ("neighbor_id", pa.string()), ("score", pa.float64())])


def write_files(folder: Path, sids: Sids, swing: SwingResult, sets: dict, sft: SftSets) -> dict:
    """Every data file of the folder and ``sid_report.json``; returns the files' row counts. With
    engine=ray this runs in a task on the cluster (:func:`write_folder`): the workers' shards are
    merged there, and the fields of ``sft`` may be ``ObjectRef`` s, read here."""
    sft = SftSets(*(D.resolved(getattr(sft, f)) for f in
                    ("translation", "alignment", "alignment_heldout", "warmup", "warmup_val")))
    sids.book.save(folder / "codebook.npz")
    pq.write_table(pa.Table.from_pandas(sids.table, preserve_index=False), folder / "sid_map.parquet")
    pq.write_table(pa.Table.from_pandas(swing.frame, preserve_index=False, schema=SWING_SCHEMA),
                   folder / "swing.parquet")
    counts = {}
    if sft.translation:
        counts["sft/translation"] = write_parquet(sft.translation, SFT_SCHEMAS["translation"],
                                                  folder / "sft" / "translation.parquet")
    if isinstance(sft.alignment, ShardedRows):  # engine=ray: the workers' shards, split as they merge
        counts["sft/alignment"], counts["sft/alignment_heldout"] = merge_shards_split(
            sft.alignment, folder / "sft" / "alignment.parquet", folder / "sft" / "alignment_heldout.parquet",
            sft.alignment.held_out)
    else:
        counts["sft/alignment"] = write_parquet(sft.alignment, SFT_SCHEMAS["alignment"],
                                                folder / "sft" / "alignment.parquet")
        counts["sft/alignment_heldout"] = write_parquet(sft.alignment_heldout, SFT_SCHEMAS["alignment"],
                                                        folder / "sft" / "alignment_heldout.parquet")
    # the warm-up sets may come as worker shards (engine=ray): both engines write them numbered here
    counts["sft/warmup"] = write_parquet(sft.warmup, SFT_SCHEMAS["warmup"], folder / "sft" / "warmup.parquet",
                                         renumber=True)
    if sft.warmup_val:
        counts["sft/warmup_val"] = write_parquet(sft.warmup_val, SFT_SCHEMAS["warmup"],
                                                 folder / "sft" / "warmup_val.parquet", renumber=True)
    counts.update(write_rl_files(sets, folder))
    write_json(dict(sids.report, swing=swing.stats), folder / "sid_report.json")
    return counts


def write_folder(folder: Path, cfg: dict, seed: int, log: Log, split: Split, sids, swing, samples: Samples,
                 sft: SftSets, on_worker: bool = False) -> dict:
    """Every data file of the folder (:func:`write_files`; with ``on_worker``, engine=ray, in a task on
    the cluster, so that merging the workers' shards never loads the driver); returns the manifest
    (without timings), which the caller writes. ``sids`` and ``swing``: the results or their
    :class:`OnCluster`."""
    if on_worker:
        counts = D.call_on_worker(write_files, folder, _kept(sids), _kept(swing), samples.sets, sft)
    else:
        counts = write_files(folder, sids, swing, samples.sets, sft)
    sids, swing = _brief(sids), _brief(swing)
    report = dict(sids.report, swing=swing.stats)
    return {
        "format_version": 1,
        "sid_build": sids.book.fingerprint,
        "seed": seed,
        "config": cfg,
        "inputs": log.checksums,
        "input_stats": log.stats,
        "split": dict(split.info, val_users=int(samples.stats["val"].get("users", 0)),
                      train_events=int(split.train_events), warm_items=int(split.n_warm), cold_items=sids.n_cold_items),
        "counts": dict(counts, users=int(log.stats["users"]), items=int(split.n_items),
                       events=int(log.stats["events"]), items_with_sid=int(sids.n_with_sid)),
        "samples": samples.stats,
        "swing": swing.stats,
        "sid": {k: report[k] for k in ("method", "sizes", "before", "after", "levels")},
    }
