"""``engine=ray``: the per-user and per-item work of data_prep on Ray Data.

Selected by one option, ``engine=ray`` (``ray.address``: an existing cluster, e.g. ``auto``; unset
starts a local one for the run). The config and the output folder are the same as with
``engine=local``, byte for byte in every data file (tests/data_prep/test_ray_engine.py):

- **samples** (histories, GTS/FPS windows, the per-user rows of every RL/eval/warm-up file) are
  partitioned **by user**: each event carries a stable hash of its user into a partition column,
  Ray Data groups the events by it (``groupby(...).map_groups``) and every group builds its users'
  rows with the same :func:`data_prep.steps.user_row_sets` the local engine runs on the whole log,
  against item tables built once and shared through the object store, and writes them as shards.
  Users are independent, so the union of the groups, merged by each file's key, is the local
  output. A log read on Ray Data (below) is
  already partitioned there, and each group computes its events' split keys itself; a MovieLens
  log (read on the driver) is sent from the driver.
- **Swing** of a log read on the driver (MovieLens) is partitioned **by item**: partition ``k``
  scores the kept pairs ``(i, j)``, ``i < j``, whose ``i`` falls in it
  (:func:`conrec_verl.core.swing.swing_pair_scores` with ``items=``), from the dislike graph shared
  through the object store. Every pair's sum runs in the same order in any partition, so the
  scores are bit-identical to the local ones. A log read on Ray scores Swing on a dislike graph
  that is itself partitioned by item (``data_prep/swing_ray.py``), never gathered.

- **reading** a log in several files (``input.path``: a folder or a glob of parquet/CSV/TSV
  shards, :func:`data_prep.readers.input_files`): one Ray Data read task per file runs the local
  reader's row checks (:func:`data_prep.readers.events_from_frame`; an error names the file and the
  row in it, the same error as ``engine=local``); the events are partitioned by user (the stable
  hash above) and each partition is finished on a worker: identical events flagged (the first in
  file order stays) and sorted by (user, time, item), as :func:`data_prep.readers.finish_log` does
  for the whole log. The log's counts (rows, neutral, likes, dislikes, duplicates) are summed from
  per-block and per-partition counts; the whole-log checks (empty, no dislike) run on them. A log
  in one file is one read task (no parallel read). Every node must see the input files at the same
  absolute paths (a shared file system); a bad row is reported for the first bad file in file order,
  as the local reader does.

- the **split plan** is made on each partition (one day range for the log) and merged into the
  per-user cutoffs on a worker; the log's counts are per-partition aggregates
  (:func:`reduce_partitions`).
- the **item embeddings** (``embedding.method=collab``) are a randomized SVD whose products are
  sums over the user partitions (:func:`collab_factors_ray`, ``data_prep/partitioned_svd.py``):
  every cross-user sum is taken in fixed point, so the vectors are the same bits for any
  partitioning (the local engine with ``embedding.svd=partitioned`` is one partition); **Swing**
  runs on a dislike graph shuffled by item (``data_prep/swing_ray.py``). No process holds every
  training event: the SVD's reducing task holds about four ``items x (dim + 10)`` arrays (per-item
  state), a Swing item partition the dislike rows of its items' dislikers. The item vectors stay in the object store
  and the **SID** codebook is fitted and every item quantised and repaired in a task beside them
  (:func:`call_on_worker`, with the driver's BLAS/OpenMP thread count).

- the **candidate pools** (items of each day from the evaluation cutoff on, as positions in the
  SID'd items) are merged from the partitions on a worker; the **RL / evaluation rows**
  (:func:`row_sets_ray`: stages, candidate sets) and the **SFT sets** (alignment questions, warm-up
  rows of every dislike) are made on the partitions and written there as shards
  (``data_prep/shards.py``); every seeded draw is per user or per row, so a partition draws its
  users' share of the local build. The shards are merged into the data folder's files by one task
  on the cluster (``data_prep.steps.write_files``), one row group per shard at a time.

So with ``engine=ray`` and a log read on the cluster, the driver holds neither the log's events nor
per-item or per-user state: the distinct items, the split plan (per-user cutoffs), the warm items,
the item -> SID map and SID table, Swing's neighbours, the item lookup, the candidate pools, the
shards' merge-key runs and the rows all stay in the object store or on the workers
(``ObjectRef`` s on the driver, ``data_prep.steps.OnCluster``); the driver fetches counts, reports
and the codebook. Two inputs are read on the driver and keep their size there: a MovieLens log
(its events) and an item table (``input.items.path``: the table, and the log's item ids fetched to
check it against).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd

from conrec_verl.data_prep.errors import DataPrepError, find_data_prep_error

ENGINES = ("local", "ray")
_EVENT_COLUMNS = ["user_id", "item_id", "ts", "day", "polarity"]


def check_engine(cfg: Mapping) -> str:
    engine = str(cfg.get("engine", "local") or "local")
    if engine not in ENGINES:
        raise DataPrepError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray":
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError as exc:  # pragma: no cover - ray is a dependency of verl
            raise DataPrepError(f"engine=ray needs ray[data] installed ({exc})") from exc
        n = (cfg.get("ray") or {}).get("partitions")
        if n is not None and int(n) < 1:
            raise DataPrepError(f"ray.partitions must be >= 1 (or null = auto), got {n}")
    return engine


@contextlib.contextmanager
def ray_session(rcfg: Mapping, progress: bool) -> Iterator[int]:
    """Connect to ``rcfg.address`` or start a local Ray for the run (shut down afterwards); yields
    the number of partitions to use (``rcfg.partitions``, else 2 per cluster CPU)."""
    import ray
    from ray.data import DataContext

    from conrec_verl.runtime.loopback import ray_on_loopback

    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        address = rcfg.get("address")
        if address:
            kwargs["address"] = str(address)
        else:  # a fresh Ray for this run, never whatever cluster happens to run on the machine
            kwargs["address"] = "local"
            if rcfg.get("num_cpus"):
                kwargs["num_cpus"] = int(rcfg["num_cpus"])
        # the workers import conrec_verl (data_prep included) from the installed package, as the driver does
        # a local Ray listens on 127.0.0.1 only (docs/security.md); a cluster's address is left alone
        on_loopback = contextlib.nullcontext() if address else ray_on_loopback()
        try:
            with on_loopback:
                ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - one clear error, whatever Ray raised
            raise DataPrepError(f"engine=ray: could not start or reach Ray (ray.address={address!r}): {exc}") from exc
        started = True
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, getattr(ctx, "raise_original_map_exception", False))
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
    ctx.enable_progress_bars = bool(progress)
    ctx.print_on_execution_start = False
    # a worker's DataPrepError reaches the driver as itself (file, column, row), not as Ray Data's
    # "UDF failed" wrapper
    ctx.raise_original_map_exception = True
    try:
        n = rcfg.get("partitions")
        yield int(n) if n else max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.raise_original_map_exception = saved
        if started:
            ray.shutdown()


def stable_partition(labels, n: int) -> np.ndarray:
    """Partition ``0..n-1`` of each label from a fixed-key hash of its text (same on every run and
    machine, unlike Python's ``hash``)."""
    text = pd.Series(labels, dtype=object).astype(str).to_numpy(dtype=object)
    return (pd.util.hash_array(text) % np.uint64(n)).astype(np.int64)


def compare_data_folders(a, b) -> list[str]:
    """The files that differ between two data folders (empty = the same build): every file byte for
    byte, ``manifest.json`` up to its ``config`` (engine options, out_dir) and ``timings_s``."""
    import filecmp
    import json
    from pathlib import Path

    a, b = Path(a), Path(b)
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diff = sorted(files_a ^ files_b)
    for rel in sorted(files_a & files_b):
        if rel == "manifest.json":
            ma, mb = (json.loads((d / rel).read_text()) for d in (a, b))
            for m in (ma, mb):
                m.pop("timings_s", None)
                m.pop("config", None)
            if ma != mb:
                diff.append(rel)
        elif not filecmp.cmp(a / rel, b / rel, shallow=False):
            diff.append(rel)
    return diff


def _payloads(ds) -> list:
    return [pickle.loads(row["payload"]) for row in ds.iter_rows()]


# -- Swing, partitioned by item ------------------------------------------------------------------

def swing_pair_scores_ray(R, params, n_parts: int, block: int = 100_000):
    """:func:`~conrec_verl.core.swing.swing_pair_scores` over item partitions on Ray Data."""
    import ray
    import ray.data

    from conrec_verl.core.swing import swing_pair_scores

    n_items = R.shape[1]
    part_of_item = np.arange(n_items, dtype=np.int64) % n_parts
    graph = ray.put((R, part_of_item))

    def score(batch: dict) -> dict:
        R_, parts = ray.get(graph)
        out = []
        for k in batch["part"]:
            I, J, S = swing_pair_scores(R_, params, block, items=np.flatnonzero(parts == int(k)))
            out.append(pickle.dumps((I, J, S), protocol=pickle.HIGHEST_PROTOCOL))
        return {"payload": np.array(out, dtype=object)}

    ds = ray.data.from_items([{"part": k} for k in range(n_parts)], override_num_blocks=n_parts)
    res = _payloads(ds.map_batches(score, batch_size=1, batch_format="numpy"))
    if not res:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    I = np.concatenate([r[0] for r in res])
    J = np.concatenate([r[1] for r in res])
    S = np.concatenate([r[2] for r in res])
    order = np.lexsort((J, I))
    return I[order], J[order], S[order]


# -- the RL / evaluation rows, partitioned by user, written by the workers ----------------------

def _row_sets_part(df: pd.DataFrame, shared) -> tuple[dict, dict]:
    """One user partition's RL / evaluation rows (:func:`data_prep.steps.user_row_sets`), each set
    written here as a shard (rows in the set's merge-key order); returns ``{name: (shard, runs)}``
    and the partition's counts."""
    from conrec_verl.data_prep import steps as T
    from conrec_verl.data_prep.shards import write_shard

    plan, lookup, args, staging = shared
    plan, lookup, args = resolved(plan), resolved(lookup), tuple(resolved(a) for a in args)
    events = df[_EVENT_COLUMNS].reset_index(drop=True)
    out = T.user_row_sets(events, replace(plan, key=plan.event_keys(events)), lookup, *args)
    part = int(df["_part"].iloc[0])
    shards = {name: write_shard(recs, T.rl_set_schema(name),
                                Path(staging) / name.replace("/", "-") / f"part-{part:05d}.parquet", out.keys[name])
              for name, recs in out.records.items()}
    return shards, out.stats


def _collect_row_sets(per_part: list, warmup_cutoffs: bool) -> tuple[dict, dict]:
    """The partitions' shards as ``{name: ShardedRows}`` (:func:`data_prep.steps.finish_row_sets`)
    and their summed counts."""
    from conrec_verl.data_prep import steps as T
    from conrec_verl.data_prep.shards import ShardedRows

    sets: dict = {}
    sums: dict = {}
    for shards, stats in per_part:
        for name, (path, runs) in shards.items():
            sets.setdefault(name, ShardedRows(T.rl_set_schema(name))).add(path, runs)
        sums = T.add_stat_sums(sums, stats)
    for name in ("rl/val", "eval/test"):  # files the folder always has, even with no row
        sets.setdefault(name, ShardedRows(T.rl_set_schema(name)))
    if warmup_cutoffs:  # sft.warmup.rows=cutoffs
        for name in ("sft/warmup", "sft/warmup_val"):
            sets.setdefault(name, ShardedRows(T.rl_set_schema(name)))
    return T.finish_row_sets(sets, sums, warmup_cutoffs), sums


def row_sets_ray(log, plan, lookup, args: tuple, n_parts: int, staging) -> tuple[Any, dict]:
    """:func:`data_prep.steps.user_row_sets` on every user partition of the log (``log.parts``, or
    the driver's table of a log read there, sent to the cluster), each partition's sets written by
    its worker as shards under ``staging``. ``plan``, ``lookup`` and the entries of ``args`` may be
    ``ObjectRef`` s (state kept on the cluster). Returns an ``ObjectRef`` to ``{name: ShardedRows}``
    (the shards and their runs, one per user or per user and cutoff, collected on a worker and merged
    into the files when the folder is written, :func:`data_prep.steps.write_files`) and the summed
    counts: the driver never holds the rows or their runs."""
    import ray
    import ray.data

    parts = log.parts
    if parts is None:  # a log read on the driver (MovieLens): its events, in the log's order
        frame = log.interactions[_EVENT_COLUMNS].copy()
        frame["_row"] = np.arange(len(frame), dtype=np.int64)
        frame["_part"] = stable_partition(frame["user_id"].to_numpy(), n_parts)
        parts = ray.data.from_pandas(frame)
        del frame
    if not isinstance(plan, ray.ObjectRef):
        plan = replace(plan, key=None)  # the workers compute their events' keys
    sets, sums = reduce_partitions(parts, _row_sets_part, (plan, lookup, args, str(staging)), _collect_row_sets,
                                   bool(args[-1]), num_returns=2)
    return sets, fetch(sums)


# -- reading a log in several files, partitioned by user -------------------------------------------

_READ_ORDER = ["user_id", "ts", "item_id", "_file", "_row"]


@contextlib.contextmanager
def _worker_errors() -> Iterator[None]:
    """A :class:`DataPrepError` raised in a Ray task comes back as itself (same message, file, row)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error (a subclass of it); find ours
        found = find_data_prep_error(exc)
        if found is None or found is exc:
            raise
        raise found from None


def _finish_partition(df: pd.DataFrame) -> pd.DataFrame:
    """One user partition of the log's non-neutral events, as :func:`data_prep.readers.finish_log`
    finishes the whole log: sorted by (user, time, item), ties in file order, and ``_dup`` set on
    every repeat of an identical event (the first in file order is not one)."""
    from conrec_verl.data_prep.readers import DUPLICATE_KEY

    df = df.sort_values(_READ_ORDER, kind="stable").reset_index(drop=True)
    return df.assign(_dup=df.duplicated(subset=DUPLICATE_KEY).to_numpy())


def read_log_ray(icfg: Mapping, files: list[str], source: str, n_parts: int) -> tuple[None, dict, Any]:
    """:func:`data_prep.readers.read_input`'s reader for a generic or kuairand log in ``files`` on
    Ray Data (see the module docstring). Returns ``(None, stats, parts)``: the table stays on the
    cluster as ``parts``, a materialized Dataset of the events partitioned by user (plus ``_file``,
    ``_row``, ``_part`` and ``_dup``, the flag of a repeated identical event, all False after
    ``input.duplicates=drop``); ``stats`` holds the read counts and the log's counts, all from
    per-partition aggregates, and ``item_ids``: an ``ObjectRef`` to the log's distinct items (sorted,
    kept on the cluster for the item-side steps)."""
    import ray.data

    from conrec_verl.data_prep import readers as R

    duplicates = icfg.get("duplicates", "keep")
    R.check_duplicates_option(duplicates)
    cfg = dict(icfg)
    many = len(files) > 1

    def read_file(batch: pd.DataFrame) -> pd.DataFrame:
        k = int(batch["_file"].iloc[0])
        ev = R.read_events_file(cfg, files[k], allow_empty=many)
        return ev.assign(_file=np.int32(k), _row=np.arange(len(ev), dtype=np.int64),
                         _part=stable_partition(ev["user_id"].to_numpy(), n_parts) if len(ev) else
                         np.zeros(0, np.int64))

    def counts(batch: pd.DataFrame) -> pd.DataFrame:
        pol = batch["polarity"].to_numpy()
        return pd.DataFrame({"rows": [len(pol)], "neutral": [int((pol == 0).sum())],
                             "dislikes": [int((pol < 0).sum())]})

    try:
        with _worker_errors():
            events = ray.data.from_items([{"_file": k} for k in range(len(files))],
                                         override_num_blocks=len(files)) \
                .map_batches(read_file, batch_size=1, batch_format="pandas").materialize()
    except DataPrepError as err:
        # the files are read in parallel, so any bad one may fail first; the local reader names the
        # first bad file in file order: check the files before this one, in order, one at a time
        for k in range(files.index(err.file) if err.file in files else 0):
            R.read_events_file(cfg, files[k], allow_empty=many)
        raise
    with _worker_errors():
        c = pd.DataFrame(events.map_batches(counts, batch_size=None, batch_format="pandas").take_all()).sum()
        if int(c.get("rows", 0)) == 0:
            raise DataPrepError("the interaction log is empty (every file has a header and no rows)", file=source)
        if int(c["dislikes"]) == 0:
            raise R.no_dislike_error(source, R.polarity_column(icfg.get("columns") or {}, icfg["polarity"]))
        parts = events.map_batches(_drop_neutral, batch_format="pandas") \
            .groupby("_part").map_groups(_finish_partition, batch_format="pandas").materialize()
        del events
        n_dup = int(parts.sum("_dup") or 0)
        if duplicates == "drop":
            parts = parts.map_batches(_drop_repeats, batch_format="pandas").materialize()
        counts_ref, item_ids = reduce_partitions(parts, _log_counts, None, _sum_log_counts, num_returns=2)
        log_counts = fetch(counts_ref)
    stats = {"raw_rows": int(c["rows"]), "neutral_dropped": int(c["neutral"]), "duplicate_events": n_dup,
             "duplicates": duplicates}
    if many:
        stats["input_files"] = len(files)
    stats.update(log_counts, item_ids=item_ids)
    return None, stats, parts


def _drop_neutral(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["polarity"].to_numpy() != 0]


def _drop_repeats(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["_dup"].to_numpy(dtype=bool)]


def _log_counts(df: pd.DataFrame, _shared) -> dict:
    """One partition's share of the log's counts (its users are its own: user counts add up)."""
    pol = df["polarity"].to_numpy()
    return {"events": len(df), "users": int(df["user_id"].nunique()), "likes": int((pol > 0).sum()),
            "dislikes": int((pol < 0).sum()), "items": pd.unique(df["item_id"].to_numpy(dtype=object)),
            "days": (int(df["day"].min()), int(df["day"].max()))}


def _sum_log_counts(per_part: list) -> tuple[dict, np.ndarray]:
    """The log's counts (events, users, likes, dislikes, distinct items, first and last day) and its
    distinct items (sorted; kept on the cluster) from the partitions' shares."""
    counts = {k: int(sum(p[k] for p in per_part)) for k in ("events", "users", "likes", "dislikes")}
    item_ids = np.unique(np.concatenate([p["items"] for p in per_part])) if per_part else np.zeros(0, object)
    counts.update(items=int(len(item_ids)),
                  day_range=(min(p["days"][0] for p in per_part), max(p["days"][1] for p in per_part)))
    return counts, item_ids


