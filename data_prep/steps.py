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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conrec_verl.core.contract import EVAL_SCHEMA, MESSAGES, RL_SCHEMA
from conrec_verl.core.sid import Codebook, format_sid
from conrec_verl.core.swing import (
    SwingParams,
    cap_dislikers,
    choose_min_co_dislikers,
    dislike_matrix,
    item_coverage_at_thresholds,
    swing_scores,
    top_k_neighbors,
)
from conrec_verl.data_prep import distributed as D
from conrec_verl.data_prep import samples as S
from conrec_verl.data_prep.embeddings import ItemEmbeddings
from conrec_verl.data_prep.errors import DataPrepError
from conrec_verl.data_prep.readers import read_input
from conrec_verl.data_prep.sft import (
    alignment_from_pools,
    alignment_pools,
    every_dislike_records,
    heldout_positions,
    split_heldout,
    translation_records,
    warmup_config,
    warmup_records,
)
from conrec_verl.data_prep.shards import ShardedRows, merge_shards, merge_shards_split, write_records
from conrec_verl.data_prep.sids import build_sids

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
    #: with ``parts``: the log's distinct items (sorted) and its first and last day (YYYYMMDD)
    item_ids: np.ndarray | None = None
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
        on_cluster.update(parts=ds, item_ids=stats["item_ids"], day_range=stats.pop("day_range"))
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
    plan: Any  # samples.SplitPlan
    #: per interaction: whether it falls in the training part of the log (None for a log on a Ray
    #: cluster: its training events stay there, ``train_on_cluster``)
    train_mask: np.ndarray | None
    train: pd.DataFrame | None
    all_items: np.ndarray
    #: items seen in training (their SIDs are fitted; the others are cold)
    warm: set
    #: events before the evaluation cutoff
    train_events: int = 0
    #: engine=ray: the training events kept on the cluster (``distributed.train_events_ray``)
    train_on_cluster: Any = None


NO_TRAIN_DISLIKE = "no dislike falls before the evaluation cutoff; move split.eval_cutoff_day later"


def split_log(log: Log, cfg: dict) -> Split:
    scfg = cfg.get("split", {}) or {}
    if log.parts is not None:  # planned on the partitions: only per-user state comes back
        plan, warm, n_train, n_neg = D.split_ray(log.parts, scfg, log.day_range)
        if n_neg == 0:
            raise DataPrepError(NO_TRAIN_DISLIKE)
        return Split(plan, None, None, np.asarray(log.item_ids, dtype=object), warm, n_train,
                     D.train_events_ray(log.parts, plan))
    inter = log.interactions
    plan = S.plan_split(inter, scfg)
    train_mask = plan.train_mask(inter["user_id"].to_numpy())
    train = inter[train_mask]
    if not (train["polarity"] < 0).any():
        raise DataPrepError(NO_TRAIN_DISLIKE)
    all_items = np.asarray(sorted(inter["item_id"].unique()), dtype=object)
    return Split(plan, train_mask, train, all_items, set(train["item_id"].unique().tolist()), int(len(train)))


# ---------------------------------------------------------------------------------------------
# SIDs, Swing
# ---------------------------------------------------------------------------------------------


@dataclass
class Sids:
    book: Codebook
    #: item id -> SID string
    sid_of: dict
    #: the ``sid_map.parquet`` table
    table: pd.DataFrame
    #: ``sid_report.json`` (Swing's stats are added by :func:`write_folder`)
    report: dict
    n_cold_items: int


def item_sids(emb: ItemEmbeddings, split: Split, cfg: dict, seed: int) -> Sids:
    fit_mask = pd.Series(emb.item_ids).isin(split.warm).to_numpy()
    sres = build_sids(emb.vectors, fit_mask, emb.item_ids, cfg.get("sid", {}) or {}, seed)
    book = sres.codebook
    sid_strings = [format_sid(c) for c in sres.codes]
    sid_of = dict(zip(emb.item_ids.tolist(), sid_strings))
    table = pd.DataFrame({"item_id": emb.item_ids.astype(str), "sid": sid_strings})
    for level in range(book.num_levels):
        table[f"code_{level}"] = sres.codes[:, level].astype(np.int32)
    table["cold"] = ~fit_mask
    table["source"] = emb.source.astype(str)
    n_cold_items = len(set(split.all_items.tolist()) - split.warm)
    report = dict(sres.report)
    report.update(sid_build=book.fingerprint, embedding=emb.stats,
                  cold_items={"total": n_cold_items, "with_sid": int((~fit_mask).sum()),
                              "without_sid": int(n_cold_items - (~fit_mask).sum())},
                  warm_items_without_sid=int(len(split.warm - set(sid_of))))
    return Sids(book, sid_of, table, report, n_cold_items)


