"""Swing on a distributed dislike graph (``data_prep/swing_ray.py``) equals ``steps.swing_neighbours``
on the whole table's codes bit for bit: table (values, dtypes, row order), neighbours, stats, dislike
counts. The partitioned steps are checked in one process (pandas groupby for the shuffles) over many
options, then on a local Ray (Ray Data shuffles, the result kept in the object store)."""

import json

import numpy as np
import pandas as pd
import pytest

from conrec_verl.core.swing import (cap_dislikers, choose_min_co_dislikers, dislike_matrix,
                                    item_coverage_at_thresholds)
from conrec_verl.data_prep import steps
from conrec_verl.data_prep import swing_ray as SR
from conrec_verl.data_prep.distributed import stable_partition
from conrec_verl.data_prep.train_codes import TrainCodes
from dp_helpers import synth_log

USER_PARTS = 4


def random_train(seed: int, n_users: int = 60, n_items: int = 40, n: int = 1500) -> pd.DataFrame:
    """Training events with string ids, skewed items, repeated (user, item) dislikes and ties in
    time, in the log's order, with the user partition ``_part`` and ``_file`` / ``_row``."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n)
    i = rng.zipf(1.3, n) % n_items
    ts = rng.integers(0, 50, n).astype(np.int64)
    df = pd.DataFrame({"user_id": [f"u{x}" for x in u], "item_id": [f"i{x}" for x in i], "ts": ts, "day": ts // 10,
                       "polarity": rng.choice(np.array([-1, 1], np.int8), n, p=[0.6, 0.4]),
                       "weight": rng.random(n).astype(np.float32)})
    return with_parts(df.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True))


def synth_train(seed: int = 1) -> pd.DataFrame:
    log = synth_log(seed=seed, n_users=50, n_items=50)
    df = pd.DataFrame({"user_id": log.user_id.astype(str), "item_id": log.item_id.astype(str),
                       "ts": log.timestamp.astype(np.int64), "day": log.timestamp.astype(np.int64) // 86_400_000,
                       "polarity": np.where(log.label == 0, -1, 1).astype(np.int8), "weight": np.float32(1.0)})
    return with_parts(df.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True))


def with_parts(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(_file=np.int32(0), _row=np.arange(len(df), dtype=np.int64),
                     _part=stable_partition(df["user_id"].to_numpy(), USER_PARTS) if len(df) else np.zeros(0, np.int64))


def local(df: pd.DataFrame, sw: dict):
    return steps.swing_neighbours(TrainCodes.from_frame(df), sw)


def assert_same(got, want) -> None:
    pd.testing.assert_frame_equal(got.frame, want.frame, check_exact=True)
    assert got.neighbors == want.neighbors
    assert got.stats == want.stats
    assert json.dumps(got.stats) == json.dumps(want.stats)  # same keys in the same order
    assert list(got.item_neg_count.items()) == list(want.item_neg_count.items())


CONFIGS = {
    "auto": {},
    "cap_auto": {"max_dislikers_per_item": 5},
    "fixed3": {"min_co_dislikers": 3},
    "cap_fixed2_small_k": {"max_dislikers_per_item": 3, "min_co_dislikers": 2, "top_k": 3, "gts_neighbors": 2,
                           "min_score": 0.01},
    "auto_custom": {"max_dislikers_per_item": 8, "auto_candidates": [9, 4, 1], "auto_item_coverage": 0.3,
                    "alpha1": 1.0, "alpha2": 0.5, "theta": 0.7, "top_k": 5, "gts_neighbors": 0},
}


@pytest.mark.parametrize("n_parts", [1, 3, 7])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_partitioned_steps_equal_swing_neighbours(seed, name, n_parts):
    sw = CONFIGS[name]
    df = random_train(seed)
    want = local(df, sw)
    assert len(want.frame) > 0
    got = SR.swing_partitioned(df.sample(frac=1.0, random_state=seed), sw, n_parts)
    assert_same(got, want)


@pytest.mark.parametrize("sw", [{"max_dislikers_per_item": 500}, {"min_co_dislikers": 2, "top_k": 4}])
def test_partitioned_steps_equal_swing_neighbours_on_a_synthetic_log(sw):
    df = synth_train()
    want = local(df, sw)
    assert want.stats["scored_pairs"] > 100
    assert_same(SR.swing_partitioned(df, sw, 5), want)


def test_partitioned_steps_with_nothing_to_score():
    df = random_train(5)
    cases = {
        "no dislike": df.assign(polarity=np.int8(1)),
        "one dislike per user": df.groupby("user_id").head(1).assign(polarity=np.int8(-1)).reset_index(drop=True),
        "no event": df.iloc[:0],
        "one user partition without dislikes": df.assign(polarity=np.where(df["_part"] == 0, 1, df["polarity"])
                                                          .astype(np.int8)),
    }
    for case, d in cases.items():
        for sw in ({}, {"max_dislikers_per_item": 2, "min_co_dislikers": 4}):
            want = local(d, sw)
            assert_same(SR.swing_partitioned(d, sw, 3), want)
    # scored pairs, none above min_score: an empty table with scored_pairs > 0
    want = local(df, {"min_score": 1e9})
    assert want.frame.empty and want.stats["scored_pairs"] > 0
    assert_same(SR.swing_partitioned(df, {"min_score": 1e9}, 3), want)


def test_item_graph_caps_as_cap_dislikers():
    df = random_train(3)
    ev = SR.dislike_events(df, 3)
    for cap in (1, 2, 5):
        edges, stats = SR.item_graph(ev, cap)
        u_codes, users = pd.factorize(ev["user_id"], sort=True)
        i_codes, items = pd.factorize(ev["item_id"], sort=True)
        cu, ci = cap_dislikers(u_codes, i_codes, ev["ts"].to_numpy(), cap)
        want = sorted(zip(users[cu], items[ci]))
        assert sorted(zip(edges["user_id"], edges["item_id"])) == want
        kept = stats.set_index("item_id")["n_kept"]
        assert kept.sum() == len(want) and kept.max() <= cap
        assert stats["n_events"].sum() == len(ev)


def test_coverage_and_threshold_equal_the_whole_matrix():
    df = random_train(4)
    ev = SR.dislike_events(df, 4)
    edges, stats = SR.item_graph(ev, None)
    (items, _), _ = SR.item_state(stats, None)
    R, _, _ = dislike_matrix(edges["user_id"], edges["item_id"])
    for cands, target in (([6, 5, 4, 3, 2], 0.5), ([9, 4, 1], 0.3), ([3], 0.99), ([8, 7], 0.0)):
        opts = SR.swing_options({"auto_candidates": cands, "auto_item_coverage": target})
        rows = SR.user_rows(edges, items)
        covered = [SR.item_part_matrix(g, int(k), opts["thresholds"])[1] for k, g in rows.groupby("_k")]
        coverage, mcd = SR.coverage_and_threshold(covered, len(items), opts)
        assert coverage == item_coverage_at_thresholds(R, opts["thresholds"])
        assert mcd == choose_min_co_dislikers(R, target, cands)


def test_options_fail_before_any_work():
    with pytest.raises(ValueError, match="top_k"):
        SR.swing_options({"top_k": 0})
    with pytest.raises(ValueError, match="alpha2"):
        SR.swing_options({"alpha2": -1})
    with pytest.raises(ValueError, match="min_co_dislikers"):
        SR.swing_options({"min_co_dislikers": 0})


# -- on a local Ray -------------------------------------------------------------------------------

def train_dataset(df: pd.DataFrame, seed: int):
    """What ``distributed.train_events_ray`` gives: the events by user partition, rows shuffled in each."""
    import ray.data

    groups = [g.sample(frac=1.0, random_state=seed) for _, g in df.groupby("_part")]
    return ray.data.from_pandas(groups).materialize()


RAY_CASES = [
    # (config, item partitions, the training table)
    ({"max_dislikers_per_item": 5}, 3, "random"),   # cap, auto threshold
    ({"min_co_dislikers": 3}, 7, "one_part_no_dislike"),  # no cap, fixed threshold, a user partition without dislikes
    ({"max_dislikers_per_item": 2, "min_co_dislikers": 4}, 1, "one_dislike_per_user"),  # no kept pair: empty result
    ({}, 3, "no_dislike"),  # no dislike before the cutoff at all (the log's are all later)
]


@pytest.mark.parametrize("sw, n_parts, table", RAY_CASES, ids=["cap_auto_3", "fixed_7_dry_part", "empty_1", "no_dislike_3"])
def test_swing_ray_equals_swing_neighbours(local_ray, sw, n_parts, table):
    df = random_train(2)
    if table == "one_part_no_dislike":
        df = df.assign(polarity=np.where(df["_part"] == 1, 1, df["polarity"]).astype(np.int8))
    elif table == "one_dislike_per_user":
        df = df.groupby("user_id").head(1).assign(polarity=np.int8(-1)).reset_index(drop=True)
    elif table == "no_dislike":
        df = df.assign(polarity=np.int8(1))
    want = local(df, sw)
    assert want.frame.empty == (table in ("one_dislike_per_user", "no_dislike"))
    out = SR.swing_ray(train_dataset(df, n_parts), sw, n_parts)
    assert isinstance(out, steps.OnCluster) and isinstance(out.ref, local_ray.ObjectRef)
    assert out.brief.frame is None and out.brief.stats == want.stats
    assert_same(local_ray.get(out.ref), want)