def _partition_results(parts, fn, shared):
    """``fn(events, shared)`` on every user partition of ``parts``, each result pickled into a
    one-row block of a materialized Dataset (``_part``, ``payload``) that stays on the cluster."""
    import ray

    ref = ray.put(shared)

    def run(df: pd.DataFrame) -> pd.DataFrame:
        # a shuffle need not keep the order: the log's (user, time, item, file order), or for a
        # table sent from the driver its own row order
        order = _READ_ORDER if "_file" in df.columns else ["_row"]
        df = df.sort_values(order, kind="stable").reset_index(drop=True)
        out = fn(df, ray.get(ref))
        return pd.DataFrame({"_part": [int(df["_part"].iloc[0])],
                             "payload": [pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)]})

    with _worker_errors():
        return parts.groupby("_part").map_groups(run, batch_format="pandas").materialize()


def _in_part_order(ds) -> list:
    rows = ds.take_all()
    return [pickle.loads(r["payload"]) for r in sorted(rows, key=lambda r: int(r["_part"]))]


def reduce_partitions(parts, fn, shared, reduce, *args, num_returns: int = 1):
    """``reduce([fn(events, shared) per partition, in partition order], *args)`` on the cluster, where
    ``fn`` runs on every user partition of ``parts`` (:func:`read_log_ray`) with ``events`` = the
    partition's events in the log's order (user, time, item, file order; a table sent from the driver
    without ``_file``: its ``_row`` order) and ``shared`` sent once through the object store (an
    ``ObjectRef`` inside it is read with :func:`resolved`). The per-partition results are never on
    the driver: they stay in the object store and one task (:func:`call_on_worker`)
    reduces them. Returns that task's ``ObjectRef`` (a list of ``num_returns`` refs when ``reduce``
    returns that many values): per-item and per-user state stays on the cluster, and the driver
    fetches only what it must see (counts, a report)."""
    results = _partition_results(parts, fn, shared)

    def gather(ds, *more):
        return reduce(_in_part_order(ds), *more)

    return call_on_worker(gather, results, *args, keep=True, num_returns=num_returns)


