import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conrec_verl.core.neg_filter import NegativeFilter, removal_sweep
from conrec_verl.core.sid import Codebook


def make_book(seed=0, sizes=(4, 4, 4), dim=8):
    rng = np.random.default_rng(seed)
    return Codebook([rng.normal(size=(s, dim)).astype(np.float32) for s in sizes])


def brute(book, preds, cands, threshold):
    keep, removed = [], []
    for i, c in enumerate(cands):
        ce = book.embed(c)
        sims = [float(ce @ book.embed(p) / (np.linalg.norm(ce) * np.linalg.norm(book.embed(p)))) for p in preds]
        (removed if sims and max(sims) >= threshold else keep).append(i)
    return keep, removed


codes = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))


@settings(max_examples=100, deadline=None)
@given(st.lists(codes, max_size=6), st.lists(codes, min_size=1, max_size=12),
       st.floats(-0.5, 0.99), st.integers(0, 3))
def test_kept_removed_match_brute_force(preds, cands, threshold, seed):
    book = make_book(seed)
    f = NegativeFilter(book, threshold)
    kept, removed = f.filter(np.array(preds, dtype=np.int64).reshape(-1, 3), np.array(cands))
    bk, br = brute(book, preds, cands, threshold)
    # tolerate float32 vs float64 rounding exactly at the threshold
    sims = f.max_similarity(np.array(preds, dtype=np.int64).reshape(-1, 3), np.array(cands))
    borderline = set(np.flatnonzero(np.abs(sims - threshold) < 1e-5))
    assert set(kept) - borderline == set(bk) - borderline
    assert set(removed) - borderline == set(br) - borderline


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.lists(codes, max_size=5), st.lists(codes, max_size=8)), min_size=1, max_size=6),
       st.integers(1, 50))
def test_batch_equals_per_user(users, chunk):
    book = make_book(1)
    f = NegativeFilter(book, 0.5)
    preds = [np.array(p, dtype=np.int64).reshape(-1, 3) for p, _ in users]
    cands = [np.array(c, dtype=np.int64).reshape(-1, 3) for _, c in users]
    batch = f.max_similarity_batch(preds, cands, chunk_elements=chunk * 8)
    for p, c, b in zip(preds, cands, batch):
        np.testing.assert_allclose(b, f.max_similarity(p, c), rtol=1e-5, atol=1e-6)


def test_identical_sid_always_removed_and_errors():
    book = make_book()
    f = NegativeFilter(book, 0.999)
    kept, removed = f.filter([(1, 2, 3)], [(1, 2, 3), (0, 0, 0)])
    assert list(removed) == [0]
    with pytest.raises(ValueError, match="threshold"):
        NegativeFilter(book, 1.5)
    with pytest.raises(ValueError, match="shape"):
        f.filter([(1, 2)], [(1, 2, 3)])
    assert f.keep_mask(np.zeros((0, 3), int), [(1, 1, 1)]).all()


def test_removal_sweep_counts():
    sims = [np.array([0.9, 0.2, 0.6]), np.array([0.95])]
    neg = [np.array([True, False, False]), np.array([False])]
    rows = removal_sweep(sims, neg, [0.5, 0.92])
    assert rows[0]["dislikes_removed"] == 1.0
    assert rows[0]["likes_removed"] == pytest.approx(2 / 3)
    assert rows[0]["precision"] == pytest.approx(1 / 3)
    assert rows[1]["dislikes_removed"] == 0.0 and rows[1]["n_likes_removed"] == 1