@dataclass
class SwingResult:
    #: the ``swing.parquet`` table: item_id, neighbor_id, score
    frame: pd.DataFrame
    #: item id -> its first ``gts_neighbors`` neighbours (the GTS additions)
    neighbors: dict
    stats: dict
    #: item id -> dislikes in training
    item_neg_count: dict


def swing_neighbours(train: pd.DataFrame, sw: dict, ray_partitions: int | None = None) -> SwingResult:
    """Swing over the dislikes of ``train`` (the events before each user's evaluation cutoff)."""
    neg_train = train[train["polarity"] < 0]
    cap = sw.get("max_dislikers_per_item")
    if cap:
        sw_users, sw_items = cap_dislikers(neg_train["user_id"].to_numpy(), neg_train["item_id"].to_numpy(),
                                           neg_train["ts"].to_numpy(), int(cap))
    else:
        sw_users, sw_items = neg_train["user_id"].to_numpy(), neg_train["item_id"].to_numpy()
    R, _, _ = dislike_matrix(sw_users, sw_items)
    cands = [int(c) for c in sw.get("auto_candidates", [6, 5, 4, 3, 2])]
    coverage = item_coverage_at_thresholds(R, sorted(set(cands + [2])))
    mcd = sw.get("min_co_dislikers", "auto")
    if mcd in (None, "auto"):
        mcd = choose_min_co_dislikers(R, float(sw.get("auto_item_coverage", 0.5)), cands)
    params = SwingParams(float(sw.get("alpha1", 5.0)), float(sw.get("alpha2", 1.0)), float(sw.get("theta", 0.5)),
                         int(mcd))
    pair_scores = (lambda R, p: D.swing_pair_scores_ray(R, p, ray_partitions)) if ray_partitions else None
    scores = swing_scores(sw_users, sw_items, params, pair_scores)
    top = top_k_neighbors(scores, int(sw.get("top_k", 20)), float(sw.get("min_score", 0.0)))
    gts_n = int(sw.get("gts_neighbors", 3))
    neighbors = {}
    if gts_n > 0 and not top.empty:
        neighbors = top.groupby("item_id", sort=False)["neighbor_id"].apply(lambda s: list(s[:gts_n])).to_dict()
    frame = top.astype({"item_id": str, "neighbor_id": str, "score": np.float64})
    capped = (int((neg_train.drop_duplicates(["user_id", "item_id"]).groupby("item_id").size() > int(cap)).sum())
              if cap else 0)
    stats = {"min_co_dislikers": int(mcd),
             "min_co_dislikers_mode": "auto" if sw.get("min_co_dislikers", "auto") in (None, "auto") else "fixed",
             "item_coverage_by_threshold": coverage, "scored_pairs": int(len(scores)),
             "items_with_neighbors": int(top["item_id"].nunique()) if len(top) else 0,
             "dislike_events": int(len(neg_train)), "graph_edges": int(len(sw_users)),
             "max_dislikers_per_item": int(cap) if cap else None,
             "capped_items": capped, "alpha1": params.alpha1, "alpha2": params.alpha2,
             "theta": params.theta, "top_k": int(sw.get("top_k", 20)), "gts_neighbors": gts_n}
    return SwingResult(frame, neighbors, stats, neg_train.groupby("item_id").size().to_dict())


# ---------------------------------------------------------------------------------------------
# RL and evaluation samples, SFT sets
# ---------------------------------------------------------------------------------------------


@dataclass
class Samples:
    #: training / validation sample frames (one row per user and cutoff), training with its context
    train: pd.DataFrame
    val: pd.DataFrame
    rl_train: list
    rl_val: list
    eval_rows: list
    stats: dict