def resolved(value):
    """``value``, or what it refers to when it is a Ray ``ObjectRef`` (state that the driver passes
    on by reference, inside a task's shared argument, where Ray does not resolve it)."""
    ray = sys.modules.get("ray")  # no reference exists where Ray was never imported (engine=local)
    return ray.get(value) if ray is not None and isinstance(value, ray.ObjectRef) else value


def fetch(ref):
    """The value behind ``ref`` on the driver (small results only: counts, reports), with a
    :class:`DataPrepError` raised in the task that made it raised as itself."""
    import ray

    with _worker_errors():
        return ray.get(ref)


# -- the split, planned on the partitions -----------------------------------------------------------

def _split_part(df: pd.DataFrame, shared) -> dict:
    from conrec_verl.data_prep import samples as S

    cfg, day_range = shared
    plan = S.plan_split(df, cfg, day_range)
    mask = plan.train_mask(df["user_id"].to_numpy())
    train = df[mask]
    return {"eval_cut": plan.eval_cut, "train_cuts": plan.train_cuts, "info": plan.info,
            "train_items": pd.unique(train["item_id"].to_numpy(dtype=object)), "train_events": int(len(train)),
            "train_dislikes": int((train["polarity"] < 0).sum())}


def split_ray(parts, cfg: Mapping, day_range: tuple[int, int]):
    """The split plan of the partitioned log: :func:`data_prep.samples.plan_split` on every partition
    (one global day range; per-user cutoffs from each user's events), merged on a worker
    (:func:`reduce_partitions`). Returns ``ObjectRef`` s to the plan (without per-event keys) and to the
    warm items (both stay on the cluster), and the split's counts (:func:`_merge_split`)."""
    from conrec_verl.data_prep import samples as S

    dr = (int(S.day_number(day_range[0])[0]), int(S.day_number(day_range[1])[0]))
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                          (("user_id", object), ("item_id", object), ("ts", np.int64), ("day", np.int64))})
    plan = S.plan_split(empty, cfg, dr)  # the config's checks, before any partition runs
    plan_ref, warm_ref, counts_ref = reduce_partitions(parts, _split_part, (dict(cfg), dr), _merge_split,
                                                       replace(plan, key=None), num_returns=3)
    return plan_ref, warm_ref, fetch(counts_ref)


