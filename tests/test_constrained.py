import copy
import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from conrec_verl.constrained import (
    ConstrainedDecodingError,
    catalog_log_probs,
    SidTokenMap,
    SidTrieLogitsProcessor,
    constrained_beam_search,
    make_prefix_allowed_tokens_fn,
    score_sids,
)
from conrec_verl.core.sid import SidTokenError
from conrec_verl.core.sid_trie import SidTrie
from conrec_verl.model_builder import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = (4, 4, 4)
PROMPTS = ["Items the user marked not interested: <a_1><b_2><c_3>", "Items the user liked: none", "none"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny_model(tmp_path_factory.mktemp("m") / "model", SIZES, seed=3)
    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)


@pytest.fixture(autouse=True)
def _restore_generation_config(tiny):
    saved = copy.deepcopy(tiny[0].generation_config)
    yield
    tiny[0].generation_config = saved


def hostile(model, tokenizer):
    """A generation_config that would break a search that trusts model defaults."""
    g = model.generation_config
    g.do_sample, g.num_beams, g.temperature, g.top_k = True, 1, 7.0, 2
    g.repetition_penalty, g.no_repeat_ngram_size = 5.0, 1
    g.bad_words_ids = [[tokenizer.convert_tokens_to_ids("<a_0>")]]
    g.max_new_tokens, g.min_new_tokens = 1, 5
    g.length_penalty = 3.0


@settings(max_examples=6, deadline=None)
@given(st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=5, max_size=30),
       st.integers(1, 5))
def test_beam_search_yields_only_valid_distinct_sids(tiny, sids, k):
    model, tok = tiny
    hostile(model, tok)
    trie = SidTrie(sids)
    res = constrained_beam_search(model, tok, PROMPTS, trie, k=k, batch_size=3)
    for r in res:
        assert len(r.sids) == k
        assert len(set(r.sids)) == k
        assert all(s in sids for s in r.sids)
        assert r.scores == sorted(r.scores, reverse=True)


def test_exhaustive_beam_equals_brute_force_ranking(tiny):
    model, tok = tiny
    hostile(model, tok)
    rnd = random.Random(1)
    sids = set(rnd.sample(list(itertools.product(range(4), repeat=3)), 12))
    trie = SidTrie(sids)
    # with as many beams as items, beam search is exact: top-K = sort by teacher-forced log-prob
    res = constrained_beam_search(model, tok, [PROMPTS[0]], trie, k=5, num_beams=len(sids))[0]
    scores = score_sids(model, tok, PROMPTS[0], sorted(sids))
    brute = sorted(zip(scores, sorted(sids)), reverse=True)[:5]
    assert res.sids == [s for _, s in brute]
    assert res.scores == pytest.approx([sc for sc, _ in brute], abs=1e-4)
    # deterministic despite do_sample=True in the model's generation_config
    again = constrained_beam_search(model, tok, [PROMPTS[0]], trie, k=5, num_beams=len(sids))[0]
    assert again.sids == res.sids
    assert model.generation_config.do_sample is True  # restored after the call


