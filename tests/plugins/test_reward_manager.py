"""The ``conrec`` reward-loop manager and the plain ``compute_score``, built and driven through
verl's own registry, loader and ``DataProto``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.trainer.ppo.reward import get_custom_reward_fn, load_reward_manager

import conrec_verl.plugins.reward_manager  # noqa: F401 - registration at import
from conrec_verl.plugins.compute_score import compute_score
from conrec_verl.core.reward import VARIANTS, RewardConfig, ScoringConfigError
from conrec_verl.core.scoring import Scorer
from conrec_verl.plugins.reward_manager import ConrecRewardManager

from tests.sid_fixtures import ground_truth, sid

GT = ground_truth([sid(1, 2, 3), sid(0, 4, 5)], [sid(3, 3, 3)], [sid(2, 1, 0)])


def one_row(tokenizer, response_text, gt=GT, extra_info=None, prompt_text="predict", pad_to=24, data_source="conrec"):
    """A one-row DataProto shaped like the reward loop's input (left-padded prompt, right-padded response)."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"] if response_text else []
    resp_ids = list(resp_ids) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    p_len = max(len(prompt_ids), 4)
    r_len = max(len(resp_ids), pad_to)
    pad = tokenizer.pad_token_id
    prompts = torch.full((1, p_len), pad, dtype=torch.long)
    prompts[0, p_len - len(prompt_ids):] = torch.tensor(prompt_ids)
    responses = torch.full((1, r_len), pad, dtype=torch.long)
    responses[0, : len(resp_ids)] = torch.tensor(resp_ids)
    attn = torch.zeros((1, p_len + r_len), dtype=torch.long)
    attn[0, p_len - len(prompt_ids): p_len] = 1
    attn[0, p_len: p_len + len(resp_ids)] = 1
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attn},
        non_tensors={
            "data_source": np.array([data_source], dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": gt}], dtype=object),
            "extra_info": np.array([extra_info if extra_info is not None else {"index": 0}], dtype=object),
        },
    )


@pytest.fixture(scope="module")
def manager_for(compose, tokenizer, codebook_path):
    def make(**kwargs):
        overrides = ["reward.reward_manager.name=conrec", f"+reward.reward_kwargs.codebook_path={codebook_path}"]
        overrides += [f"+reward.reward_kwargs.{k}={v}" for k, v in kwargs.items()]
        config = compose(overrides)
        return load_reward_manager(config, tokenizer, reward_router_address=None, reward_model_tokenizer=None)

    return make


@pytest.fixture(scope="module")
def default_manager(manager_for):
    return manager_for()


def run(manager, data):
    # verl's managers capture their event loop at construction (verl.utils.ray_utils.get_event_loop)
    return manager.loop.run_until_complete(manager.run_single(data))


def test_registered_under_conrec():
    assert get_reward_manager_cls("conrec") is ConrecRewardManager


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_selected_by_one_key_matches_the_pure_scorer(manager_for, tokenizer, codebook, variant):
    manager = manager_for(variant=variant)
    assert isinstance(manager, ConrecRewardManager)
    scorer = Scorer(codebook, RewardConfig(variant=variant))
    rewards = set()
    for text in [f"I think {sid(1, 2, 3)}", sid(1, 2, 0), f" {sid(2, 1, 1)} {sid(1, 2, 3)}", sid(3, 0, 5), "nothing"]:
        out = run(manager, one_row(tokenizer, text))
        expected = scorer.score(text, GT)
        assert out["reward_score"] == pytest.approx(expected.reward, abs=1e-6)
        info = out["reward_extra_info"]
        assert info["valid_sid"] == float(expected.valid)
        assert info["exact_hit"] == float(expected.exact_hit) == info["acc"]
        assert info["prefix_depth"] == expected.prefix_depth
        assert info["sim_gts"] == pytest.approx(expected.sim_gts, abs=1e-6)
        assert info["sim_fps"] == pytest.approx(expected.sim_fps, abs=1e-6)
        rewards.add(round(out["reward_score"], 6))
    assert len(rewards) >= 3  # the texts really produce different rewards