def _merge_split(per_part: list, plan) -> tuple:
    """The partitions' split plans merged into ``plan`` (the whole log's, without per-user cutoffs),
    the warm items (a set) and the split's counts: ``info`` (the plan's), ``train_events``,
    ``train_dislikes``, ``warm_items`` and ``first_eval_day`` (the day of the earliest evaluation
    cutoff, from which the candidate pools are drawn)."""
    eval_cut: dict = {}
    train_cuts: dict = {}
    info = dict(plan.info)
    warm: set = set()
    n_train = n_neg = 0
    for p in per_part:
        eval_cut.update(p["eval_cut"])
        train_cuts.update(p["train_cuts"])
        for k in ("train_cutoffs_moved_back", "train_cutoffs_without_full_window"):
            if k in info:
                info[k] += p["info"][k]
        warm.update(p["train_items"].tolist())
        n_train += p["train_events"]
        n_neg += p["train_dislikes"]
    plan = replace(plan, eval_cut=eval_cut, train_cuts=train_cuts, info=info)
    first = plan.cutoff_day(min(eval_cut.values())) if eval_cut else 0
    return plan, warm, {"info": info, "train_events": n_train, "train_dislikes": n_neg, "warm_items": len(warm),
                        "first_eval_day": int(first)}


# -- the item-side steps on the partitions: the training events, the embeddings' SVD ------------

