"""``build(cfg)``: raw log -> the data folder of docs/data-format.md, atomically."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from tqdm.auto import tqdm

from conrec_verl.core.contract import renamed_option
from conrec_verl.data_prep import distributed as D
from conrec_verl.data_prep import steps as T
from conrec_verl.data_prep.embeddings import build_item_embeddings, svd_solver
from conrec_verl.data_prep.errors import DataPrepError
from conrec_verl.data_prep.swing_ray import swing_ray
from conrec_verl.data_prep.train_codes import TrainCodes
from conrec_verl.io_utils import atomic_dir, remove_stale_dirs


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
    # a log other than a MovieLens folder is read on the cluster with engine=ray (no whole-matrix SVD there)
    svd_solver(cfg.get("embedding", {}) or {},
               engine == "ray" and (cfg.get("input", {}) or {}).get("format") != "movielens")
    for stale in remove_stale_dirs(out, OWNER_FILE):
        print(f"data_prep: removed {stale.name}, left by a killed build", file=sys.stderr)
    with atomic_dir(out, owner=OWNER_FILE) as tmp:
        if engine == "ray":
            with D.ray_session(cfg.get("ray") or {}, bool(cfg.get("progress", True))) as n_parts:
                summary = _build_into(cfg, tmp, step_hook, n_parts)
        else:
            summary = _build_into(cfg, tmp, step_hook)
        if out.exists() and not cfg.get("overwrite", False):  # appeared while we built (another run)
            raise DataPrepError(f"{out} was created by someone else while this build ran; nothing replaced "
                                "(pass overwrite=true to replace it)")
    if cfg.get("print_summary", True):
        print(format_summary(summary, out))
    return out


def _build_into(cfg: dict, tmp: Path, hook, ray_partitions: int | None = None) -> dict:
    """The steps of :func:`build` (:mod:`conrec_verl.data_prep.steps`), timed; with ``ray_partitions``
    (engine=ray, inside a Ray session) they run on Ray Data as :mod:`conrec_verl.data_prep.distributed`
    describes (a generic/KuaiRand log never comes to the driver)."""
    seed = int(cfg.get("seed", 0))
    steps = _Steps(STEP_NAMES, bool(cfg.get("progress", True)), hook)
    with steps("read"):
        log = T.read_log(cfg, ray_partitions)
    with steps("split"):
        split = T.split_log(log, cfg)
    ecfg, sw = cfg.get("embedding", {}) or {}, cfg.get("swing", {}) or {}
    on_cluster = split.train_on_cluster is not None  # engine=ray with the log on the cluster
    with steps("embeddings"):
        if on_cluster:  # the SVD's products on the user partitions; the vectors stay in the object store
            factors = D.collab_factors_ray(split.train_on_cluster, split.warm, ecfg, seed)
            emb = D.call_on_worker(build_item_embeddings, ecfg, factors, split.all_items, log.items, seed,
                                   blas=True, keep=True)
            D.wait(emb)  # wait here so the step's time is its own
        else:  # the training events as codes (data_prep/train_codes.py), read by the embeddings and Swing
            codes = TrainCodes.from_frame(split.train)
            emb = build_item_embeddings(ecfg, codes, split.all_items, log.items, seed)
    with steps("sids"):
        if on_cluster:  # beside the vectors, same threads; the driver gets the codebook and the report
            sids = T.on_cluster(T.item_sids, emb, split.warm, split.all_items, cfg, seed, blas=True)
        else:
            sids = T.item_sids(emb, split.warm, split.all_items, cfg, seed)
        del emb
    with steps("swing"):
        if on_cluster:  # on a dislike graph partitioned by item (data_prep/swing_ray.py); kept there
            swing = swing_ray(split.train_on_cluster, sw, ray_partitions)
        else:
            swing = T.swing_neighbours(codes, sw, ray_partitions)
            del codes
    staging = tmp / "_shards"  # engine=ray: the workers' row shards, merged into the files and removed
    with steps("samples"):
        samples = T.rl_samples(log, split, sids, swing, cfg, rl_options(cfg), seed, ray_partitions,
                               staging if ray_partitions else None)
    with steps("sft"):
        sft = T.sft_sets(log, split, sids, samples, cfg, seed, staging if ray_partitions else None)
    with steps("write"):
        manifest = T.write_folder(tmp, cfg, seed, log, split, sids, swing, samples, sft,
                                  on_worker=bool(ray_partitions))
        if staging.exists():
            shutil.rmtree(staging)  # an error here fails the build: no _shards/ in a published folder
    manifest["timings_s"] = steps.timings
    T.write_json(manifest, tmp / "manifest.json")
    steps.bar.close()
    return manifest


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
