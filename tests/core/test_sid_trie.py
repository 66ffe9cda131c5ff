import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conrec_verl.core.sid import format_sid
from conrec_verl.core.sid_trie import SidTrie, SidTrieError


def sid_sets(levels=3, code_max=4):
    # small code ranges force many shared prefixes
    return st.sets(st.tuples(*[st.integers(0, code_max)] * levels), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(sid_sets(), st.randoms(use_true_random=False))
def test_random_walks_only_reach_existing_sids(sids, rnd):
    trie = SidTrie(sids)
    for _ in range(20):
        prefix = ()
        while len(prefix) < trie.num_levels:
            nxt = trie.allowed(prefix)
            assert nxt, f"dead end at {prefix}"
            prefix += (rnd.choice(nxt),)
        assert prefix in sids
        assert trie.allowed(prefix) == ()


@settings(max_examples=200, deadline=None)
@given(sid_sets())
def test_enumeration_is_exactly_the_set_without_duplicates(sids):
    trie = SidTrie(sids)
    listed = list(trie.iter_sids())
    assert len(listed) == len(set(listed)) == len(sids) == len(trie)
    assert set(listed) == sids


@settings(max_examples=200, deadline=None)
@given(sid_sets(), st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)))
def test_allowed_matches_brute_force_per_prefix(sids, probe):
    trie = SidTrie(sids)
    for depth in range(3):
        prefix = probe[:depth]
        expected = sorted({s[depth] for s in sids if s[:depth] == prefix})
        assert list(trie.allowed(prefix)) == expected
        assert trie.is_prefix(prefix) == bool(expected)


def test_not_per_position_sets():
    # per-position sets would allow (1, 4) and (3, 2): the trie must not.
    trie = SidTrie([(1, 2), (3, 4)])
    assert trie.allowed((1,)) == (2,)
    assert trie.allowed((3,)) == (4,)
    assert trie.allowed((2,)) == ()
    assert (1, 4) not in trie and (1, 2) in trie


def test_from_strings_and_errors():
    trie = SidTrie.from_strings([format_sid((1, 2, 3)), format_sid((1, 2, 4))])
    assert trie.allowed((1, 2)) == (3, 4)
    assert trie.level_sizes() == (2, 3, 5)
    with pytest.raises(SidTrieError, match="entry 1"):
        SidTrie.from_strings(["<a_1><b_2>", "<a_1>x"])
    with pytest.raises(SidTrieError, match="levels"):
        SidTrie([(1, 2), (1, 2, 3)])
    with pytest.raises(SidTrieError):
        SidTrie([])


def test_large_trie_holds_every_sid_and_only_those():
    """A realistic size (20k items of a 64^3 codebook): every SID is a leaf, its prefixes allow
    exactly the children that exist. (Speed is measured in benchmarks/bench_constrained_decoding.py.)"""
    rnd = random.Random(0)
    sids = {(rnd.randrange(64), rnd.randrange(64), rnd.randrange(64)) for _ in range(20000)}
    trie = SidTrie(sids)
    assert len(trie) == len(sids) and set(trie.iter_sids()) == sids
    for s in list(sids)[:200]:
        assert list(trie.allowed(s[:2])) == sorted(c for a, b, c in sids if (a, b) == s[:2])
        assert not trie.allowed(s)


@settings(max_examples=200, deadline=None)
@given(sid_sets(), st.data())
def test_without_equals_a_trie_rebuilt_from_the_rest(sids, data):
    trie = SidTrie(sids)
    ordered = sorted(sids)
    drop = set(data.draw(st.lists(st.sampled_from(ordered), max_size=len(ordered) - 1, unique=True)))
    drop |= {(9, 9, 9)}  # not in the trie: ignored
    masked = trie.without(drop)
    rebuilt = SidTrie(sids - drop)
    assert len(masked) == len(rebuilt) and set(masked.iter_sids()) == set(rebuilt.iter_sids())
    for s in ordered:
        for depth in range(trie.num_levels + 1):
            assert masked.allowed(s[:depth]) == rebuilt.allowed(s[:depth])
            assert masked.is_prefix(s[:depth]) == rebuilt.is_prefix(s[:depth])
    assert len(trie) == len(sids)  # the original is untouched
    with pytest.raises(SidTrieError, match="empty trie"):
        trie.without(sids)