TRAIN_COLUMNS = ["user_id", "item_id", "ts", "day", "polarity", "weight"]


def _train_part(df: pd.DataFrame, plan) -> pd.DataFrame:
    df = df.sort_values(_READ_ORDER, kind="stable").reset_index(drop=True)
    part_plan = replace(plan, key=plan.event_keys(df))
    return df.loc[part_plan.train_mask(df["user_id"].to_numpy()), TRAIN_COLUMNS + ["_file", "_row", "_part"]]


def train_events_ray(parts, plan):
    """The events before each user's evaluation cutoff, kept on the cluster (a materialized
    Dataset, per user partition) for the steps that read them on a worker. ``plan``: the split plan
    or an ``ObjectRef`` to it (:func:`split_ray`)."""
    def keep(df: pd.DataFrame) -> pd.DataFrame:
        return _train_part(df, resolved(plan))

    with _worker_errors():
        return parts.groupby("_part").map_groups(keep, batch_format="pandas").materialize()


def _svd_block_part(df: pd.DataFrame, shared):
    from conrec_verl.data_prep.embeddings import signed_values
    from conrec_verl.data_prep.partitioned_svd import UserBlock

    items, like_w, dislike_w = shared
    items = resolved(items)
    codes = np.searchsorted(items, df["item_id"].to_numpy(dtype=object))
    vals = signed_values(df["polarity"].to_numpy(), df["weight"].to_numpy(np.float32), like_w, dislike_w)
    return UserBlock.from_events(df["user_id"].to_numpy(dtype=object), codes, vals, len(items))


