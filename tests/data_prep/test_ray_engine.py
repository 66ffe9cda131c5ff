"""``engine=ray``: the same data folder as ``engine=local``, built on a local Ray cluster.

The pure pieces the Ray path relies on (user-partitioned samples, item-partitioned Swing) are
checked without Ray; the end-to-end tests start real Ray clusters (a two-node
``ray.cluster_utils.Cluster`` reached through ``ray.address``, and the local Ray the engine starts
itself) and compare every output file byte for byte.
"""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conrec_verl.core.swing import SwingParams, dislike_matrix, swing_pair_scores
from conrec_verl.data_prep import DataPrepError, build
from conrec_verl.data_prep import samples as S
from conrec_verl.data_prep.distributed import compare_data_folders, stable_partition
from dp_helpers import generic_cfg, ms, synth_log

RAY_OPTS = ("progress=false",)


def compare_folders(a: Path, b: Path) -> None:
    assert compare_data_folders(a, b) == []
    # the comparison itself sees a one-byte change and a manifest change
    shutil.copytree(b, b.parent / "changed")
    target = b.parent / "changed" / "swing.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    m = json.loads((b.parent / "changed" / "manifest.json").read_text())
    m["counts"]["users"] += 1
    (b.parent / "changed" / "manifest.json").write_text(json.dumps(m))
    assert compare_data_folders(a, b.parent / "changed") == ["manifest.json", "swing.parquet"]
    shutil.rmtree(b.parent / "changed")


def test_stable_partition_is_fixed_and_in_range():
    labels = np.array([f"u{i}" for i in range(500)], dtype=object)
    p = stable_partition(labels, 7)
    assert p.min() >= 0 and p.max() < 7 and len(np.unique(p)) == 7
    assert np.array_equal(p, stable_partition(labels[::-1], 7)[::-1])  # a function of the label only
    assert np.array_equal(stable_partition(labels, 7), p)


def test_swing_scores_bit_identical_over_item_partitions_and_blocks():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 300, 6000)
    items = rng.zipf(1.4, 6000) % 120
    R, _, _ = dislike_matrix(users, items)
    params = SwingParams(min_co_dislikers=2)
    I0, J0, S0 = swing_pair_scores(R, params)
    assert len(I0) > 100 and np.all(I0 < J0)
    for block in (1, 17):
        I, J, S = swing_pair_scores(R, params, block=block)
        assert np.array_equal(I, I0) and np.array_equal(J, J0) and np.array_equal(S, S0)
    parts = [swing_pair_scores(R, params, block=23, items=np.flatnonzero(np.arange(R.shape[1]) % 4 == k))
             for k in range(4)]
    I = np.concatenate([p[0] for p in parts])
    J = np.concatenate([p[1] for p in parts])
    Sv = np.concatenate([p[2] for p in parts])
    order = np.lexsort((J, I))
    assert np.array_equal(I[order], I0) and np.array_equal(J[order], J0)
    assert np.array_equal(Sv[order], S0)  # bit for bit, not approximately


def test_samples_of_user_partitions_union_to_the_whole(tmp_path):
    """build_samples over disjoint user subsets (shared item tables) = build_samples over everybody."""
    log = synth_log(seed=1, n_users=30)
    inter = pd.DataFrame({"user_id": log.user_id.astype(str), "item_id": log.item_id.astype(str),
                          "ts": log.timestamp.astype(np.int64),
                          "day": pd.to_datetime(log.timestamp, unit="ms").dt.strftime("%Y%m%d").astype(np.int64),
                          "polarity": np.where(log.label == 0, -1, 1).astype(np.int8)})
    inter = inter.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    plan = S.plan_split(inter, {"eval_cutoff_day": 20240110, "num_train_cutoffs": 3})
    items = sorted(inter.item_id.unique())
    sid_of = {it: f"<a_{k % 4}><b_{k // 4 % 4}><c_{k // 16}>" for k, it in enumerate(items)}
    neighbors = {items[0]: [items[1], items[2]], items[3]: [items[0]]}
    counts = inter[inter.polarity < 0].groupby("item_id").size().to_dict()
    ctx = S.SampleContext(inter, plan, sid_of, neighbors, counts, "b0", 0, {})
    full_tr, full_te, full_counts = S.build_samples(ctx, progress=False)
    assert len(full_tr) and len(full_te)
    lookup = S.item_lookup(ctx)
    part = stable_partition(inter.user_id.to_numpy(), 3)
    trs, tes = [], []
    for k in range(3):
        m = part == k
        sub = S.SampleContext(inter[m].reset_index(drop=True), replace(plan, key=plan.key[m]),
                              {}, {}, {}, "b0", 0, {})
        tr, te, _ = S.build_samples(sub, lookup, progress=False)
        trs.append(tr)
        tes.append(te)
    for full, pieces in ((full_tr, trs), (full_te, tes)):
        got = pd.concat([p for p in pieces if len(p)], ignore_index=True).sort_values("user_id", kind="stable")
        pd.testing.assert_frame_equal(got.reset_index(drop=True), full.reset_index(drop=True))


