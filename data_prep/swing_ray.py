"""Swing on a distributed dislike graph (``engine=ray``, a log read on the cluster).

:func:`swing_ray` gives the :class:`~conrec_verl.data_prep.steps.SwingResult` of
:func:`~conrec_verl.data_prep.steps.swing_neighbours` on the training events (``TrainCodes`` of
the whole table), bit for bit (table, scores, row order, neighbours, stats, dislike counts), with no
process holding every training event or the whole dislike graph:

1. **item partitions** (``_ipart``: :func:`~conrec_verl.data_prep.distributed.stable_partition` of
   the item, ``n_parts``): the dislikes are shuffled by item; each partition counts its items'
   dislike events, keeps one edge per (user, item) at its latest time and, with
   ``max_dislikers_per_item``, each item's most recent dislikers by (time, user): the rule of
   :func:`~conrec_verl.core.swing.cap_dislikers` (:func:`item_graph`).
2. one task gathers the **per-item** state: the sorted items of the (capped) graph, their numbers of
   dislikers ``N_i`` and the dislike counts (:func:`item_state`).
3. **user partitions** (the events' ``_part``): the capped edges are shuffled back by user; each user
   sends its whole (capped) row once to every item partition that holds one of its items
   (:func:`user_rows`).
4. **item partitions** ``k``: the rows of the users who disliked an item of ``k`` form ``R_k`` (users
   in sorted-id order, every column of theirs); each of ``k``'s items is covered at a threshold
   ``t`` when some other item shares ``>= t`` of its dislikers (:func:`item_part_matrix`); the
   summed counts give the local engine's coverage and ``min_co_dislikers``
   (:func:`coverage_and_threshold`); then :func:`~conrec_verl.core.swing.swing_pair_scores` with
   ``items=`` scores the kept pairs ``(i, j)``, ``i < j``, of ``k``'s items ``i``, and both directions
   ``S / sqrt(N)`` are emitted (:func:`item_part_scores`). Every pair's double sum runs over its
   co-dislikers in ascending user order whatever other users or items the partition holds (see
   ``swing_pair_scores``), so the scores are the local ones bit for bit.
5. **source-item partitions**: each keeps the top ``k`` of its items
   (:func:`~conrec_verl.core.swing.top_k_neighbors`, a total order: item, score desc, neighbour); one
   task gathers the top-k tables (items x top_k rows), orders them as the local table and labels
   them (:func:`finish`).

Items are coded as positions in the sorted graph items and users are ranked by their ids inside an
item partition: both recodings keep the ids' order, so every sum, tie-break and row order is the one
taken on the whole table's codes.

Memory: an item partition holds (step 1) the dislike events of its items, (step 4) the capped dislike
rows of every user who disliked one of its items (and their pair scores; the object store keeps every
partition's matrix at once between the coverage and the scoring pass, a user's row once per item
partition of its items), and (step 5) the directed
scored pairs whose source is one of its items; a user partition (step 3) holds its users' capped
edges, the rows it sends and the sorted graph item ids; the tasks of steps 2 and 5 hold per-item
state (the graph item ids, ``N_i``, dislike counts, the final top-k table: items x top_k rows). The pure functions run without Ray;
:func:`swing_partitioned` wires them with pandas for tests.
"""

from __future__ import annotations

import pickle
from typing import Sequence

import numpy as np
import pandas as pd

from conrec_verl.core.swing import SwingParams, dislike_matrix, swing_pair_scores, top_k_neighbors
from conrec_verl.data_prep.distributed import stable_partition

_EDGE_COLUMNS = ["user_id", "item_id", "_part", "_ipart"]
_STAT_COLUMNS = ["item_id", "n_events", "n_dislikers", "n_kept"]


# -- the options, read as swing_neighbours reads them ----------------------------------------------