class _ShareSum:
    """A Ray actor's running sum of the partitions' shares of one SVD pass (or of their stats): the
    partitions' results are added where they are made, so at most one total per actor exists, not one
    share per partition."""

    def __init__(self):
        self.total = None

    def add(self, blocks: pd.DataFrame, state) -> None:
        from conrec_verl.data_prep import partitioned_svd as PS

        for payload in blocks["payload"]:
            block = pickle.loads(payload)
            if state is None:
                share = block.stats()
                self.total = share if self.total is None else PS.merge_stats([self.total, share])
            else:  # int64, in place: exact in any order
                self.total = PS.add_into(self.total, block.product(state), state.n_items)

    def take(self):
        total, self.total = self.total, None
        return total


def _fetched_one_at_a_time(refs: list):
    """The values behind ``refs`` (references kept in a list, which Ray does not resolve), fetched one
    at a time as they are read, skipping ``None`` (an actor that got no partition)."""
    import ray

    for ref in refs:
        value = ray.get(ref)
        if value is not None:
            yield value
        del value


def _svd_plan(items, dim: int, n_iter: int, seed: int, stats: list):
    from conrec_verl.data_prep import partitioned_svd as PS

    return PS.plan(PS.merge_stats(_fetched_one_at_a_time(stats)), len(items), dim, n_iter, seed)


def _svd_advance(state, totals: list):
    from conrec_verl.data_prep import partitioned_svd as PS

    total = None  # the actors' totals added one at a time: two in memory, not every actor's
    for share in _fetched_one_at_a_time(totals):  # (the first copied: an object-store array is read-only)
        total = PS.add_into(total, share, state.n_items)
    return PS.advance(state, total)


def _sorted_items(warm) -> np.ndarray:
    return np.array(sorted(warm), dtype=object)


#: at most this many actors sum an SVD pass's shares (each holds one items x (dim + 10) int64 total)
MAX_SVD_ACTORS = 8