def _synth_inter(seed: int = 1, n_users: int = 30) -> pd.DataFrame:
    log = synth_log(seed=seed, n_users=n_users)
    inter = pd.DataFrame({"user_id": log.user_id.astype(str), "item_id": log.item_id.astype(str),
                          "ts": log.timestamp.astype(np.int64),
                          "day": pd.to_datetime(log.timestamp, unit="ms").dt.strftime("%Y%m%d").astype(np.int64),
                          "polarity": np.where(log.label == 0, -1, 1).astype(np.int8)})
    return inter.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("mode", ["global_day", "per_user"])
@pytest.mark.parametrize("cutoffs", [False, True])
def test_row_sets_of_user_partitions_merge_into_the_local_files(tmp_path, monkeypatch, mode, cutoffs):
    """The RL / evaluation rows (and the cutoffs warm-up rows) of disjoint user partitions, each
    written as shards by "its worker" and merged by key, are the local engine's files byte for byte:
    rl/train in (stage, cutoff, user) order, each stage's slice keeping its numbers, the candidate
    sets drawn per user, and the same counts."""
    from conrec_verl.data_prep import shards as SH
    from conrec_verl.data_prep import steps as T

    monkeypatch.setattr(SH, "ROW_GROUP_ROWS", 7)  # merges cross many row groups
    inter = _synth_inter(n_users=60)
    scfg = ({"eval_cutoff_day": 20240112, "num_train_cutoffs": 4, "window_days": 3} if mode == "global_day" else
            {"mode": "per_user", "train_fractions": [0.3, 0.45], "window_days": 3, "train_windows": "truncated"})
    plan = S.plan_split(inter, scfg)
    items = np.asarray(sorted(inter.item_id.unique()), dtype=object)
    sid_of = {it: f"<a_{k % 4}><b_{k // 4 % 4}><c_{k // 16}>" for k, it in enumerate(items[:-3])}  # 3 cold
    ctx = S.SampleContext(inter, plan, sid_of, {items[0]: [items[1]]}, {}, "b0", 0, {})
    lookup = S.item_lookup(ctx, items)
    pools = S.CandidatePools.from_pairs(sid_of, S.day_item_pairs(inter, sid_of))
    args = (sid_of, pools, "b0", 7, {"n_candidates": 6, "val_user_fraction": 0.2}, {"contexts": [1, 2, 3]}, cutoffs)
    whole = T.user_row_sets(inter, plan, lookup, *args)
    stages = sorted(n for n in whole.records if n.startswith("rl/train_context"))
    assert len(stages) >= 2 and len(whole.records["rl/val"]) and len(whole.records["eval/test"]) > 20
    assert all(len(r["candidates"]) == 6 for r in whole.records["eval/test"] if r["candidate_target"] >= 0)
    assert ("sft/warmup" in whole.records) == cutoffs
    local_counts = T.write_rl_files(whole.records, tmp_path / "local")
    assert local_counts["rl/train"] == sum(local_counts[n] for n in stages)
    staging = tmp_path / "build" / "_shards"
    staging.parent.mkdir()
    part = stable_partition(inter.user_id.to_numpy(), 3)
    sets: dict = {}
    sums: dict = {}
    for k in range(3):
        m = part == k
        sub = T.user_row_sets(inter[m].reset_index(drop=True), replace(plan, key=plan.key[m]), lookup, *args)
        for name, recs in sub.records.items():
            shard = staging / name.replace("/", "-") / f"part-{k:05d}.parquet"
            sets.setdefault(name, SH.ShardedRows(T.rl_set_schema(name))).add(
                *SH.write_shard(recs, T.rl_set_schema(name), shard, sub.keys[name]))
        sums = T.add_stat_sums(sums, sub.stats)
    assert all(len(sets[n].shards) > 1 for n in stages)
    assert T.write_rl_files(sets, tmp_path / "ray") == local_counts
    files = [f"{n}.parquet" for n in ["rl/train", *stages, "rl/val", "eval/test"]]
    for f in files:
        assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f
    train = pd.read_parquet(tmp_path / "local" / "rl" / "train.parquet")
    assert train["extra_info"].map(lambda e: e["index"]).tolist() == list(range(len(train)))
    last = pd.read_parquet(tmp_path / "local" / f"{stages[-1]}.parquet")
    assert last["extra_info"].map(lambda e: e["index"]).iloc[0] == len(train) - len(last)
    assert T.finish_sample_stats(sums) == T.finish_sample_stats(whole.stats)
    if cutoffs:
        for name in ("sft/warmup", "sft/warmup_val"):
            SH.write_rows(whole.records[name], T.rl_set_schema(name), tmp_path / "local" / f"{name}.parquet")
            SH.write_rows(sets[name], T.rl_set_schema(name), tmp_path / "ray" / f"{name}.parquet")
            assert ((tmp_path / "ray" / f"{name}.parquet").read_bytes()
                    == (tmp_path / "local" / f"{name}.parquet").read_bytes())


