"""The training events as codes (data_prep/train_codes.py): what the item embeddings and Swing read.

Claim: Swing and the collaborative embeddings on codes equal the same formulas on the string-id
table they replace, ties included (codes follow the ids' order, and "10" < "9")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conrec_verl.core.swing import SwingParams, cap_dislikers, swing_scores, top_k_neighbors
from conrec_verl.data_prep import steps as T
from conrec_verl.data_prep.embeddings import build_item_embeddings
from conrec_verl.data_prep.train_codes import TrainCodes


def _log(seed: int, n_users: int = 60, n_items: int = 40, n_events: int = 900) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # ids whose string order is not their numeric order ("u10" < "u9"), and items with few users,
    # so that Swing has ties and capped items; weights that do not sum exactly in another order;
    # repeated (user, item) events
    df = pd.DataFrame({"user_id": [f"u{k}" for k in rng.integers(0, n_users, n_events)],
                       "item_id": [str(k) for k in rng.integers(0, n_items, n_events)],
                       "ts": rng.integers(0, 50, n_events).astype(np.int64),
                       "polarity": rng.choice(np.array([-1, 1], dtype=np.int8), n_events, p=[0.6, 0.4]),
                       "weight": rng.uniform(0.1, 3.0, n_events).astype(np.float32)})
    df["day"] = df["ts"] // 10
    df = df.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    return df.astype({"user_id": object, "item_id": object})  # as the readers hand them on


def _swing_on_ids(log: pd.DataFrame, sw: dict) -> pd.DataFrame:
    """Swing's neighbour table computed on the string ids (the formulas, no codes)."""
    neg = log[log["polarity"] < 0]
    users, items = neg["user_id"].to_numpy(), neg["item_id"].to_numpy()
    if sw.get("max_dislikers_per_item"):
        users, items = cap_dislikers(users, items, neg["ts"].to_numpy(), int(sw["max_dislikers_per_item"]))
    scores = swing_scores(users, items, SwingParams(min_co_dislikers=int(sw["min_co_dislikers"])))
    return top_k_neighbors(scores, int(sw["top_k"])).astype({"item_id": str, "neighbor_id": str})


@pytest.mark.parametrize("cap", [None, 6])
def test_swing_on_codes_equals_swing_on_the_ids(cap):
    log = _log(3, n_items=15)
    # eight users who dislike the same three items: each item's two neighbours tie on score, and the
    # ids' string order ("100" < "200" < "30") is not their numeric order
    tie = pd.DataFrame({"user_id": np.repeat([f"t{k}" for k in range(8)], 3), "item_id": ["100", "200", "30"] * 8,
                        "ts": np.int64(1), "polarity": np.int8(-1), "weight": np.float32(1.0), "day": np.int64(0)})
    log = pd.concat([log, tie.astype({"user_id": object, "item_id": object})])
    log = log.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    sw = {"min_co_dislikers": 2, "top_k": 4, "gts_neighbors": 2, "max_dislikers_per_item": cap}
    res = T.swing_neighbours(TrainCodes.from_frame(log), sw)
    expected = _swing_on_ids(log, sw)
    assert len(expected) > 20  # the log has neighbours to compare
    # scores tied within an item, so the neighbour-id tie-break is exercised
    assert expected.duplicated(["item_id", "score"]).any()
    pd.testing.assert_frame_equal(res.frame.reset_index(drop=True), expected.reset_index(drop=True))
    neg = log[log["polarity"] < 0]
    assert res.item_neg_count == neg.groupby("item_id").size().to_dict()
    assert res.stats["dislike_events"] == len(neg)
    if cap:
        distinct = neg.drop_duplicates(["user_id", "item_id"]).groupby("item_id").size()
        assert res.stats["capped_items"] == int((distinct > cap).sum()) > 0
    first = expected.groupby("item_id", sort=False)["neighbor_id"].apply(lambda s: list(s[:2])).to_dict()
    assert res.neighbors == first


def test_collaborative_embeddings_on_codes_equal_the_svd_of_the_id_table():
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    log = _log(4)
    like_w, dislike_w = 1.0, 0.7  # unequal: a swapped sign or weight shows
    cfg = {"method": "collab", "dim": 8, "normalize": False, "like_weight": like_w, "dislike_weight": dislike_w}
    emb = build_item_embeddings(cfg, TrainCodes.from_frame(log), np.asarray(sorted(log["item_id"].unique()),
                                                                            dtype=object), None, seed=0)
    # the same matrix built from the string ids: items x users, +like_w per like, -dislike_w per
    # dislike, x weight, repeated (user, item) events summed in the log's order
    u, _ = pd.factorize(log["user_id"], sort=True)
    i, item_ids = pd.factorize(log["item_id"], sort=True)
    vals = np.where(log["polarity"] > 0, like_w, -dislike_w) * log["weight"].to_numpy(np.float64)
    m = sp.csr_matrix((vals, (i, u)), shape=(len(item_ids), u.max() + 1))
    m.sum_duplicates()
    svd = TruncatedSVD(8, algorithm="randomized", n_iter=5, random_state=0)
    expected = svd.fit_transform(m).astype(np.float32)
    assert list(emb.item_ids) == list(item_ids)
    np.testing.assert_array_equal(emb.vectors, expected)
    assert emb.stats["collab_dim"] == 8
    assert emb.stats["collab_explained_variance"] == round(float(svd.explained_variance_ratio_.sum()), 10)