def test_reward_kwargs_take_effect(manager_for, tokenizer):
    text = sid(2, 1, 1)
    low = run(manager_for(gamma=0.0), one_row(tokenizer, text))["reward_score"]
    high = run(manager_for(gamma=2.0), one_row(tokenizer, text))["reward_score"]
    assert low != high
    bad = run(manager_for(format_penalty=-7.5), one_row(tokenizer, "<a_1><b_2>"))
    assert bad["reward_score"] == -7.5 and bad["reward_extra_info"]["valid_sid"] == 0.0
    # hit_bonus: a future dislike earns it (and reports future_neg_hit), a Swing neighbour does not
    for out, is_target in ((sid(0, 4, 5), True), (sid(3, 3, 3), False)):
        plain = run(manager_for(), one_row(tokenizer, out))
        bonus = run(manager_for(hit_bonus=0.8), one_row(tokenizer, out))
        assert bonus["reward_score"] == pytest.approx(plain["reward_score"] + 0.8 * is_target, abs=1e-6)
        assert bonus["reward_extra_info"]["future_neg_hit"] == float(is_target)
        assert bonus["reward_extra_info"]["exact_hit"] == 1.0


def test_extra_info_reports_the_context_and_is_flat(manager_for, tokenizer):
    manager = manager_for()
    out = run(manager, one_row(tokenizer, sid(1, 2, 3), extra_info={"index": 3, "context": 2}))
    assert out["reward_extra_info"]["context"] == 2.0
    assert out["reward_extra_info"]["exact_hit"] == 1.0
    assert all(isinstance(v, float) for v in out["reward_extra_info"].values())
    none = run(manager, one_row(tokenizer, sid(1, 2, 3), extra_info={"index": 3}))
    assert none["reward_extra_info"]["context"] == 0.0
    # a row of a data folder written before the field was renamed (extra_info.stage)
    old = run(manager, one_row(tokenizer, sid(1, 2, 3), extra_info={"index": 3, "stage": 3}))
    assert old["reward_extra_info"]["context"] == 3.0
    assert set(none["reward_extra_info"]) == set(out["reward_extra_info"])  # verl stacks by key


def test_stage_from_schedule_and_global_steps(compose, tokenizer, codebook_path):
    config = compose([
        "reward.reward_manager.name=conrec", f"+reward.reward_kwargs.codebook_path={codebook_path}",
        "+algorithm.progressive_grpo.stages=[{context: 1, steps: 2}, {context: 2, steps: 2}]",
    ])
    manager = load_reward_manager(config, tokenizer)
    data = one_row(tokenizer, sid(1, 2, 3))
    data.non_tensor_batch["global_steps"] = np.array([3], dtype=object)
    assert run(manager, data)["reward_extra_info"]["context"] == 2.0


def test_codebook_loaded_once_per_process(manager_for, monkeypatch):
    from conrec_verl.plugins import compute_score as cs

    calls = []
    original = cs.Codebook.load
    monkeypatch.setattr(cs, "_CACHE", {})
    monkeypatch.setattr(cs, "_FAST", {})
    monkeypatch.setattr(cs.Codebook, "load", classmethod(lambda cls, p: calls.append(p) or original(p)))
    ConrecRewardManager._class_initialized = False
    a = manager_for(variant="neg_only")
    b = manager_for(variant="neg_only")
    assert len(calls) == 1 and a.scorer is b.scorer


def test_missing_codebook_is_a_clear_error(compose, tokenizer, tmp_path):
    config = compose(["reward.reward_manager.name=conrec"])
    with pytest.raises(ScoringConfigError, match="reward.reward_kwargs.codebook_path is required"):
        load_reward_manager(config, tokenizer)
    config = compose(["reward.reward_manager.name=conrec", f"+reward.reward_kwargs.data_dir={tmp_path}"])
    with pytest.raises(ValueError, match="codebook file not found"):
        load_reward_manager(config, tokenizer)
    config = compose(["reward.reward_manager.name=conrec", f"+reward.reward_kwargs.data_dir={tmp_path}",
                      "+reward.reward_kwargs.varient=neg_only"])
    with pytest.raises(ScoringConfigError, match="varient"):
        load_reward_manager(config, tokenizer)