def test_a_users_candidate_set_does_not_depend_on_the_other_users():
    """Each test row draws from a generator seeded by the build's seed and its user: the same set
    whichever users are drawn with it and in which order; another seed gives another set."""
    inter = _synth_inter(seed=4, n_users=40)
    plan = S.plan_split(inter, {"eval_cutoff_day": 20240112, "num_train_cutoffs": 2})
    items = np.asarray(sorted(inter.item_id.unique()), dtype=object)
    sid_of = {it: f"<a_{k}>" for k, it in enumerate(items)}
    ctx = S.SampleContext(inter, plan, sid_of, {}, {}, "b0", 0, {})
    _, te, _ = S.build_samples(ctx, S.item_lookup(ctx, items), progress=False)
    te = te[te["future_neg_items"].map(len) > 0].reset_index(drop=True)
    pools = S.CandidatePools.from_pairs(sid_of, S.day_item_pairs(inter, sid_of))
    own = S.user_day_likes(inter, sid_of, S.candidate_wanted(te))
    whole, targets, _ = S.candidate_sets(te, sid_of, 3, 8, pools, own)
    assert len(whole) > 10 and all(len(c) == 8 for c in whole)
    rev = te.iloc[::-1].reset_index(drop=True)
    alone = [S.candidate_sets(rev.iloc[[i]], sid_of, 3, 8, pools, own) for i in range(0, len(rev), 3)]
    for i, (c, t, _) in zip(range(0, len(rev), 3), alone):
        j = len(te) - 1 - i
        assert (c[0], t[0]) == (whole[j], targets[j])
    other, _, _ = S.candidate_sets(te, sid_of, 4, 8, pools, own)
    assert other != whole