def collab_factors_ray(train_ds, warm, ecfg: Mapping, seed: int):
    """The :class:`~conrec_verl.data_prep.embeddings.CollabFactors` of the training events (the
    :func:`train_events_ray` Dataset; ``warm``: the reference to the training items' set) computed on
    the cluster with :mod:`data_prep.partitioned_svd`: every user partition codes its events as one
    :class:`~data_prep.partitioned_svd.UserBlock` (kept in the object store), each pass the actors
    (:class:`_ShareSum`, up to :data:`MAX_SVD_ACTORS`) add the blocks' fixed-point shares as they make
    them, and one task (with the driver's BLAS threads) adds the actors' totals and
    takes the QR or the eigendecomposition. No process holds more than one partition's events; the
    reducing task holds about four ``items x (dim + 10)`` arrays of 8-byte numbers (the basis, the
    running total, one actor's total, the QR's workspace) and each actor two (its total, one
    partition's share). Returns the factors' ``ObjectRef``."""
    from conrec_verl.data_prep.embeddings import CollabFactors

    items = call_on_worker(_sorted_items, warm, keep=True)
    if ecfg.get("method", "collab") != "collab":  # the other methods read only which items are warm
        return call_on_worker(lambda ids: CollabFactors(ids, None, {}), items, keep=True)
    import ray

    n_iter = int(ecfg.get("svd_iters", 5))
    blocks = _partition_results(train_ds, _svd_block_part, (items, float(ecfg.get("like_weight", 1.0)),
                                                            float(ecfg.get("dislike_weight", 1.0))))
    block_refs = blocks.to_pandas_refs()
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    n_sums = max(1, int(min(len(block_refs), cpus, MAX_SVD_ACTORS)))
    # one actor per CPU (spread over the nodes) reserving none: they work only while the pass runs, and
    # the task that reduces their totals runs between passes (a reserved CPU could leave it no node)
    sums = [ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(_ShareSum).remote() for _ in range(n_sums)]
    try:
        def one_pass(state) -> list:
            with _worker_errors():
                ray.get([sums[j % n_sums].add.remote(ref, state) for j, ref in enumerate(block_refs)])
            takes = [s.take.remote() for s in sums]
            ray.wait(takes, num_returns=len(takes), fetch_local=False)  # taken before an actor can be killed
            return takes

        state = call_on_worker(_svd_plan, items, int(ecfg.get("dim", 32)), n_iter, seed, one_pass(None), keep=True)
        for _ in range(n_iter + 2):  # sketch, n_iter power steps, gram
            state = call_on_worker(_svd_advance, state, one_pass(state), blas=True, keep=True)
        return call_on_worker(lambda st, ids: CollabFactors(ids, st.vectors.astype(np.float32), st.report),
                              state, items, keep=True)
    finally:
        for s in sums:
            ray.kill(s)


def wait(ref) -> None:
    """Until the task behind ``ref`` has finished (its value stays where it is; an error in it is
    raised by whatever reads it)."""
    import ray

    ray.wait([ref], fetch_local=False)