def rl_samples(log: Log, split: Split, sids: Sids, swing: SwingResult, cfg: dict, rcfg: dict, seed: int,
               ray_partitions: int | None = None) -> Samples:
    """``rcfg``: the ``rl`` options with the context names (``pipeline.rl_options``)."""
    scfg = cfg.get("samples", {}) or {}
    sid_build = sids.book.fingerprint
    ctx = S.SampleContext(log.interactions, split.plan, sids.sid_of, swing.neighbors, swing.item_neg_count,
                          sid_build, seed, scfg)
    if ray_partitions:
        train_rows, test_rows, skip_counts = D.build_samples_ray(ctx, ray_partitions, log.parts, split.all_items)
    else:
        train_rows, test_rows, skip_counts = S.build_samples(ctx, progress=bool(cfg.get("progress", True)))
    if train_rows.empty:
        tr, va = train_rows, train_rows
    else:
        tr = train_rows[train_rows["split"] == "train"]
        va = train_rows[train_rows["split"] == "val"]
    n_tr = len(tr)
    tr = S.assign_stages(tr, rcfg, seed)
    n_no_neg = n_tr - (tr.drop_duplicates(["user_id", "cut"]).shape[0] if len(tr) else 0)
    rl_train = S.rl_records(tr, "train", sid_build)
    rl_val = S.rl_records(va.sort_values(["cut", "user_id"], kind="stable"), "val", sid_build,
                          int(rcfg.get("val_context", 2))) if len(va) else []
    test_sorted = test_rows.sort_values(["user_id"], kind="stable").reset_index(drop=True) if len(test_rows) else test_rows
    eval_rows = S.rl_records(test_sorted, "test", sid_build, int(rcfg.get("eval_context", 3))) if len(test_rows) else []
    cand_stats = {}
    if eval_rows:
        pools = (D.candidate_pools_ray(log.parts, sids.sid_of, S.candidate_wanted(test_sorted))
                 if log.parts is not None else None)
        cands, targets, cand_stats = S.candidate_sets(test_sorted, log.interactions, split.plan, sids.sid_of, seed,
                                                      int(scfg.get("n_candidates", 20)), pools)
        for rec, c, t in zip(eval_rows, cands, targets):
            rec["candidates"] = c
            rec["candidate_target"] = t
    stats = sample_stats(tr, va, test_sorted, skip_counts)
    stats["rl_rows_without_negative_history_dropped"] = int(n_no_neg)
    stats["candidates"] = cand_stats
    return Samples(tr, va, rl_train, rl_val, eval_rows, stats)


def sample_stats(tr: pd.DataFrame, va: pd.DataFrame, te: pd.DataFrame, skips: dict) -> dict:
    def block(df):
        if df is None or len(df) == 0:
            return {"rows": 0}
        gt = df["gt"]
        n_neg = gt.map(lambda g: g["n_future_neg"]).sum()
        n_cold = gt.map(lambda g: g["n_future_neg_cold"]).sum()
        n_fn = gt.map(lambda g: len(g["future_neg"])).sum()
        n_sw = gt.map(lambda g: len(g["swing"])).sum()
        out = {"rows": int(len(df)), "users": int(df["user_id"].nunique()),
               "future_neg_items": int(n_neg), "future_neg_cold": int(n_cold),
               "cold_share": float(n_cold / n_neg) if n_neg else 0.0,
               "gts_items": int(n_fn + n_sw), "gts_from_swing": int(n_sw),
               "rows_with_swing": int(gt.map(lambda g: len(g["swing"]) > 0).sum()),
               "fps_items": int(gt.map(lambda g: len(g["future_pos"])).sum()),
               "long_tail_user_rows": int(df["long_tail_user"].sum()),
               "rows_only_cold": int(gt.map(lambda g: len(g["future_neg"]) == 0).sum())}
        if "window_days" in df.columns:
            w = df["window_days"].to_numpy()
            out["window_days"] = {"min": int(w.min()), "mean": round(float(w.mean()), 2), "max": int(w.max())}
        if "stage" in df.columns:  # the context assigned to each training row
            out["contexts"] = {str(k): int(v) for k, v in df["stage"].value_counts().sort_index().items()}
        return out

    return {"train": block(tr), "val": block(va), "test": block(te),
            "skipped": {"train_and_val": skips.get("train", {}), "test": skips.get("test", {})}}


@dataclass
class SftSets:
    translation: list
    #: records, or (engine=ray) :class:`data_prep.shards.ShardedRows` with ``held_out`` set; then
    #: ``alignment_heldout`` is None (the split happens as the shards are merged)
    alignment: Any
    alignment_heldout: Any
    #: records, or (engine=ray) :class:`data_prep.shards.ShardedRows` the workers wrote
    warmup: Any
    warmup_val: Any