@pytest.fixture(scope="module")
def two_node_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def sharded_synth_log(folder: Path) -> Path:
    """A synthetic log in three shards (parquet, CSV, parquet in a sub-folder) with neutral labels
    and identical events repeated across shards with other weights."""
    log = synth_log(seed=2, n_users=80, n_items=90).assign(w=1.0)
    log.loc[log.index % 29 == 0, "label"] = 2  # neutral: dropped and counted
    repeats = log.iloc[::37].assign(w=5.0)
    log = pd.concat([log, repeats], ignore_index=True).sample(frac=1.0, random_state=0).reset_index(drop=True)
    folder.mkdir()
    n = len(log)
    log.iloc[: n // 3].to_parquet(folder / "part-0.parquet", index=False)
    log.iloc[n // 3: 2 * n // 3].to_csv(folder / "part-1.csv", index=False)
    (folder / "b").mkdir()
    log.iloc[2 * n // 3:].to_parquet(folder / "b" / "part-2.parquet", index=False)
    return folder


SHARD_OPTS = ("input.columns.weight=w", "input.polarity.other_labels=drop", "input.duplicates=drop")


def test_ray_engine_on_a_two_node_cluster_equals_local(tmp_path, two_node_cluster, monkeypatch):
    """A log in shards, read on the cluster's workers, gives the local engine's folder; the driver
    never holds the log's events or its training events."""
    import ray

    from conrec_verl.data_prep import steps as T

    seen = []
    real = T.rl_samples

    def rl_samples(log, split, *a, **kw):
        seen.append((log.parts is not None, log.interactions is None, split.train is None))
        return real(log, split, *a, **kw)

    monkeypatch.setattr(T, "rl_samples", rl_samples)
    real_write = T.write_folder
    warmups, row_sets, held = [], [], []

    def write_folder(folder, cfg, seed, log, split, sids, swing, samples, sft, **kw):
        # what the driver holds when the folder is written: with Ray, references to the per-item and
        # per-user state and to the rows' shards, all kept on the cluster (read here by the test only)
        refs = [split.plan, split.all_items, split.warm, samples.sets, sft.alignment, sft.warmup, sft.warmup_val]
        held.append((isinstance(sids, T.OnCluster), isinstance(swing, T.OnCluster),
                     sum(isinstance(r, ray.ObjectRef) for r in refs), kw.get("on_worker", False)))
        if isinstance(sids, T.OnCluster):
            assert sids.brief.sid_of is None and sids.brief.table is None and swing.brief.frame is None
        warmup, warmup_val, sets = (ray.get(r) if isinstance(r, ray.ObjectRef) else r
                                    for r in (sft.warmup, sft.warmup_val, samples.sets))
        warmups.append((type(warmup).__name__, len(getattr(warmup, "shards", [])), len(warmup), len(warmup_val)))
        row_sets.append({name: type(rows).__name__ for name, rows in sets.items()})
        return real_write(folder, cfg, seed, log, split, sids, swing, samples, sft, **kw)

    monkeypatch.setattr(T, "write_folder", write_folder)
    shards = sharded_synth_log(tmp_path / "shards")
    # an item table with titles (read on the driver, checked against the log's ids fetched from the
    # cluster; its translation rows made on a worker), one id the log lacks (dropped)
    ids = sorted(set(pd.read_csv(shards / "part-1.csv").item_id.astype(str)))
    pd.DataFrame({"item_id": ids + ["not-in-log"], "title": [f"film {i}" for i in ids] + ["x"]}).to_csv(
        tmp_path / "items.csv", index=False)
    # the local engine with the solver that engine=ray runs on the partitions (its "auto" there)
    extra = ("swing.min_co_dislikers=2", "swing.max_dislikers_per_item=6", "embedding.svd=partitioned", *SHARD_OPTS,
             f"input.items.path={tmp_path / 'items.csv'}", "input.items.columns.title=title")
    local = build(generic_cfg(shards, tmp_path / "local", *extra))
    remote = build(generic_cfg(shards, tmp_path / "ray", *extra, "engine=ray",
                               f"ray.address={two_node_cluster.address}", "ray.partitions=5", *RAY_OPTS))
    assert seen == [(False, False, False), (True, True, True)]
    assert held == [(False, False, 0, False), (True, True, 7, True)]
    # the warm-up rows: records on the local driver; with Ray only shards the workers wrote (one per
    # partition with rows), merged into the same file by a task on the cluster when the folder is written
    (kind_l, _, n_l, nv_l), (kind_r, n_shards, n_r, nv_r) = warmups
    assert (kind_l, kind_r) == ("list", "ShardedRows") and n_shards > 1 and n_l == n_r > 0 and nv_l == nv_r > 0
    # the RL and evaluation rows likewise: records locally, worker shards with Ray
    local_sets, ray_sets = row_sets
    assert set(local_sets) == set(ray_sets) >= {"rl/train_context1", "rl/val", "eval/test"}
    assert set(local_sets.values()) == {"list"} and set(ray_sets.values()) == {"ShardedRows"}
    assert not (remote / "_shards").exists()
    assert not ray.is_initialized()  # the engine disconnects what it connected
    assert len(pd.read_parquet(local / "swing.parquet")) > 0
    assert len(pd.read_parquet(local / "sft" / "translation.parquet")) == 2 * len(ids)
    assert len(pd.read_parquet(local / "rl" / "train.parquet")) > 0
    stats = json.loads((local / "manifest.json").read_text())["input_stats"]
    assert stats["input_files"] == 3 and stats["neutral_dropped"] > 0 and stats["duplicate_events"] > 0
    compare_folders(local, remote)
    assert json.loads((remote / "manifest.json").read_text())["config"]["engine"] == "ray"


@pytest.mark.parametrize("also_bad_first", [False, True])
def test_ray_engine_names_a_bad_row_of_a_shard_as_the_local_engine_does(tmp_path, two_node_cluster, also_bad_first):
    """One bad shard, or two (then both engines name the first in file order, b/part-2.parquet)."""
    shards = sharded_synth_log(tmp_path / "shards")
    bad = pd.read_csv(shards / "part-1.csv").astype({"item_id": object})
    bad.loc[4, "item_id"] = "   "
    bad.to_csv(shards / "part-1.csv", index=False)
    if also_bad_first:
        first = pd.read_parquet(shards / "b" / "part-2.parquet").astype({"timestamp": str})
        first.loc[7, "timestamp"] = "soon"
        first.to_parquet(shards / "b" / "part-2.parquet", index=False)
    errors = []
    for engine in (("engine=local",), ("engine=ray", f"ray.address={two_node_cluster.address}", *RAY_OPTS)):
        with pytest.raises(DataPrepError) as err:
            build(generic_cfg(shards, tmp_path / "out", *SHARD_OPTS, *engine))
        errors.append((str(err.value), err.value.file, err.value.column, err.value.row))
    assert errors[0] == errors[1]
    expected = ((str(shards / "b" / "part-2.parquet"), "timestamp", 8) if also_bad_first
                else (str(shards / "part-1.csv"), "item_id", 5))
    assert errors[0][1:] == expected
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["shards"]


def test_ray_engine_on_a_movielens_folder_sends_the_driver_read_log_to_the_cluster(tmp_path, two_node_cluster):
    """MovieLens is read on the driver (two known files), so its samples step ships the driver's
    table to the partitions: the other route into build_samples_ray, same folder as local."""
    from conrec_verl.data_prep import load_config
    from dp_helpers import write_movielens

    write_movielens(tmp_path / "ml", n_users=40)

    def cfg(out, *extra):
        # warm-up targets drawn in each anchor's window (ms keys here) and half the likes asked too:
        # the same draws on the workers
        return load_config("movielens", [f"input.path={tmp_path / 'ml'}", f"out_dir={out}", "sid.sizes=[4,4,4]",
                                         "embedding.dim=8", "progress=false", "print_summary=false",
                                         "sft.warmup.targets=window", "sft.warmup.likes=0.5", *extra])

    local = build(cfg(tmp_path / "local"))
    remote = build(cfg(tmp_path / "ray", "engine=ray", f"ray.address={two_node_cluster.address}",
                       "ray.partitions=3", *RAY_OPTS))
    assert len(pd.read_parquet(local / "eval" / "test.parquet")) > 0
    tasks = pd.read_parquet(remote / "sft" / "warmup.parquet")["extra_info"].map(lambda e: e["task"])
    assert {"warmup", "warmup_like"} <= set(tasks)  # the workers asked likes too
    assert compare_data_folders(local, remote) == []


# Runs after the cluster tests on purpose: in one process, a build on the two-node cluster after a
# build on a local Ray of its own failed in Swing with Ray's OwnerDiedError (not investigated yet).
def test_ray_engine_per_user_split_with_its_own_local_ray(tmp_path):
    pytest.importorskip("ray")
    rows = []
    for u in range(40):
        for k in range(14):
            rows.append((f"u{u}", f"i{(u * 3 + k) % 25}", ms(1 + k + u % 4), 0 if (k + u) % 3 == 0 else 1))
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"]).to_csv(tmp_path / "log.csv", index=False)
    # the warm-up rows made from the RL rows (sft.warmup.rows=cutoffs): by the workers too
    opts = ("split.mode=per_user", "sid.sizes=[4,8]", "split.train_fractions=[0.4,0.55]", "sft.warmup.rows=cutoffs",
            "embedding.svd=partitioned")
    local = build(generic_cfg(tmp_path / "log.csv", tmp_path / "local", *opts))
    remote = build(generic_cfg(tmp_path / "log.csv", tmp_path / "ray", *opts, "engine=ray", "ray.num_cpus=2",
                               *RAY_OPTS))
    compare_folders(local, remote)


def test_bad_engine_options_fail_before_anything_is_written(tmp_path, synth_path):
    with pytest.raises(DataPrepError, match="engine must be one of local, ray"):
        build(generic_cfg(synth_path, tmp_path / "out", "engine=spark"))
    with pytest.raises(DataPrepError, match="ray.partitions"):
        build(generic_cfg(synth_path, tmp_path / "out", "engine=ray", "ray.partitions=0"))
    with pytest.raises(DataPrepError, match="embedding.svd must be one of"):
        build(generic_cfg(synth_path, tmp_path / "out", "embedding.svd=lapack"))
    # scikit-learn's SVD reads the whole matrix in one process: not where the log is on the cluster
    with pytest.raises(DataPrepError, match="set embedding.svd=partitioned"):
        build(generic_cfg(synth_path, tmp_path / "out", "engine=ray", "embedding.svd=sklearn"))
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]
