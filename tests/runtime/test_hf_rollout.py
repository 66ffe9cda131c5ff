"""The generation core of the `hf` rollout backend, on a tiny model built at test time."""

import pytest
import torch
from transformers import LogitsProcessor

from conrec_verl.core.sid import all_sid_tokens
from conrec_verl.runtime.hf_rollout import GenerationRequest, load_generator
from tests.conftest import TINY_SID_SIZES


class OnlyTokens(LogitsProcessor):
    def __init__(self, allowed):
        self.allowed = torch.tensor(sorted(allowed))

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed] = 0
        return scores + mask


class EosAt(LogitsProcessor):
    def __init__(self, eos, prompt_len, at):
        self.eos, self.prompt_len, self.at = eos, prompt_len, at

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.eos] = 0
        return scores


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return load_generator(str(tiny_model_dir), device="cpu")


def _prompts(tok):
    texts = ["Items the user liked: none", "Items the user marked not interested: <a_1><b_2><c_3> <a_4><b_5><c_6>"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for t in texts]


def test_batched_greedy_equals_one_by_one(gen):
    prompts = _prompts(gen.tokenizer)
    reqs = [GenerationRequest(p, max_tokens=5, temperature=0) for p in prompts]
    together = gen.generate(reqs)
    alone = [gen.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for a, b in zip(together, alone):
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-4)


def test_logprobs_match_a_forward_pass(gen):
    prompt = _prompts(gen.tokenizer)[1]
    res = gen.generate([GenerationRequest(prompt, max_tokens=4, temperature=0.7)])[0]
    ids = torch.tensor([prompt + res.token_ids])
    with torch.no_grad():
        logits = gen.model(ids).logits[0, len(prompt) - 1 : -1] / 0.7
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(res.token_ids)[:, None])[:, 0]
    assert res.log_probs == pytest.approx(expected.tolist(), abs=1e-4)


def test_logits_processor_hook_constrains_output(gen):
    allowed = set(gen.tokenizer.convert_tokens_to_ids(all_sid_tokens(TINY_SID_SIZES)))
    gen.logits_processor = OnlyTokens(allowed)
    try:
        out = gen.generate([GenerationRequest(p, max_tokens=6, temperature=1.0) for p in _prompts(gen.tokenizer)])
    finally:
        gen.logits_processor = None
    for r in out:
        assert len(r.token_ids) == 6 and set(r.token_ids) <= allowed and r.finish_reason == "length"


def test_stops_at_eos_and_includes_it(gen):
    prompt = _prompts(gen.tokenizer)[0]
    gen.logits_processor = EosAt(gen.eos_token_ids[0], len(prompt), 2)
    try:
        res = gen.generate([GenerationRequest(prompt, max_tokens=8, temperature=1.0)])[0]
    finally:
        gen.logits_processor = None
    assert len(res.token_ids) == 3 and res.token_ids[-1] == gen.eos_token_ids[0] and res.finish_reason == "stop"


def test_mixed_settings_are_rejected(gen):
    p = _prompts(gen.tokenizer)[0]
    with pytest.raises(ValueError, match="mixed sampling settings"):
        gen.generate([GenerationRequest(p, 2, temperature=0), GenerationRequest(p, 2, temperature=1)])


def test_checkpoint_generation_config_cannot_change_rollouts(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from conrec_verl.runtime.hf_rollout import HFGenerator, load_generator

    clean = load_generator(str(tiny_model_dir), device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 5.0
    hostile = HFGenerator(model.eval(), clean.tokenizer)
    reqs = [GenerationRequest(p, max_tokens=6, temperature=0) for p in _prompts(clean.tokenizer)]
    assert [r.token_ids for r in hostile.generate(reqs)] == [r.token_ids for r in clean.generate(reqs)]


def test_seeded_sampling_is_reproducible_whatever_the_arrival_order(gen):
    tok = gen.tokenizer
    prompts = _prompts(tok)
    reqs = [GenerationRequest(p, max_tokens=4, temperature=1.5) for p in prompts for _ in range(4)]
    first = gen.generate(reqs, seed=7)
    shuffled = list(reversed(reqs))
    again = gen.generate(shuffled, seed=7)
    # the same batch in another order: each request gets the same sample as before (equal prompts share them)
    key = lambda res, rq: sorted((tuple(q.prompt_ids), tuple(r.token_ids)) for q, r in zip(rq, res))
    assert key(first, reqs) == key(again, shuffled)
    other = gen.generate(reqs, seed=8)
    assert key(other, reqs) != key(first, reqs)
