"""``build(cfg)``: raw log -> the data folder of docs/data-format.md, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from conrec_verl.core.contract import EVAL_SCHEMA, MESSAGES, RL_SCHEMA, renamed_option
from conrec_verl.core.sid import format_sid
from conrec_verl.core.swing import (
    SwingParams,
    cap_dislikers,
    choose_min_co_dislikers,
    dislike_matrix,
    item_coverage_at_thresholds,
    swing_scores,
    top_k_neighbors,
)
from conrec_verl.data_prep import samples as S
from conrec_verl.data_prep import distributed as D
from conrec_verl.data_prep.embeddings import build_item_embeddings
from conrec_verl.data_prep.errors import DataPrepError
from conrec_verl.data_prep.readers import read_input
from conrec_verl.data_prep.sft import (
    alignment_records,
    every_dislike_records,
    split_heldout,
    translation_records,
    warmup_config,
    warmup_records,
)
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


CONFIG_DIR = Path(__file__).resolve().parent / "config"


def known_config_keys() -> dict:
    """The key tree of every shipped data_prep config (``config/*.yaml``, ``base.yaml`` first):
    what a key may be called anywhere in a data_prep config."""
    from omegaconf import OmegaConf

    def merge(into: dict, tree: Mapping) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                node = into.get(key)
                if not isinstance(node, dict):
                    node = into[key] = {}
                merge(node, value)
            else:
                into.setdefault(key, None)

    known: dict = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml"), key=lambda p: p.name != "base.yaml"):
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        merge(known, {k: v for k, v in tree.items() if k not in ("defaults", "hydra")})
    return known


#: ``rl`` keys renamed when contexts (what a prompt shows) and stages (schedule positions) were told
#: apart: old name -> new name; the old names are still read
RL_KEY_ALIASES = {"stages": "contexts", "stage_assignment": "context_assignment", "val_stage": "val_context",
                  "eval_stage": "eval_context"}


def rl_options(cfg: Mapping) -> dict:
    """The ``rl`` group with old key names mapped to the new ones (``core.contract.renamed_option``;
    a new key at base.yaml's default yields to its old name); an old and a new name with different
    values is one error naming both."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "base.yaml"))["rl"]
    rcfg = dict(cfg.get("rl", {}) or {})
    for old, new in RL_KEY_ALIASES.items():
        try:
            rcfg[new] = renamed_option(rcfg, new, old, default=defaults.get(new), where="rl.")
        except ValueError as exc:
            raise DataPrepError(str(exc)) from None
        rcfg.pop(old, None)
    return rcfg


def check_config_keys(cfg: Mapping, known: Mapping | None = None, where: str = "") -> None:
    """Refuse a key no data_prep config knows (a typo, also one added with Hydra's ``+``), naming
    it and the closest known key: an unknown key would otherwise be silently ignored."""
    import difflib

    known = known_config_keys() if known is None else known
    for key, value in cfg.items():
        dotted = f"{where}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; known keys here: {sorted(map(str, known))}"
            raise DataPrepError(f"unknown config key {dotted}{hint} (data_prep/config/base.yaml lists every key)")
        if isinstance(value, Mapping) and isinstance(known[key], Mapping):
            check_config_keys(value, known[key], f"{dotted}.")


OWNER_FILE = ".data_prep.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(out: Path) -> None:
    """Remove temporary build folders of ``out`` left by a data_prep that was killed (its pid, in
    the folder, no longer runs); a build still running is left alone."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        owner = tmp / OWNER_FILE
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or not started yet: leave it
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"data_prep: removed {tmp.name}, left by a killed build (pid {pid})", file=sys.stderr)


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover
        pass
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    return cfg


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(records: list[dict], schema: pa.Schema, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=schema)
    pq.write_table(table, path)
    return table.num_rows


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


class _Steps:
    """Times every step (and calls ``hook(name, phase)`` around it, used by the benchmark)."""

    def __init__(self, names: list[str], progress: bool, hook: Callable[[str, str], None] | None):
        self.bar = tqdm(total=len(names), desc="data_prep", disable=not progress, leave=False, file=sys.stderr)
        self.timings: dict[str, float] = {}
        self.hook = hook

    def __call__(self, name: str):
        steps = self

        class _Ctx:
            def __enter__(self_inner):
                steps.bar.set_postfix_str(name)
                if steps.hook:
                    steps.hook(name, "start")
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *exc):
                steps.timings[name] = round(time.perf_counter() - self_inner.t0, 3)
                if steps.hook:
                    steps.hook(name, "end")
                steps.bar.update(1)
                return False

        return _Ctx()


STEP_NAMES = ["read", "split", "embeddings", "sids", "swing", "samples", "sft", "write"]


def build(cfg: Mapping | Any, step_hook: Callable[[str, str], None] | None = None) -> Path:
    """Build the data folder described by ``cfg`` (a hydra/omegaconf config or a plain dict with the
    groups of ``data_prep/config/base.yaml``) and return its path. Bad input raises one
    :class:`DataPrepError`; nothing is left behind on failure."""
    cfg = _plain(cfg)
    check_config_keys(cfg)
    rl_options(cfg)  # an old and a new rl key that disagree: refused before anything is read
    out_dir = cfg.get("out_dir")
    if not out_dir or out_dir == "???":
        raise DataPrepError("out_dir is required (e.g. out_dir=data/kuairand)")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not cfg.get("overwrite", False):
        raise DataPrepError(f"{out} already exists; pass overwrite=true to replace it")
    engine = D.check_engine(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    (tmp / OWNER_FILE).write_text(str(os.getpid()))
    try:
        if engine == "ray":
            with D.ray_session(cfg.get("ray") or {}, bool(cfg.get("progress", True))) as n_parts:
                summary = _build_into(cfg, tmp, step_hook, n_parts)
        else:
            summary = _build_into(cfg, tmp, step_hook)
        (tmp / OWNER_FILE).unlink()
        if out.exists() and not cfg.get("overwrite", False):  # appeared while we built (another run)
            raise DataPrepError(f"{out} was created by someone else while this build ran; nothing replaced "
                                "(pass overwrite=true to replace it)")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if cfg.get("print_summary", True):
        print(format_summary(summary, out))
    return out


def _build_into(cfg: dict, tmp: Path, hook, ray_partitions: int | None = None) -> dict:
    """The steps of :func:`build`; with ``ray_partitions`` (engine=ray, inside a Ray session) the
    Swing and samples steps run partitioned on Ray Data (:mod:`data_prep.distributed`)."""
    seed = int(cfg.get("seed", 0))
    steps = _Steps(STEP_NAMES, bool(cfg.get("progress", True)), hook)
    scfg = cfg.get("samples", {}) or {}

    with steps("read"):
        data = read_input(cfg.get("input", {}) or {})
        inter, items = data.interactions, data.items
        checksums = {os.path.basename(f): {"path_name": os.path.basename(f), "sha256": sha256_file(f),
                                           "bytes": os.path.getsize(f)} for f in data.files}

    with steps("split"):
        plan = S.plan_split(inter, cfg.get("split", {}) or {})
        train_mask = plan.train_mask(inter["user_id"].to_numpy())
        train = inter[train_mask]
        if not (train["polarity"] < 0).any():
            raise DataPrepError("no dislike falls before the evaluation cutoff; move split.eval_cutoff_day later")
        all_items = np.asarray(sorted(inter["item_id"].unique()), dtype=object)
        warm = set(train["item_id"].unique().tolist())

    with steps("embeddings"):
        emb = build_item_embeddings(cfg.get("embedding", {}) or {}, train, all_items, items, seed)

    with steps("sids"):
        fit_mask = pd.Series(emb.item_ids).isin(warm).to_numpy()
        sres = build_sids(emb.vectors, fit_mask, emb.item_ids, cfg.get("sid", {}) or {}, seed)
        book = sres.codebook
        sid_build = book.fingerprint
        sid_strings = [format_sid(c) for c in sres.codes]
        sid_of = dict(zip(emb.item_ids.tolist(), sid_strings))
        sid_map = pd.DataFrame({"item_id": emb.item_ids.astype(str), "sid": sid_strings})
        for level in range(book.num_levels):
            sid_map[f"code_{level}"] = sres.codes[:, level].astype(np.int32)
        sid_map["cold"] = ~fit_mask
        sid_map["source"] = emb.source.astype(str)
        n_cold_items = len(set(all_items.tolist()) - warm)
        sid_report = dict(sres.report)
        sid_report.update(sid_build=sid_build, embedding=emb.stats,
                          cold_items={"total": n_cold_items, "with_sid": int((~fit_mask).sum()),
                                      "without_sid": int(n_cold_items - (~fit_mask).sum())},
                          warm_items_without_sid=int(len(warm - set(sid_of))))

    with steps("swing"):
        sw = cfg.get("swing", {}) or {}
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
        pair_scores = None
        if ray_partitions:
            def pair_scores(R, p):
                return D.swing_pair_scores_ray(R, p, ray_partitions)
        scores = swing_scores(sw_users, sw_items, params, pair_scores)
        top = top_k_neighbors(scores, int(sw.get("top_k", 20)), float(sw.get("min_score", 0.0)))
        gts_n = int(sw.get("gts_neighbors", 3))
        neighbors = {}
        if gts_n > 0 and not top.empty:
            neighbors = top.groupby("item_id", sort=False)["neighbor_id"].apply(lambda s: list(s[:gts_n])).to_dict()
        swing_df = top.astype({"item_id": str, "neighbor_id": str, "score": np.float64})
        swing_stats = {"min_co_dislikers": int(mcd), "min_co_dislikers_mode": "auto" if sw.get("min_co_dislikers", "auto") in (None, "auto") else "fixed",
                       "item_coverage_by_threshold": coverage, "scored_pairs": int(len(scores)),
                       "items_with_neighbors": int(top["item_id"].nunique()) if len(top) else 0,
                       "dislike_events": int(len(neg_train)), "graph_edges": int(len(sw_users)),
                       "max_dislikers_per_item": int(cap) if cap else None,
                       "capped_items": int((neg_train.drop_duplicates(["user_id", "item_id"]).groupby("item_id").size()
                                            > int(cap)).sum()) if cap else 0, "alpha1": params.alpha1, "alpha2": params.alpha2,
                       "theta": params.theta, "top_k": int(sw.get("top_k", 20)), "gts_neighbors": gts_n}
        item_neg_count = neg_train.groupby("item_id").size().to_dict()

    with steps("samples"):
        ctx = S.SampleContext(inter, plan, sid_of, neighbors, item_neg_count, sid_build, seed, scfg)
        if ray_partitions:
            train_rows, test_rows, skip_counts = D.build_samples_ray(ctx, ray_partitions)
        else:
            train_rows, test_rows, skip_counts = S.build_samples(ctx, progress=bool(cfg.get("progress", True)))
        rcfg = rl_options(cfg)
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
        eval_recs = S.rl_records(test_sorted, "test", sid_build, int(rcfg.get("eval_context", 3))) if len(test_rows) else []
        cand_stats = {}
        if eval_recs:
            cands, targets, cand_stats = S.candidate_sets(test_sorted, inter, plan, sid_of, seed,
                                                          int(scfg.get("n_candidates", 20)))
            for rec, c, t in zip(eval_recs, cands, targets):
                rec["candidates"] = c
                rec["candidate_target"] = t
        sample_stats = _sample_stats(tr, va, test_sorted, skip_counts)
        sample_stats["rl_rows_without_negative_history_dropped"] = int(n_no_neg)
        sample_stats["candidates"] = cand_stats

    with steps("sft"):
        sft_cfg = cfg.get("sft", {}) or {}
        translation = translation_records(items, sid_of) if sft_cfg.get("translation", True) else []
        vfrac = float(scfg.get("val_user_fraction", 0.1))
        train_users = {u for u in train["user_id"].unique().tolist() if not S.is_val_user(seed, u, vfrac)}
        align_cfg = sft_cfg.get("alignment", {}) or {}
        alignment = alignment_records(train, train_users, sid_of, align_cfg, seed)
        alignment, alignment_heldout = split_heldout(alignment, float(align_cfg.get("heldout_fraction", 0.1)), seed)
        wcfg = warmup_config(sft_cfg.get("warmup", True))
        warmup, warmup_val = [], []
        if wcfg.get("rows") == "cutoffs" and len(tr):
            warmup = warmup_records(tr)
            warmup_val = warmup_records(va) if len(va) and va is not tr else []
        elif wcfg.get("rows") == "every_dislike":
            warmup = every_dislike_records(train, plan.key[train_mask], plan.recent, train_users, sid_of, wcfg,
                                           seed, book.num_levels)
            # the same questions for the validation users (never in SFT): what picks SFT epochs
            val_users = {u for u in train["user_id"].unique().tolist() if S.is_val_user(seed, u, vfrac)}
            warmup_val = every_dislike_records(train, plan.key[train_mask], plan.recent, val_users, sid_of, wcfg,
                                               seed, book.num_levels) if val_users else []

    with steps("write"):
        book.save(tmp / "codebook.npz")
        pq.write_table(pa.Table.from_pandas(sid_map, preserve_index=False), tmp / "sid_map.parquet")
        pq.write_table(pa.Table.from_pandas(swing_df, preserve_index=False,
                                            schema=pa.schema([("item_id", pa.string()), ("neighbor_id", pa.string()),
                                                              ("score", pa.float64())])), tmp / "swing.parquet")
        counts = {}
        if translation:
            counts["sft/translation"] = write_parquet(translation, SFT_SCHEMAS["translation"], tmp / "sft" / "translation.parquet")
        counts["sft/alignment"] = write_parquet(alignment, SFT_SCHEMAS["alignment"], tmp / "sft" / "alignment.parquet")
        counts["sft/alignment_heldout"] = write_parquet(alignment_heldout, SFT_SCHEMAS["alignment"],
                                                        tmp / "sft" / "alignment_heldout.parquet")
        counts["sft/warmup"] = write_parquet(warmup, SFT_SCHEMAS["warmup"], tmp / "sft" / "warmup.parquet")
        if warmup_val:
            counts["sft/warmup_val"] = write_parquet(warmup_val, SFT_SCHEMAS["warmup"], tmp / "sft" / "warmup_val.parquet")
        counts["rl/train"] = write_parquet(rl_train, RL_SCHEMA, tmp / "rl" / "train.parquet")
        for context in sorted({r["extra_info"]["context"] for r in rl_train}):
            sub = [r for r in rl_train if r["extra_info"]["context"] == context]
            counts[f"rl/train_context{context}"] = write_parquet(sub, RL_SCHEMA,
                                                                tmp / "rl" / f"train_context{context}.parquet")
        counts["rl/val"] = write_parquet(rl_val, RL_SCHEMA, tmp / "rl" / "val.parquet")
        counts["eval/test"] = write_parquet(eval_recs, EVAL_SCHEMA, tmp / "eval" / "test.parquet")
        sid_report["swing"] = swing_stats
        _write_json(sid_report, tmp / "sid_report.json")
        manifest = {
            "format_version": 1,
            "sid_build": sid_build,
            "seed": seed,
            "config": cfg,
            "inputs": checksums,
            "input_stats": data.stats,
            "split": dict(plan.info, val_users=int(va["user_id"].nunique()) if len(va) else 0,
                          train_events=int(len(train)), warm_items=len(warm), cold_items=n_cold_items),
            "counts": dict(counts, users=int(inter["user_id"].nunique()), items=int(len(all_items)),
                           events=int(len(inter)), items_with_sid=int(len(sid_map))),
            "samples": sample_stats,
            "swing": swing_stats,
            "sid": {k: sid_report[k] for k in ("method", "sizes", "before", "after", "levels")},
            "timings_s": steps.timings,
        }
    manifest["timings_s"] = steps.timings
    _write_json(manifest, tmp / "manifest.json")
    steps.bar.close()
    return manifest


def _sample_stats(tr: pd.DataFrame, va: pd.DataFrame, te: pd.DataFrame, skips: dict) -> dict:
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


def format_summary(m: dict, out: Path) -> str:
    c = m["counts"]
    s = m["samples"]
    sid = m["sid"]
    lines = [f"data_prep: wrote {out}",
             f"  log: {c['users']} users, {c['items']} items, {c['events']} events "
             f"({m['input_stats'].get('likes')} likes, {m['input_stats'].get('dislikes')} dislikes, "
             f"{m['input_stats'].get('neutral_dropped', 0)} neutral dropped, "
             f"{m['input_stats'].get('duplicate_events', 0)} duplicate events "
             f"{'dropped' if m['input_stats'].get('duplicates') == 'drop' else 'kept'})",
             f"  split: {m['split']['mode']}; warm items {m['split']['warm_items']}, cold items {m['split']['cold_items']}"
             + (f"; log days {m['split']['log_days'][0]}..{m['split']['log_days'][1]}, evaluation cutoff "
                f"{m['split']['eval_cutoff_day']} ({m['split'].get('eval_cutoff_from', 'config')}), training cutoffs "
                f"{m['split']['train_cutoff_days'][0]}..{m['split']['train_cutoff_days'][-1]}"
                if m['split'].get('log_days') and m['split'].get('train_cutoff_days') else ""),
             f"  SIDs: {sid['method']} {sid['sizes']}, build {m['sid_build']}; {c['items_with_sid']} items; collisions "
             f"{sid['before']['collision_rate']:.3f} -> {sid['after']['collision_rate']:.3f}; utilisation "
             + ", ".join(f"L{l['level']} {l['utilisation']:.2f} (H {l['entropy_normalised']:.2f})" for l in sid["levels"]),
             f"  swing: min_co_dislikers={m['swing']['min_co_dislikers']} ({m['swing']['min_co_dislikers_mode']}), "
             f"{m['swing']['scored_pairs']} scored pairs, {m['swing']['items_with_neighbors']} items with neighbours"]
    for name in ("train", "val", "test"):
        b = s[name]
        if b.get("rows"):
            lines.append(f"  {name}: {b['rows']} rows / {b['users']} users; GTS {b['gts_items']} items "
                         f"({b['gts_from_swing']} from Swing); future dislikes cold share {b['cold_share']:.3f}"
                         + (f"; contexts {b['contexts']}" if "contexts" in b else ""))
        else:
            lines.append(f"  {name}: 0 rows")
    lines.append("  files: " + ", ".join(f"{k}={v}" for k, v in c.items() if "/" in k))
    lines.append("  skipped (counted): " + json.dumps(s["skipped"]))
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    return "\n".join(lines)