def swing_options(sw: dict) -> dict:
    """The ``swing`` config as both engines read it (here and
    :func:`~conrec_verl.data_prep.steps.swing_neighbours`), with its errors (bad ``alpha``,
    ``min_co_dislikers``, ``top_k``) raised before any work."""
    cap = sw.get("max_dislikers_per_item")
    cands = [int(c) for c in sw.get("auto_candidates", [6, 5, 4, 3, 2])]
    mode = sw.get("min_co_dislikers", "auto")
    auto = mode in (None, "auto")
    opts = {"cap": int(cap) if cap else None, "candidates": cands, "thresholds": sorted(set(cands + [2])),
            "auto": auto, "target": float(sw.get("auto_item_coverage", 0.5)),
            "alpha1": float(sw.get("alpha1", 5.0)), "alpha2": float(sw.get("alpha2", 1.0)),
            "theta": float(sw.get("theta", 0.5)), "fixed": None if auto else int(mode),
            "top_k": int(sw.get("top_k", 20)), "min_score": float(sw.get("min_score", 0.0)),
            "gts_neighbors": int(sw.get("gts_neighbors", 3))}
    swing_params(opts, 2 if auto else opts["fixed"])
    top_k_neighbors(_directed_frame(), opts["top_k"], opts["min_score"])  # top_k >= 1
    return opts


def swing_params(opts: dict, min_co_dislikers: int) -> SwingParams:
    return SwingParams(opts["alpha1"], opts["alpha2"], opts["theta"], int(min_co_dislikers))


def _directed_frame(src=None, dst=None, score=None) -> pd.DataFrame:
    z = np.zeros(0, np.int64)
    return pd.DataFrame({"item_id": z if src is None else src, "neighbor_id": z if dst is None else dst,
                         "score": np.zeros(0) if score is None else score})


# -- 1. dislikes -> edges, per item partition ------------------------------------------------------

def dislike_events(df: pd.DataFrame, n_parts: int) -> pd.DataFrame:
    """The dislikes (``polarity < 0`` after the int8 cast of ``TrainCodes``) of a block of training
    events: ``user_id``, ``item_id``, ``ts`` (int64), ``_part`` (the user partition) and ``_ipart``
    (the item partition)."""
    neg = df["polarity"].to_numpy().astype(np.int8, copy=False) < 0
    items = df["item_id"].to_numpy()[neg]
    return pd.DataFrame({"user_id": df["user_id"].to_numpy()[neg], "item_id": items,
                         "ts": df["ts"].to_numpy(dtype=np.int64)[neg],
                         "_part": df["_part"].to_numpy(dtype=np.int64)[neg],
                         "_ipart": stable_partition(items, n_parts) if len(items) else np.zeros(0, np.int64)})