def test_compute_score_through_verl_naive_manager(compose, tokenizer, codebook_path, codebook):
    config = compose([
        "reward.custom_reward_function.path=pkg://conrec_verl.plugins.compute_score",
        "reward.custom_reward_function.name=compute_score",
        f"+reward.custom_reward_function.reward_kwargs.codebook_path={codebook_path}",
        "+reward.custom_reward_function.reward_kwargs.variant=double_truncated",
    ])
    fn = get_custom_reward_fn(config)
    assert fn is not None
    naive = load_reward_manager(config, tokenizer)
    assert type(naive).__name__ == "NaiveRewardManager"
    scorer = Scorer(codebook, RewardConfig(variant="double_truncated"))
    for text in [sid(1, 2, 3), sid(2, 1, 0), "junk"]:
        out = run(naive, one_row(tokenizer, text))
        assert out["reward_score"] == pytest.approx(scorer.score(text, GT).reward, abs=1e-6)
        assert out["reward_extra_info"]["valid_sid"] == float(scorer.score(text, GT).valid)
    direct = compute_score("conrec", sid(1, 2, 3), json.loads(GT), {}, codebook_path=codebook_path)
    assert direct["score"] == pytest.approx(1.0 - 0.5 * scorer.score(sid(1, 2, 3), GT).sim_fps, abs=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ids=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_manager_never_raises_on_any_token_ids(default_manager, tokenizer, ids):
    manager = default_manager
    vocab = len(tokenizer)
    ids = [i % vocab for i in ids]
    data = one_row(tokenizer, "")
    resp = torch.full((1, max(len(ids), 1)), tokenizer.pad_token_id, dtype=torch.long)
    resp[0, : len(ids)] = torch.tensor(ids, dtype=torch.long) if ids else resp[0, :0]
    p_len = data.batch["prompts"].shape[1]
    attn = torch.cat([data.batch["attention_mask"][:, :p_len], torch.zeros_like(resp)], dim=1)
    attn[0, p_len: p_len + len(ids)] = 1
    data = DataProto.from_dict(tensors={"prompts": data.batch["prompts"], "responses": resp, "attention_mask": attn},
                               non_tensors=dict(data.non_tensor_batch))
    out = run(manager, data)
    assert math.isfinite(out["reward_score"])
    assert out["reward_extra_info"]["valid_sid"] in (0.0, 1.0)


def test_sid_tokens_registered_as_special_tokens_still_count(compose, codebook_path):
    from conrec_verl.core.sid import all_sid_tokens
    from conrec_verl.model_builder import build_tokenizer

    from tests.sid_fixtures import SIZES

    tok = build_tokenizer(SIZES)
    tok.add_special_tokens({"additional_special_tokens": all_sid_tokens(SIZES)})
    ids = tok(sid(1, 2, 3), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == ""  # what a naive decode would score
    config = compose(["reward.reward_manager.name=conrec", f"+reward.reward_kwargs.codebook_path={codebook_path}",
                      "+reward.reward_kwargs.parse_mode=strict"])
    manager = load_reward_manager(config, tok)
    out = run(manager, one_row(tok, sid(1, 2, 3)))  # the response ends with <|im_end|>
    assert out["reward_extra_info"]["valid_sid"] == 1.0 and out["reward_extra_info"]["exact_hit"] == 1.0


def test_a_sid_that_is_no_item_gets_the_format_penalty_through_both_swaps(compose, tokenizer, codebook, tmp_path):
    """Evaluation decodes only items of the build: an in-range code tuple that is no item must not
    earn reward in training (item_map=auto reads the sid_map.parquet beside the codebook)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    codebook.save(data / "codebook.npz")
    items = [sid(1, 2, 3), sid(0, 4, 5), sid(3, 3, 3), sid(2, 1, 0)]
    pq.write_table(pa.table({"item_id": [f"i{i}" for i in range(4)], "sid": items}), data / "sid_map.parquet")
    non_item = sid(1, 2, 4)
    penalty = RewardConfig().effective_format_penalty()
    manager = load_reward_manager(compose(["reward.reward_manager.name=conrec",
                                           f"+reward.reward_kwargs.data_dir={data}"]), tokenizer)
    out = run(manager, one_row(tokenizer, non_item))
    assert out["reward_score"] == penalty
    assert out["reward_extra_info"]["valid_sid"] == 0.0 and out["reward_extra_info"]["non_item_sid"] == 1.0
    item = run(manager, one_row(tokenizer, items[0]))
    assert item["reward_score"] > penalty and item["reward_extra_info"]["non_item_sid"] == 0.0
    # the plain function: same rule; item_map=none restores "any in-range SID scores"
    kw = {"codebook_path": str(data / "codebook.npz")}
    assert compute_score("conrec", non_item, json.loads(GT), {}, **kw)["score"] == penalty
    assert compute_score("conrec", non_item, json.loads(GT), {}, **kw, item_map="none")["score"] > penalty
    with pytest.raises(ScoringConfigError, match="item_map: .* not found"):
        compute_score("conrec", non_item, json.loads(GT), {}, **kw, item_map=str(tmp_path / "nope.parquet"))


def test_rows_of_other_tasks_get_verls_scorer_and_the_same_keys(compose, tokenizer, codebook_path, manager_for):
    """Mixed data: a gsm8k row beside CoNRec rows is scored by verl's default GSM8K rule through
    both swaps (manager and function), with the extra-info keys of a CoNRec row (verl stacks them)."""
    from verl.utils.reward_score import default_compute_score

    gsm8k_gt = "72"
    right, wrong = "so the answer is #### 72", "#### 71"
    manager = manager_for()
    ours = run(manager, one_row(tokenizer, sid(1, 2, 3)))
    for text in (right, wrong):
        out = run(manager, one_row(tokenizer, text, gt=gsm8k_gt, data_source="openai/gsm8k"))
        expected = float(default_compute_score("openai/gsm8k", text, gsm8k_gt))
        assert out["reward_score"] == expected
        assert set(out["reward_extra_info"]) == set(ours["reward_extra_info"])
        assert out["reward_extra_info"]["conrec_row"] == 0.0 and out["reward_extra_info"]["acc"] == expected
    assert ours["reward_extra_info"]["conrec_row"] == 1.0
    assert run(manager, one_row(tokenizer, right, gt=gsm8k_gt, data_source="openai/gsm8k"))["reward_score"] == 1.0
    # a manager told that gsm8k rows are CoNRec rows scores them with the CoNRec reward (and refuses their GT)
    from conrec_verl.core.contract import GroundTruthError

    claimed = manager_for(data_sources="[openai/gsm8k]")
    with pytest.raises(GroundTruthError):
        run(claimed, one_row(tokenizer, right, gt=gsm8k_gt, data_source="openai/gsm8k"))
    # the function swap under verl's naive manager routes the same way
    config = compose(["reward.custom_reward_function.path=pkg://conrec_verl.plugins.compute_score",
                      "reward.custom_reward_function.name=compute_score",
                      f"+reward.custom_reward_function.reward_kwargs.codebook_path={codebook_path}"])
    naive = load_reward_manager(config, tokenizer)
    assert run(naive, one_row(tokenizer, right, gt=gsm8k_gt, data_source="openai/gsm8k"))["reward_score"] == 1.0
    assert run(naive, one_row(tokenizer, sid(1, 2, 3)))["reward_extra_info"]["exact_hit"] == 1.0


@pytest.mark.parametrize("parse_mode", ["first", "strict"])
def test_token_ids_map_to_the_sid_the_decoded_text_gives(manager_for, tokenizer, parse_mode):
    """The manager reads a response of SID and special tokens from its ids (no decode); whatever the
    ids, it finds the SID that parsing the decoded text finds -- runs, stray levels, out-of-range
    tuples, whitespace and words between tokens, SIDs spelled in plain characters."""
    from conrec_verl.core.sid import all_sid_tokens

    manager = manager_for(parse_mode=parse_mode)
    assert manager.token_map is not None
    sid_ids = tokenizer.convert_tokens_to_ids(all_sid_tokens((5, 6, 7, 2)))  # one code past each level, a 4th level
    sid_ids = [i for i in sid_ids if i != tokenizer.unk_token_id]
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    others = tokenizer(" x <a_1> <b_2><c_3> <d_0> hello", add_special_tokens=False)["input_ids"]
    pools = st.sampled_from(sid_ids) | st.sampled_from(specials) | st.sampled_from(others)
    seen = {"tokens": 0, "text": 0}

    @given(st.lists(pools, max_size=12))
    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    def check(ids):
        by_text = manager.scorer.parse_output(manager.decode(ids))
        assert manager.parse(ids) == by_text
        seen["tokens" if manager.token_map.sid_tokens(ids, manager._skip_ids) is not None else "text"] += 1

    check()
    assert seen["tokens"] > 50 and seen["text"] > 50  # both paths were exercised
    canonical = tokenizer(sid(1, 2, 3), add_special_tokens=False)["input_ids"] + specials[:1]
    assert manager.token_map.sid_tokens(canonical, manager._skip_ids) == [(0, 1), (1, 2), (2, 3)]
    assert manager.parse(canonical) == (1, 2, 3)
