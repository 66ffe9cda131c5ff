"""The partitioned SVD (data_prep/partitioned_svd.py): the same bits for any split of the users, and
the factors of an exact SVD."""

import numpy as np
import pandas as pd
import pytest

from conrec_verl.data_prep import partitioned_svd as PS
from conrec_verl.data_prep.distributed import stable_partition
from conrec_verl.data_prep.embeddings import collaborative, svd_solver
from conrec_verl.data_prep.errors import DataPrepError
from conrec_verl.data_prep.train_codes import TrainCodes


def signed_log(seed=0, n_users=400, n_items=120, n_events=6000):
    """Events of whole users in the log's order, popularity-skewed, with repeats and weights."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n_events)
    i = rng.zipf(1.4, n_events) % n_items
    v = np.where(rng.random(n_events) < 0.7, 1.0, -1.0) * rng.choice([1.0, 0.5, 2.25], n_events)
    order = np.argsort(u, kind="stable")
    return np.array([f"user-{x}" for x in u[order]], dtype=object), i[order], v[order], n_items


def dense(users, items, vals, n_items):
    codes, _ = pd.factorize(users, sort=True)
    X = np.zeros((n_items, codes.max() + 1))
    np.add.at(X, (items, codes), vals)
    return X


def blocks_of(users, items, vals, n_items, n_parts):
    part = stable_partition(users, n_parts)
    return [PS.UserBlock.from_events(users[part == k], items[part == k], vals[part == k], n_items)
            for k in range(n_parts) if (part == k).any()]


@pytest.mark.parametrize("n_iter", [0, 3])
def test_factors_are_the_same_bits_for_any_split_of_the_users(n_iter):
    users, items, vals, n = signed_log()
    whole = PS.svd_in_process(blocks_of(users, items, vals, n, 1), n, 16, n_iter, seed=3)
    empty = PS.UserBlock.from_events(np.array([], object), [], [], n)  # a partition with no training event
    for n_parts in (2, 5, 13):
        blocks = blocks_of(users, items, vals, n, n_parts) + [empty]
        for order in (blocks, blocks[::-1]):  # the shares' order does not matter either
            got = PS.svd_in_process(order, n, 16, n_iter, seed=3)
            assert np.array_equal(got.vectors, whole.vectors), n_parts
            assert got.report == whole.report
    other_seed = PS.svd_in_process(blocks_of(users, items, vals, n, 1), n, 16, n_iter, seed=4)
    assert not np.array_equal(other_seed.vectors, whole.vectors)  # the seed is used


def test_factors_match_an_exact_svd():
    users, items, vals, n = signed_log(seed=1)
    X = dense(users, items, vals, n)
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    k = 12
    got = PS.svd_in_process(blocks_of(users, items, vals, n, 4), n, k, 5, seed=0)
    assert got.vectors.shape == (n, k)
    sigma = np.linalg.norm(got.vectors, axis=0)
    # a randomized SVD (as scikit-learn's, 5 power steps): the leading components to ~1e-6, the last
    # ones (a flat tail of this spectrum) to ~1e-3 (scikit-learn's are off by 1e-4 there too)
    np.testing.assert_allclose(sigma[:9], s[:9], rtol=1e-5)
    np.testing.assert_allclose(sigma, s[:k], rtol=1e-3)
    # each column is the exact left singular vector times its singular value, up to sign
    exact = U[:, :k] * s[:k]
    cos = np.abs((got.vectors * exact).sum(axis=0)) / (sigma * s[:k])
    assert cos[:9].min() > 1 - 1e-5
    # signs: the largest entry of each column is positive
    assert (got.vectors[np.abs(got.vectors).argmax(axis=0), np.arange(k)] > 0).all()
    # scikit-learn's explained variance ratio: var of the factors over the total variance of X's columns
    total = np.var(X, axis=0).sum()
    assert got.report["collab_explained_variance"] == pytest.approx(np.var(got.vectors, axis=0).sum() / total, abs=2e-10)
    assert got.report["collab_explained_variance"] == pytest.approx(np.var(exact, axis=0).sum() / total, rel=1e-4)


def test_repeats_of_a_user_item_are_summed_in_the_log_order_and_a_users_row_stays_whole():
    block = PS.UserBlock.from_events(np.array(["b", "a", "b", "a"], object), [2, 0, 2, 1], [1.0, -1.0, 0.5, 2.0], 3)
    assert block.A.toarray().tolist() == [[-1.0, 2.0, 0.0], [0.0, 0.0, 1.5]]
    assert np.array_equal(block.keys, PS.user_keys(["a", "b"]))
    st = block.stats()
    assert (st["n_users"], st["nnz"], st["max_abs"], st["item_users"].tolist()) == (2, 3, 2.0, [1, 1, 1])


def test_sketch_rows_follow_the_user_and_seed_only():
    keys = PS.user_keys(["u1", "u2", "u3"])
    W = PS.rademacher(keys, 7, 40)
    assert set(np.unique(W)) == {-1.0, 1.0}
    assert np.array_equal(PS.rademacher(keys[[2, 0]], 7, 40), W[[2, 0]])  # a row does not depend on its block
    assert not np.array_equal(PS.rademacher(keys, 8, 40), W)
    big = PS.rademacher(PS.user_keys([f"u{i}" for i in range(4000)]), 0, 64)
    assert abs(big.mean()) < 0.01 and abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.05


@pytest.mark.parametrize("case", ["one hot item", "rank one", "random"])
def test_every_pass_uses_the_fixed_point_range_without_overflowing(case):
    """The bounds of plan/advance on inputs that come close to them: each pass's largest integer
    total stays below 2^62 (no wrap) and above 2^40 (the scale is not wasted)."""
    rng = np.random.default_rng(5)
    if case == "one hot item":  # every user on item 0 with the largest value: the sketch's bound is met
        users = np.repeat(np.array([f"u{k:04d}" for k in range(3000)], object), 2)
        items = np.tile([0, 1], 3000) * rng.integers(1, 50, 6000)
        vals = np.where(items == 0, -7.5, rng.normal(size=6000))
    elif case == "rank one":  # a constant matrix: the power step's Cauchy-Schwarz bound is tight
        users = np.repeat(np.array([f"u{k:03d}" for k in range(300)], object), 40)
        items, vals = np.tile(np.arange(40), 300), np.full(12000, 3.0)
    else:
        users, items, vals, _ = signed_log(seed=9)
    n = int(items.max()) + 1
    blocks = blocks_of(users, items, vals, n, 3) + [PS.UserBlock.from_events(np.array([], object), [], [], n)]
    state = PS.plan(PS.merge_stats(b.stats() for b in blocks), n, 8, 3, seed=0)
    seen = []
    while state.next_pass:
        total = PS.add_shares((b.product(state) for b in blocks), n)
        seen.append((state.next_pass, max(float(np.abs(t).max()) for t in total)))
        state = PS.advance(state, total)
    assert [p for p, _ in seen] == ["sketch", "power", "power", "power", "gram"]
    for name, top in seen:
        assert 2.0 ** 40 < top < 2.0 ** 62, (name, np.log2(top))
    assert np.isfinite(state.vectors).all()


def test_an_infinite_value_is_refused_not_wrapped():
    users, items, vals, n = signed_log()
    vals = vals.copy()
    vals[7] = np.inf
    with pytest.raises(DataPrepError, match="non-finite"):
        PS.svd_in_process(blocks_of(users, items, vals, n, 2), n, 8, 1, seed=0)


def test_fixed_point_sums_stay_within_their_bound_and_resolution():
    rng = np.random.default_rng(0)
    terms = rng.normal(size=(5000, 3)) * 1e3
    bound = np.abs(terms).sum(axis=0).max()
    s = PS.scale_for(bound)
    assert bound * 2.0 ** s < 2.0 ** 62 <= bound * 2.0 ** (s + 1)
    total = PS._fixed(terms, s).sum(axis=0)  # int64: exact
    np.testing.assert_allclose(PS._to_float(total, s), terms.sum(axis=0), rtol=0, atol=len(terms) * 2.0 ** -s)
    rows = PS._fixed(terms, s)  # the reducer's conversion in the sum's own memory: the same floats
    assert np.array_equal(PS._to_float_in_place(rows.copy(), s), PS._to_float(rows, s))
    assert PS.scale_for(0.0) == 0


def test_too_small_a_matrix_and_bad_settings_are_refused_by_name():
    users, items, vals, n = signed_log(n_users=1, n_items=5, n_events=10)
    with pytest.raises(DataPrepError, match="embedding.method=collab"):
        PS.svd_in_process(blocks_of(users, items, vals, n, 1), n, 8, 2, seed=0)
    users, items, vals, n = signed_log()
    with pytest.raises(DataPrepError, match="embedding.svd_iters"):
        PS.svd_in_process(blocks_of(users, items, vals, n, 1), n, 8, -1, seed=0)
    with pytest.raises(DataPrepError, match="embedding.svd must be one of"):
        svd_solver({"svd": "lapack"}, False)
    with pytest.raises(DataPrepError, match="embedding.svd=partitioned"):
        svd_solver({"svd": "sklearn"}, True)
    assert svd_solver({}, True) == "partitioned" and svd_solver({}, False) == "sklearn"
    assert svd_solver({"svd": "sklearn", "method": "content"}, True) == "sklearn"  # no SVD of events then


def test_both_solvers_give_the_same_embedding_space_on_training_codes():
    users, items, vals, n = signed_log(seed=2)
    frame = pd.DataFrame({"user_id": users, "item_id": [f"i{x:03d}" for x in items], "ts": np.arange(len(users)),
                          "polarity": np.where(vals > 0, 1, -1).astype(np.int8),
                          "weight": np.abs(vals).astype(np.float32)})
    codes = TrainCodes.from_frame(frame)
    ids_a, a, rep_a = collaborative(codes, 8, 1.0, 1.0, 0, "sklearn")
    ids_b, b, rep_b = collaborative(codes, 8, 1.0, 1.0, 0, "partitioned", 5)
    assert ids_a.tolist() == ids_b.tolist() and a.shape == b.shape and b.dtype == np.float32
    assert rep_b["svd"] == "partitioned"
    assert rep_a["collab_explained_variance"] == pytest.approx(rep_b["collab_explained_variance"], rel=1e-3)
    # the leading singular directions agree (up to sign)
    na, nb = a / np.linalg.norm(a, axis=0), b / np.linalg.norm(b, axis=0)
    assert np.abs((na * nb).sum(axis=0))[:4].min() > 0.999


@pytest.mark.parametrize("n_parts", [1, 4])
def test_on_ray_the_factors_equal_the_local_engines(local_ray, n_parts):
    """distributed.collab_factors_ray (blocks in the object store, actors adding the shares, a task
    reducing them between passes) gives the local engine's partitioned factors bit for bit; a user
    partition with no event takes part too."""
    import ray.data

    from conrec_verl.data_prep import distributed as D

    users, items, vals, n = signed_log(seed=4)
    frame = pd.DataFrame({"user_id": users, "item_id": [f"i{x:03d}" for x in items], "ts": np.arange(len(users)),
                          "day": 0, "polarity": np.where(vals > 0, 1, -1).astype(np.int8),
                          "weight": np.abs(vals).astype(np.float32), "_file": 0, "_row": np.arange(len(users))})
    frame["_part"] = D.stable_partition(users, n_parts)
    groups = [g.sample(frac=1.0, random_state=k) for k, (_, g) in enumerate(frame.groupby("_part"))]
    groups.append(frame.iloc[:0].assign(_part=n_parts))  # an empty partition
    ecfg = {"method": "collab", "dim": 8, "svd_iters": 2, "like_weight": 1.0, "dislike_weight": 1.0}
    warm = ray.put(set(frame["item_id"]))
    got = ray.get(D.collab_factors_ray(ray.data.from_pandas(groups).materialize(), warm, ecfg, seed=11))
    ids, want, report = collaborative(TrainCodes.from_frame(frame), 8, 1.0, 1.0, 11, "partitioned", 2)
    assert got.items.tolist() == ids.tolist()
    assert np.array_equal(got.vectors, want) and got.stats == report
    content = ray.get(D.collab_factors_ray(ray.data.from_pandas(groups).materialize(), warm,
                                           dict(ecfg, method="content"), seed=11))
    assert content.vectors is None and content.items.tolist() == ids.tolist()  # other methods: the warm items