def item_graph(ev: pd.DataFrame, cap: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Swing graph's edges of some items from all their dislike events ``ev``
    (:func:`dislike_events`): one per (user, item), and with ``cap`` only each item's ``cap`` most
    recent dislikers by (latest time, user), as :func:`~conrec_verl.core.swing.cap_dislikers`. Returns
    the edges (``user_id``, ``item_id``, ``_part``, ``_ipart``) and per item ``n_events`` (dislike
    events), ``n_dislikers`` (distinct, before the cap) and ``n_kept`` (edges kept: ``N_i``)."""
    if not len(ev):
        return (pd.DataFrame({c: ev[c] for c in _EDGE_COLUMNS}),
                pd.DataFrame({"item_id": ev["item_id"], **{c: np.zeros(0, np.int64) for c in _STAT_COLUMNS[1:]}}))
    pairs = ev.groupby(["item_id", "user_id"], sort=True).agg(
        ts=("ts", "max"), n=("ts", "size"), _part=("_part", "first"), _ipart=("_ipart", "first")).reset_index()
    if cap:
        # per item, in (time, user) order: the last ``cap`` are the most recent dislikers
        pairs = pairs.sort_values(["item_id", "ts", "user_id"], kind="stable")
        rank = pairs.groupby("item_id", sort=False).cumcount(ascending=False).to_numpy()
        kept = rank < int(cap)
    else:
        kept = np.ones(len(pairs), dtype=bool)
    per = pd.DataFrame({"item_id": pairs["item_id"].to_numpy(), "n": pairs["n"].to_numpy(np.int64),
                        "k": kept.astype(np.int64)}).groupby("item_id", sort=True)
    stats = pd.DataFrame({"n_events": per["n"].sum(), "n_dislikers": per["n"].size(),
                          "n_kept": per["k"].sum()}).astype(np.int64).rename_axis("item_id").reset_index()
    edges = pairs.loc[kept, _EDGE_COLUMNS].reset_index(drop=True)
    return edges, stats


# -- 2. per-item state --------------------------------------------------------------------------------

def item_state(stats: pd.DataFrame, cap: int | None) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """From every item's :func:`item_graph` counts: ``(graph_items, n_dislikers)`` (the sorted item
    ids with an edge, and their ``N_i`` as float64, as ``R.sum(axis=0)``) and the counts of the result
    (``item_neg_count`` in item order, ``dislike_events``, ``graph_edges``, ``capped_items``)."""
    items = stats["item_id"].to_numpy(dtype=object)
    order = np.argsort(items, kind="stable")  # object ids: Python's order, as pd.factorize(sort=True)
    items = items[order]
    n_events, n_dis, n_kept = (stats[c].to_numpy(dtype=np.int64)[order] for c in _STAT_COLUMNS[1:])
    graph = n_kept > 0
    disliked = n_events > 0
    counts = {"item_neg_count": dict(zip(items[disliked].tolist(), n_events[disliked].tolist())),
              "dislike_events": int(n_events.sum()),
              "graph_edges": int(n_kept.sum()) if cap else int(n_events.sum()),
              "capped_items": int((n_dis > int(cap)).sum()) if cap else 0}
    return (items[graph], n_kept[graph].astype(np.float64)), counts


# -- 3. each user's row, to every item partition of its items -------------------------------------

def user_rows(edges: pd.DataFrame, graph_items: np.ndarray) -> pd.DataFrame:
    """Every user's whole (capped) row of ``edges`` (all the edges of some users), once per item
    partition ``_k`` that holds one of its items: ``_k``, ``user_id``, ``item`` (position in
    ``graph_items``) and ``ipart`` (the item's partition)."""
    ids = edges["item_id"].to_numpy(dtype=object)
    item = np.searchsorted(graph_items, ids).astype(np.int64)
    if len(item) and not np.array_equal(graph_items[np.minimum(item, len(graph_items) - 1)], ids):
        raise ValueError("swing_ray: an edge's item is not in the graph's items")
    e = pd.DataFrame({"user_id": edges["user_id"].to_numpy(), "item": item,
                      "ipart": edges["_ipart"].to_numpy(dtype=np.int64)})
    parts = e[["user_id", "ipart"]].drop_duplicates().rename(columns={"ipart": "_k"})
    return parts.merge(e, on="user_id", how="inner", sort=False)[["_k", "user_id", "item", "ipart"]]


# -- 4. an item partition's matrix, coverage and pair scores --------------------------------------

def item_part_matrix(rows: pd.DataFrame, k: int, thresholds: Sequence[int]):
    """Item partition ``k``'s matrix from its :func:`user_rows`: ``(R_k, cols, own)`` with ``R_k``
    the binary users (sorted ids) x ``cols`` (graph item positions, sorted) matrix and ``own`` the
    columns of ``k``'s items; and per threshold ``t`` the number of ``k``'s items with another item
    sharing ``>= max(t, 2)`` dislikers (the items that
    :func:`~conrec_verl.core.swing.item_coverage_at_thresholds` counts as covered)."""
    R, _, cols = dislike_matrix(rows["user_id"].to_numpy(), rows["item"].to_numpy(dtype=np.int64))
    cols = np.asarray(cols, dtype=np.int64)
    own = np.searchsorted(cols, np.unique(rows["item"].to_numpy(dtype=np.int64)[rows["ipart"].to_numpy() == k]))
    C = (R[:, own].T @ R).tocoo()  # rows: k's items, columns: every item of its users
    off = C.col != own[C.row]
    best = np.zeros(len(own))
    np.maximum.at(best, C.row[off], C.data[off])
    covered = [int((best >= max(int(t), 2)).sum()) for t in thresholds]
    return (R, cols, own), covered


def coverage_and_threshold(covered: Sequence[Sequence[int]], n_items: int, opts: dict) -> tuple[dict, int]:
    """The item coverage per threshold (summed :func:`item_part_matrix` counts over ``n_items``
    graph items, as :func:`~conrec_verl.core.swing.item_coverage_at_thresholds`) and the threshold:
    the fixed one, or the choice of :func:`~conrec_verl.core.swing.choose_min_co_dislikers`."""
    total = np.zeros(len(opts["thresholds"]), dtype=np.int64)
    for c in covered:
        total += np.asarray(c, dtype=np.int64)
    coverage = {int(t): float(int(c) / n_items) if n_items else 0.0 for t, c in zip(opts["thresholds"], total)}
    if not opts["auto"]:
        return coverage, opts["fixed"]
    ordered = sorted({int(c) for c in opts["candidates"]}, reverse=True)
    for t in ordered:  # choose_min_co_dislikers: the strictest candidate reaching the target
        if coverage[t] >= opts["target"]:
            return coverage, t
    return coverage, ordered[-1]


def item_part_scores(matrix, params: SwingParams, n_dislikers: np.ndarray) -> pd.DataFrame:
    """Both directions of every kept pair ``(i, j)`` of an item partition (``i`` its item) with
    ``S > 0``: ``item_id`` -> ``neighbor_id`` (graph item positions) at ``S / sqrt(N_neighbor)``, as
    :func:`~conrec_verl.core.swing.swing_scores`."""
    R, cols, own = matrix
    I, J, S = swing_pair_scores(R, params, items=own)
    pos = S > 0
    I, J, S = cols[I[pos]], cols[J[pos]], S[pos]
    return _directed_frame(np.concatenate([I, J]), np.concatenate([J, I]),
                           np.concatenate([S / np.sqrt(n_dislikers[J]), S / np.sqrt(n_dislikers[I])]))


# -- 5. top-k per source item, the result ----------------------------------------------------------

def top_part(directed: pd.DataFrame, opts: dict) -> tuple[pd.DataFrame, int]:
    """The top-k of the source items of ``directed`` (all the directed pairs of those items) and how
    many directed pairs there were."""
    return top_k_neighbors(directed, opts["top_k"], opts["min_score"]), int(len(directed))


def finish(tops: Sequence[tuple[pd.DataFrame, int]], graph_items: np.ndarray, counts: dict, coverage: dict,
           mcd: int, opts: dict):
    """The :class:`~conrec_verl.data_prep.steps.SwingResult` from scored pairs of item codes: the
    partitions' :func:`top_part` here, the one whole score frame in
    :func:`~conrec_verl.data_prep.steps.swing_neighbours` (one labelling and one stats dict for
    both engines)."""
    from conrec_verl.data_prep.steps import SwingResult

    frames = [t for t, _ in tops if len(t)]
    scored = sum(n for _, n in tops)
    top = top_k_neighbors(pd.concat(frames, ignore_index=True) if frames else _directed_frame(),
                          opts["top_k"], opts["min_score"])
    top = top.assign(item_id=graph_items[top["item_id"].to_numpy(dtype=np.int64)],
                     neighbor_id=graph_items[top["neighbor_id"].to_numpy(dtype=np.int64)])
    gts_n = opts["gts_neighbors"]
    neighbors = {}
    if gts_n > 0 and not top.empty:
        neighbors = top.groupby("item_id", sort=False)["neighbor_id"].apply(lambda s: list(s[:gts_n])).to_dict()
    frame = top.astype({"item_id": str, "neighbor_id": str, "score": np.float64})
    params = swing_params(opts, mcd)
    stats = {"min_co_dislikers": int(mcd), "min_co_dislikers_mode": "auto" if opts["auto"] else "fixed",
             "item_coverage_by_threshold": coverage, "scored_pairs": int(scored),
             "items_with_neighbors": int(top["item_id"].nunique()) if len(top) else 0,
             "dislike_events": counts["dislike_events"], "graph_edges": counts["graph_edges"],
             "max_dislikers_per_item": opts["cap"], "capped_items": counts["capped_items"],
             "alpha1": params.alpha1, "alpha2": params.alpha2, "theta": params.theta, "top_k": opts["top_k"],
             "gts_neighbors": gts_n}
    return SwingResult(frame, neighbors, stats, counts["item_neg_count"])


# -- the whole computation in one process (pandas groupby for the shuffles): tests ---------------

def swing_partitioned(train: pd.DataFrame, sw: dict, n_parts: int):
    """:func:`swing_ray`'s steps in this process, each shuffle a pandas groupby (``train`` with a
    ``_part`` column): the same partitioned computation without Ray, for tests."""
    opts = swing_options(sw)
    ev = dislike_events(train, n_parts)
    graphs = [item_graph(g, opts["cap"]) for _, g in ev.groupby("_ipart")]
    edges = pd.concat([e for e, _ in graphs] or [ev[_EDGE_COLUMNS]], ignore_index=True)
    stats = pd.concat([s for _, s in graphs], ignore_index=True) if graphs else item_graph(ev, None)[1]
    (graph_items, n_dis), counts = item_state(stats, opts["cap"])
    rows = [user_rows(g, graph_items) for _, g in edges.groupby("_part")]
    rows = pd.concat(rows, ignore_index=True) if rows else None
    parts = [item_part_matrix(g, int(k), opts["thresholds"]) for k, g in rows.groupby("_k")] if rows is not None \
        else []
    coverage, mcd = coverage_and_threshold([c for _, c in parts], len(graph_items), opts)
    params = swing_params(opts, mcd)
    directed = [item_part_scores(m, params, n_dis) for m, _ in parts]
    directed = pd.concat(directed, ignore_index=True) if directed else _directed_frame()
    tops = [top_part(g.reset_index(drop=True), opts)
            for _, g in directed.groupby(directed["item_id"].to_numpy() % n_parts)]
    return finish(tops, graph_items, counts, coverage, mcd, opts)


# -- on Ray Data -------------------------------------------------------------------------------------

def _arrow(df: pd.DataFrame, fields: list):
    import pyarrow as pa

    return pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)