def call_on_worker(fn, *args, num_cpus: float = 1, blas: bool = False, keep: bool = False, num_returns: int = 1):
    """``fn(*args)`` in one Ray task on the driver's node (soft affinity): the reductions of
    per-partition results and the steps on per-item state run there, not on the driver. ``ObjectRef``
    arguments are resolved in the task, so a result kept there never comes to the driver. ``blas``:
    start the worker with the driver's BLAS thread count (Ray starts workers with one), so that dense
    linear algebra (the SVD's QR and eigendecomposition, the SID k-means) sums in the same order and the vectors equal the
    local engine's on a machine like the driver's; on other CPUs or BLAS builds they may differ in
    the last bits. ``keep``: return the result's ``ObjectRef`` (it stays in the object store, for
    the next task) instead of the value; with ``num_returns`` > 1, ``fn`` returns that many values and
    ``keep`` returns one ref per value. A :class:`DataPrepError` in the task is raised as itself."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options = {"num_cpus": num_cpus, "num_returns": int(num_returns), "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True)}
    if blas:
        threads = str(blas_threads())
        options["runtime_env"] = {"env_vars": {k: threads for k in
                                               ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    ref = ray.remote(**options)(fn).remote(*args)
    if keep:
        return ref
    with _worker_errors():
        return ray.get(ref)


def blas_threads() -> int:
    """The BLAS thread count of this process (threadpoolctl, scikit-learn's dependency), 1 if none is
    loaded or threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return 1

    counts = [int(p.get("num_threads") or 1) for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts) if counts else 1


# -- candidate pools on the partitions -----------------------------------------------------------

def _day_positions_part(df: pd.DataFrame, shared) -> dict:
    """One partition's (day -> positions in the SID'd items) of the days from ``first_day`` on."""
    from conrec_verl.data_prep import samples as S

    sid_of, items, first_day = (resolved(v) for v in shared)
    pairs = S.day_item_pairs(df[df["day"].to_numpy() >= first_day], sid_of)
    pos = pd.Index(items).get_indexer(pairs["item_id"].to_numpy(dtype=object)).astype(np.int32)
    days = pairs["day"].to_numpy()
    return {int(d): np.unique(pos[days == d]) for d in np.unique(days)}


def _merge_day_positions(per_part: list, items: np.ndarray):
    from conrec_verl.data_prep import samples as S

    days: dict = {}
    for part in per_part:
        for d, pos in part.items():
            days[d] = np.union1d(days[d], pos) if d in days else pos
    return S.CandidatePools(items, {d: days[d].astype(np.int32) for d in sorted(days)})


def candidate_pools_ray(parts, sid_of, items, first_day: int):
    """An ``ObjectRef`` to the :class:`data_prep.samples.CandidatePools` of the partitioned log: each
    partition finds its distinct (day, item position) pairs from ``first_day`` on as int32 arrays,
    merged per day on a worker. ``sid_of`` (item -> SID) and ``items`` (the SID'd items, sorted):
    values or ``ObjectRef`` s."""
    return reduce_partitions(parts, _day_positions_part, (sid_of, items, int(first_day)), _merge_day_positions,
                             items)


# -- SFT sets on the partitions ------------------------------------------------------------------

def _sft_part(df: pd.DataFrame, shared) -> dict:
    from conrec_verl.data_prep import samples as S
    from conrec_verl.data_prep import sft as F
    from conrec_verl.data_prep.shards import write_shard
    from conrec_verl.data_prep.steps import SFT_SCHEMAS

    plan, sid_of, align_cfg, wcfg, seed, vfrac, levels, staging = shared
    plan, sid_of = resolved(plan), resolved(sid_of)
    users = df["user_id"].unique().tolist()
    train_users = {u for u in users if not S.is_val_user(seed, u, vfrac)}
    val_users = set(users) - train_users
    neg_of, pos_of = F.alignment_pools(df, train_users, sid_of, align_cfg)
    # the questions of this partition's users (each user's draws are its own), written here
    align = F.alignment_from_pools(neg_of, pos_of, sid_of, align_cfg, seed)
    part = int(df["_part"].iloc[0])
    shards = {"alignment": write_shard(align, SFT_SCHEMAS["alignment"],
                                       Path(staging) / "alignment" / f"part-{part:05d}.parquet")}
    if wcfg is not None:
        keys = plan.event_keys(df)
        for name, who in (("warmup", train_users), ("warmup_val", val_users)):
            rows = F.every_dislike_records(df, keys, plan.recent, who, sid_of, wcfg, seed, levels,
                                           window=plan.window, with_likes=name == "warmup") if who else []
            # this worker writes its rows (users in sorted order); only their runs leave it
            rows = sorted(rows, key=lambda r: r["extra_info"]["user_id"])
            shards[name] = write_shard(rows, SFT_SCHEMAS["warmup"], Path(staging) / name / f"part-{part:05d}.parquet")
    return shards


def sft_parts_ray(train_ds, plan, sid_of, align_cfg: Mapping, wcfg: Mapping | None, seed: int, vfrac: float,
                  levels: int, staging, heldout: float) -> list:
    """The per-user SFT sets on the partitions of the training events, written by the workers as
    shards under ``staging`` (a folder every worker can write: the build's output folder): the
    alignment questions (each user's draws its own, :func:`data_prep.sft.alignment_from_pools`; the
    ``heldout`` fraction of them, by position in the merged order, goes to the held-out file) and,
    with ``wcfg`` (``sft.warmup.rows: every_dislike``), the warm-up rows of training and validation
    users. ``plan`` and ``sid_of``: values or ``ObjectRef`` s. Returns ``ObjectRef`` s to them as
    :class:`data_prep.shards.ShardedRows` (alignment, warm-up, warm-up validation), collected on a
    worker and merged into their files when the folder is written (:func:`data_prep.shards.merge_shards`):
    the driver holds neither the rows nor their runs."""
    import ray

    if not isinstance(plan, ray.ObjectRef):
        plan = replace(plan, key=None)
    shared = (plan, sid_of, dict(align_cfg), dict(wcfg) if wcfg else None, seed, vfrac, levels, str(staging))
    return reduce_partitions(train_ds, _sft_part, shared, _collect_sft_parts, float(heldout), int(seed),
                             num_returns=3)


def _collect_sft_parts(per_part: list, heldout: float, seed: int) -> tuple:
    from conrec_verl.data_prep.sft import heldout_positions
    from conrec_verl.data_prep.shards import ShardedRows
    from conrec_verl.data_prep.steps import SFT_SCHEMAS

    sets = {"alignment": ShardedRows(SFT_SCHEMAS["alignment"]), "warmup": ShardedRows(SFT_SCHEMAS["warmup"]),
            "warmup_val": ShardedRows(SFT_SCHEMAS["warmup"])}
    for shards in per_part:
        for name, (path, runs) in shards.items():
            sets[name].add(path, runs)
    # the held-out questions: positions in the merged order, split when the folder is written
    sets["alignment"].held_out = heldout_positions(len(sets["alignment"]), heldout, seed)
    return sets["alignment"], sets["warmup"], sets["warmup_val"]