def sft_sets(log: Log, split: Split, sids: Sids, samples: Samples, cfg: dict, seed: int,
             staging: Path | None = None) -> SftSets:
    """``staging``: with engine=ray, the folder under which the workers write their alignment and
    warm-up shards (inside the build's output folder; :func:`write_folder` merges them, the build
    removes them)."""
    sft_cfg = cfg.get("sft", {}) or {}
    scfg = cfg.get("samples", {}) or {}
    tr, va = samples.train, samples.val
    translation = translation_records(log.items, sids.sid_of) if sft_cfg.get("translation", True) else []
    vfrac = float(scfg.get("val_user_fraction", 0.1))
    align_cfg = sft_cfg.get("alignment", {}) or {}
    heldout = float(align_cfg.get("heldout_fraction", 0.1))
    wcfg = warmup_config(sft_cfg.get("warmup", True))
    every = wcfg.get("rows") == "every_dislike"
    if split.train_on_cluster is not None:  # engine=ray: per-user work on the partitions
        if staging is None:
            raise ValueError("sft_sets: engine=ray needs a staging folder for the workers' shards")
        alignment, warmup, warmup_val = D.sft_parts_ray(split.train_on_cluster, split.plan, sids.sid_of,
                                                        align_cfg, wcfg if every else None, seed, vfrac,
                                                        sids.book.num_levels, staging)
        # the held-out questions: positions in the merged order, split when the folder is written
        alignment.held_out = heldout_positions(len(alignment), heldout, seed)
        alignment_heldout = None
    else:
        train = split.train
        train_users = {u for u in train["user_id"].unique().tolist() if not S.is_val_user(seed, u, vfrac)}
        neg_of, pos_of = alignment_pools(train, train_users, sids.sid_of, align_cfg)
        warmup, warmup_val = [], []
        if every:
            keys, recent, levels = split.plan.key[split.train_mask], split.plan.recent, sids.book.num_levels
            warmup = every_dislike_records(train, keys, recent, train_users, sids.sid_of, wcfg, seed, levels)
            # the same questions for the validation users (never in SFT): what picks SFT epochs
            val_users = {u for u in train["user_id"].unique().tolist() if S.is_val_user(seed, u, vfrac)}
            warmup_val = every_dislike_records(train, keys, recent, val_users, sids.sid_of, wcfg, seed,
                                               levels) if val_users else []
        alignment = alignment_from_pools(neg_of, pos_of, sids.sid_of, align_cfg, seed)
        alignment, alignment_heldout = split_heldout(alignment, heldout, seed)
    if wcfg.get("rows") == "cutoffs" and len(tr):
        warmup = warmup_records(tr)
        warmup_val = warmup_records(va) if len(va) and va is not tr else []
    return SftSets(translation, alignment, alignment_heldout, warmup, warmup_val)


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------


def write_parquet(records, schema: pa.Schema, path: Path, renumber: bool = False) -> int:
    """Rows to one file in fixed row groups (:class:`data_prep.shards.RowWriter`): ``records`` a list
    of dicts, or :class:`data_prep.shards.ShardedRows` that workers wrote (merged here, streaming, in
    user order with ``extra_info.index`` renumbered, as the local engine numbers them)."""
    if isinstance(records, ShardedRows):
        return merge_shards(records, path)
    return write_records(records, schema, path, renumber)


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


SWING_SCHEMA = pa.schema([("item_id", pa.string()), ("neighbor_id", pa.string()), ("score", pa.float64())])


def write_folder(folder: Path, cfg: dict, seed: int, log: Log, split: Split, sids: Sids, swing: SwingResult,
                 samples: Samples, sft: SftSets) -> dict:
    """Every data file of the folder and ``sid_report.json``; returns the manifest (without timings),
    which the caller writes."""
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
    rl_train = samples.rl_train
    counts["rl/train"] = write_parquet(rl_train, RL_SCHEMA, folder / "rl" / "train.parquet")
    for context in sorted({r["extra_info"]["context"] for r in rl_train}):
        sub = [r for r in rl_train if r["extra_info"]["context"] == context]
        counts[f"rl/train_context{context}"] = write_parquet(sub, RL_SCHEMA,
                                                            folder / "rl" / f"train_context{context}.parquet")
    counts["rl/val"] = write_parquet(samples.rl_val, RL_SCHEMA, folder / "rl" / "val.parquet")
    counts["eval/test"] = write_parquet(samples.eval_rows, EVAL_SCHEMA, folder / "eval" / "test.parquet")
    report = dict(sids.report, swing=swing.stats)
    write_json(report, folder / "sid_report.json")
    va = samples.val
    return {
        "format_version": 1,
        "sid_build": sids.book.fingerprint,
        "seed": seed,
        "config": cfg,
        "inputs": log.checksums,
        "input_stats": log.stats,
        "split": dict(split.plan.info, val_users=int(va["user_id"].nunique()) if len(va) else 0,
                      train_events=int(split.train_events), warm_items=len(split.warm), cold_items=sids.n_cold_items),
        "counts": dict(counts, users=int(log.stats["users"]), items=int(len(split.all_items)),
                       events=int(log.stats["events"]), items_with_sid=int(len(sids.table))),
        "samples": samples.stats,
        "swing": swing.stats,
        "sid": {k: report[k] for k in ("method", "sizes", "before", "after", "levels")},
    }