def _payload_table(key: str, k: int, value, **extra):
    import pyarrow as pa

    cols = {key: pa.array([int(k)], pa.int64())}
    for name, v in extra.items():
        cols[name] = pa.array([v], pa.list_(pa.int64()) if isinstance(v, list) else pa.int64())
    cols["payload"] = pa.array([pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)], pa.large_binary())
    return pa.table(cols)


def swing_ray(train_ds, sw: dict, n_parts: int):
    """:func:`~conrec_verl.data_prep.steps.swing_neighbours` of the training events ``train_ds`` (a
    materialized Dataset partitioned by user, ``_part``: :func:`~conrec_verl.data_prep.distributed.
    train_events_ray`) on a distributed dislike graph (the module docstring), with ``n_parts`` item
    partitions. Returns an :class:`~conrec_verl.data_prep.steps.OnCluster`: an ``ObjectRef`` to the
    :class:`~conrec_verl.data_prep.steps.SwingResult` (kept on the cluster) and its stats. The driver
    reads only the per-partition coverage counts and the stats."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from conrec_verl.data_prep import distributed as D
    from conrec_verl.data_prep.steps import OnCluster

    n_parts = int(n_parts)
    if n_parts < 1:
        raise ValueError(f"swing_ray: n_parts must be >= 1, got {n_parts}")
    opts = swing_options(sw)
    cap = opts["cap"]
    i64 = pa.int64()

    def id_fields(tbl):
        return tbl.schema.field("user_id").type, tbl.schema.field("item_id").type

    def dislikes(tbl):
        ut, it = id_fields(tbl)
        return _arrow(dislike_events(tbl.to_pandas(), n_parts),
                      [("user_id", ut), ("item_id", it), ("ts", i64), ("_part", i64), ("_ipart", i64)])

    def graph_part(tbl):  # edges (kind 0) and item counts (kind 1) of an item partition
        ut, it = id_fields(tbl)
        edges, stats = item_graph(tbl.to_pandas(), cap)
        both = pd.concat([edges.assign(kind=np.int8(0), n_events=0, n_dislikers=0, n_kept=0),
                          stats.assign(kind=np.int8(1), user_id=None, _part=0, _ipart=0)], ignore_index=True)
        return _arrow(both, [("kind", pa.int8()), ("user_id", ut), ("item_id", it), ("_part", i64), ("_ipart", i64),
                             *[(c, i64) for c in _STAT_COLUMNS[1:]]])

    with D._worker_errors():
        graph = train_ds.map_batches(dislikes, batch_format="pyarrow") \
            .groupby("_ipart", num_partitions=n_parts).map_groups(graph_part, batch_format="pyarrow").materialize()
        stats_ds = graph.map_batches(lambda t: t.filter(pc.equal(t["kind"], 1)).select(_STAT_COLUMNS),
                                     batch_format="pyarrow").materialize()

    def gather_items(ds):
        stats = ds.to_pandas()
        if "item_id" not in stats.columns:  # no dislike at all: no block came out of the shuffle
            stats = pd.DataFrame({"item_id": np.zeros(0, object), **{c: np.zeros(0, np.int64) for c in _STAT_COLUMNS[1:]}})
        (graph_items, n_dislikers), counts = item_state(stats, cap)
        return graph_items, n_dislikers, counts

    # per-item state, kept in the object store: the sorted graph items (read by the user partitions
    # and the result), their N_i (read by the scoring partitions), the counts (the result)
    items_ref, n_dis_ref, counts_ref = D.call_on_worker(gather_items, stats_ds, keep=True, num_returns=3)
    thresholds = opts["thresholds"]

    def rows_part(tbl):  # one user partition's rows, to the item partitions of their items
        ut = tbl.schema.field("user_id").type
        graph_items = ray.get(items_ref)
        return _arrow(user_rows(tbl.to_pandas(), graph_items),
                      [("_k", i64), ("user_id", ut), ("item", i64), ("ipart", i64)])

    def matrix_part(tbl):
        k = int(tbl["_k"][0].as_py())
        matrix, covered = item_part_matrix(tbl.to_pandas(), k, thresholds)
        return _payload_table("_k", k, matrix, n_items=len(matrix[2]), covered=covered)

    with D._worker_errors():
        matrices = graph.map_batches(lambda t: t.filter(pc.equal(t["kind"], 0)).select(_EDGE_COLUMNS),
                                     batch_format="pyarrow") \
            .groupby("_part", num_partitions=n_parts).map_groups(rows_part, batch_format="pyarrow") \
            .groupby("_k", num_partitions=n_parts).map_groups(matrix_part, batch_format="pyarrow").materialize()
        del graph
        cov = matrices.select_columns(["n_items", "covered"]).take_all()  # n_parts rows of counts
    coverage, mcd = coverage_and_threshold([r["covered"] for r in cov], sum(int(r["n_items"]) for r in cov), opts)
    params = swing_params(opts, mcd)

    def score_part(tbl):
        n_dis = ray.get(n_dis_ref)
        out = []
        for blob in tbl["payload"].to_pylist():
            d = item_part_scores(pickle.loads(blob), params, n_dis)
            out.append(_arrow(d.assign(_spart=d["item_id"].to_numpy() % n_parts),
                              [("item_id", i64), ("neighbor_id", i64), ("score", pa.float64()), ("_spart", i64)]))
        return pa.concat_tables(out) if out else _arrow(_directed_frame().assign(_spart=np.zeros(0, np.int64)), [
            ("item_id", i64), ("neighbor_id", i64), ("score", pa.float64()), ("_spart", i64)])

    def top_group(tbl):
        k = int(tbl["_spart"][0].as_py())
        return _payload_table("_spart", k, top_part(tbl.select(["item_id", "neighbor_id", "score"]).to_pandas(), opts))

    with D._worker_errors():
        tops = matrices.map_batches(score_part, batch_size=1, batch_format="pyarrow") \
            .groupby("_spart", num_partitions=n_parts).map_groups(top_group, batch_format="pyarrow").materialize()
        del matrices

    def result(ds, items, counts):
        res = finish([pickle.loads(r["payload"]) for r in ds.iter_rows()], items, counts, coverage, mcd, opts)
        return res, res.brief()

    ref, brief = D.call_on_worker(result, tops, items_ref, counts_ref, keep=True, num_returns=2)
    return OnCluster(ref, D.fetch(brief), None)
