import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conrec_verl.core.prompts import render_alignment_prompt, render_history_prompt
from conrec_verl.core.sid import all_sid_tokens, format_sid
from conrec_verl.model_builder import (
    MissingSidTokensError,
    check_sid_tokens,
    extend_model_with_sid_tokens,
    main,
    missing_sid_tokens,
)
from tests.conftest import TINY_SID_SIZES


def _prompt_texts():
    sids = [format_sid((i % 16, (3 * i) % 16, (7 * i) % 16)) for i in range(12)]
    return [
        render_history_prompt(1, sids[:2], sids, sids[5:]),
        render_history_prompt(3, sids[:2], sids, sids[5:]),
        render_alignment_prompt(sids[:4]),
        "Which item ID has the title: Toy Story (1995)? Answer with its item ID only.",
    ]


def test_prompt_round_trips_through_autotokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in _prompt_texts():
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "<a_1><b_2><c_3>"}]
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        decoded = tok.decode(ids)
        # nothing may be dropped: every character of the content survives the round trip
        assert text in decoded
        assert "<|im_start|>assistant\n<a_1><b_2><c_3><|im_end|>" in decoded


def test_sid_tokens_and_newline_are_single_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
    for token in all_sid_tokens(TINY_SID_SIZES):
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == token
    assert missing_sid_tokens(tok, TINY_SID_SIZES) == []
    # a bigger codebook than the tokenizer knows is reported with a fix
    with pytest.raises(MissingSidTokensError, match="extend"):
        check_sid_tokens(tok, (16, 16, 17))


def test_tiny_model_loads_and_generates_sid_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen3"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": _prompt_texts()[0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    assert json.loads((tiny_model_dir / "conrec_sid.json").read_text())["sid_sizes"] == list(TINY_SID_SIZES)


def test_extend_existing_model_adds_tokens_and_resizes(tiny_model_dir, tmp_path):
    bigger = (16, 16, 16, 8)  # adds a fourth level: 8 new tokens
    out = extend_model_with_sid_tokens(tiny_model_dir, tmp_path / "extended", bigger)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert missing_sid_tokens(tok, bigger) == []
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert tok.convert_ids_to_tokens(tok.encode("<d_7>", add_special_tokens=False)) == ["<d_7>"]


def test_cli_builds_tiny_model(tmp_path, capsys):
    main(["tiny", "--out", str(tmp_path / "m"), "--sid-sizes", "4,4"])
    assert "written to" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert missing_sid_tokens(tok, (4, 4)) == []
    with pytest.raises(SystemExit):
        main(["tiny", "--out", str(tmp_path / "x"), "--sid-sizes", "4,zero"])
    assert not (tmp_path / "x").exists()


def test_merge_lora_export_equals_the_peft_model(tiny_model_dir, tmp_path):
    """verl's LoRA SFT export is a PEFT-wrapped state dict; merged, it must compute what PEFT computes."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from conrec_verl.model_builder import merge_lora_export

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters are non-zero
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous().clone() for k, v in peft_model.state_dict().items()}, str(export / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (export / f).write_bytes((tiny_model_dir / f).read_bytes())
    merged_dir = merge_lora_export(export, tmp_path / "merged", lora_alpha=8, r=4)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[1, 5, 9, 200, 300]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapters really were merged in