def test_catalog_log_probs_are_each_sids_teacher_forced_score_and_rank_as_the_exhaustive_beam(tiny):
    model, tok = tiny
    rnd = random.Random(2)
    sids = set(rnd.sample(list(itertools.product(range(4), repeat=3)), 15))
    trie = SidTrie(sids)
    order = list(trie.iter_sids())
    M = catalog_log_probs(model, tok, PROMPTS, trie, chunk=4)  # 15 items: three chunks and a short one
    assert M.shape == (len(PROMPTS), len(sids))
    tmap = SidTokenMap(tok, (4, 4, 4))
    for i, p in enumerate(PROMPTS):
        # the oracle: prompt + the SID's tokens in one plain forward pass (no cache), log-softmax summed
        ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(ids, add_special_tokens=False)["input_ids"]
        for j, codes in enumerate(order):
            sid_ids = [tmap.token_id(level, c) for level, c in enumerate(codes)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt_ids + sid_ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            want = sum(float(logp[len(prompt_ids) - 1 + t, tok_id]) for t, tok_id in enumerate(sid_ids))
            assert M[i, j] == pytest.approx(want, abs=1e-4)
        # the chunked scores equal one pass over all items
        assert M[i] == pytest.approx(score_sids(model, tok, p, order), abs=1e-5)
        # the probabilities of all items sum to at most 1 (the constraint is not renormalised)
        assert float(torch.tensor(M[i]).double().exp().sum()) <= 1.0 + 1e-6
    beam = constrained_beam_search(model, tok, PROMPTS, trie, k=6, num_beams=len(sids))
    for i, r in enumerate(beam):
        best = sorted(range(len(order)), key=lambda j: -M[i, j])[:6]
        assert r.sids == [order[j] for j in best]


def test_catalog_log_probs_by_level_equal_item_by_item_for_any_chunk_and_trie_shape(tiny):
    """Scoring each distinct prefix once gives every item the score of forcing its own tokens, for
    tries whose prefixes are shared by many items, by one item each, or mixed, whatever the chunk
    (one prefix at a time, some, all at once); the model is left in the mode it was in."""
    model, tok = tiny
    shapes = {
        "one first code": [(1, b, c) for b in range(4) for c in range(4)],
        "no shared prefix": [(a, a, (a + 1) % 4) for a in range(4)],
        "mixed": [(0, 0, 0), (0, 0, 3), (0, 2, 1), (3, 1, 1), (3, 1, 2), (2, 3, 0)],
        "two levels": [(0, 1), (0, 3), (2, 2), (3, 0), (3, 1)],
        "one level": [(0,), (2,), (3,)],
    }
    model.train()
    for name, sids in shapes.items():
        trie = SidTrie(sids)
        tmap = SidTokenMap(tok, SIZES[:len(sids[0])])
        order = list(trie.iter_sids())
        want = [score_sids(model, tok, p, order, None, tmap) for p in PROMPTS[:2]]
        for chunk in (1, 3, 1000, None):
            M = catalog_log_probs(model, tok, PROMPTS[:2], trie, tmap, chunk=chunk)
            for i in range(2):
                assert M[i] == pytest.approx(want[i], abs=1e-5), (name, chunk)
        assert model.training
    model.eval()
    with pytest.raises(ConstrainedDecodingError, match="chunk must be >= 1"):
        catalog_log_probs(model, tok, PROMPTS[:1], SidTrie(shapes["mixed"]), SidTokenMap(tok, SIZES), chunk=0)


def test_logits_processor_and_prefix_fn_mask_by_trie(tiny):
    _, tok = tiny
    trie = SidTrie([(1, 2, 3), (1, 0, 0), (2, 2, 2)])
    tmap = SidTokenMap(tok, SIZES)
    eos = tok.eos_token_id
    proc = SidTrieLogitsProcessor(trie, tmap, prompt_length=2, end_token_id=eos)
    ids = torch.tensor([[5, 6], [5, 6]])
    ids = torch.cat([ids, torch.tensor([[tmap.token_id(0, 1)], [tmap.token_id(0, 2)]])], dim=1)
    out = proc(ids, torch.zeros(2, len(tok)))
    allowed0 = set(torch.nonzero(out[0] == 0).flatten().tolist())
    allowed1 = set(torch.nonzero(out[1] == 0).flatten().tolist())
    assert allowed0 == {tmap.token_id(1, 0), tmap.token_id(1, 2)}
    assert allowed1 == {tmap.token_id(1, 2)}
    fn = make_prefix_allowed_tokens_fn(trie, tmap, 2, eos)
    assert set(fn(0, ids[0])) == allowed0
    full = torch.tensor([5, 6] + [tmap.token_id(lv, c) for lv, c in enumerate((2, 2, 2))])
    assert fn(0, full) == [eos]
    # usable directly with generate (what a rollout backend would do)
    model = tiny[0]
    enc = tok(["hello"], return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=3, do_sample=False, num_beams=1,
                         logits_processor=LogitsProcessorList([SidTrieLogitsProcessor(
                             trie, tmap, enc["input_ids"].shape[1], eos)]))
    assert tmap.decode(gen[0, enc["input_ids"].shape[1]:].tolist()) in trie


def test_errors(tiny, tmp_path):
    model, tok = tiny
    trie = SidTrie([(0, 0, 0), (1, 1, 1)])
    with pytest.raises(ConstrainedDecodingError, match="larger than the number of items"):
        constrained_beam_search(model, tok, PROMPTS, trie, k=3)
    with pytest.raises(SidTokenError, match="lacks"):
        SidTokenMap(tok, (4, 4, 9))


def test_unconstrained_mode_counts_invalid(tiny):
    model, tok = tiny
    trie = SidTrie([(0, 0, 0), (1, 1, 1), (2, 2, 2)])
    res = constrained_beam_search(model, tok, PROMPTS[:1], trie, k=2, constrained=False)[0]
    # a random model practically never spells one of 3 SIDs by itself; the constrained search always does
    assert res.n_beams == 2 and res.n_invalid >= 1 and all(s in trie for s in res.sids)
    on = constrained_beam_search(model, tok, PROMPTS[:1], trie, k=2)[0]
    assert on.n_invalid == 0 and len(on.sids) == 2


def test_suffix_mode_factory_for_rollout_hook(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conrec_verl.constrained import rollout_logits_processor
    from conrec_verl.core.sid import format_sid

    model, tok = tiny
    sids = [(1, 2, 3), (1, 0, 0), (2, 2, 2)]
    pq.write_table(pa.table({"item_id": ["x", "y", "z"], "sid": [format_sid(s) for s in sids]}),
                   tmp_path / "sid_map.parquet")
    proc = rollout_logits_processor(tok, None, sid_map=str(tmp_path / "sid_map.parquet"))
    tmap = SidTokenMap(tok, SIZES)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Items: <a_1><b_2><c_3>"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for gen, expected in (([], {tmap.token_id(0, 1), tmap.token_id(0, 2)}),
                          ([tmap.token_id(0, 1)], {tmap.token_id(1, 0), tmap.token_id(1, 2)}),
                          ([tmap.token_id(lv, c) for lv, c in enumerate((1, 0, 0))], {tok.eos_token_id})):
        out = proc(torch.tensor([ids + gen]), torch.zeros(1, len(tok)))
        assert set(torch.nonzero(out[0] == 0).flatten().tolist()) == expected
    # greedy generation as the rollout server runs it (it builds its own processor list)
    gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                         logits_processor=LogitsProcessorList([proc]), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = gen[0, len(ids):].tolist()
    assert tmap.decode(new[:3]) in sids and new[3] == tok.eos_token_id


def test_exclusion_masks_the_trie_and_still_returns_k(tiny):
    model, tok = tiny
    rnd = random.Random(5)
    sids = sorted(rnd.sample(list(itertools.product(range(4), repeat=3)), 12))
    trie = SidTrie(sids)
    keep = sids[2:5]
    exclude = [set(sids) - set(keep), set(sids[:1]), set(sids) - set(sids[:2])]
    res = constrained_beam_search(model, tok, PROMPTS, trie, k=3, num_beams=12, exclude=exclude)
    assert sorted(res[0].sids) == keep and not res[0].exclusion_skipped  # exactly K remain: all of them
    assert len(res[1].sids) == 3 and sids[0] not in res[1].sids
    # only 2 items would remain for K = 3: that row is searched unmasked and flagged
    assert res[2].exclusion_skipped and len(res[2].sids) == 3
    with pytest.raises(ConstrainedDecodingError, match="entries for"):
        constrained_beam_search(model, tok, PROMPTS, trie, k=3, exclude=exclude[:1])
