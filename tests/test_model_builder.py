import json
from pathlib import Path

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
    with pytest.raises(SystemExit) as err:  # the codebook comes from a data folder
        main(["tiny", "--out", str(tmp_path / "x"), "--sid-sizes", "4,4", "--sid-init", "codebook"])
    assert err.value.code == 2 and "--sid-init codebook needs --data-dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_errors_are_one_line_and_never_replace_a_model(tiny_model_dir, tmp_path, capsys):
    """A missing folder, a folder that is no model, an existing --out and sizes that contradict the
    model's SID tokens are each one error line (exit 2); nothing is written."""
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("x")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["extend", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"), "--sid-sizes", "4,4"],
         "model folder not found"),
        (["extend", "--model", str(not_a_model), "--out", str(tmp_path / "o2"), "--sid-sizes", "4,4"],
         "is not a Hugging Face model folder (no config.json)"),
        (["extend", "--model", str(tiny_model_dir), "--out", str(existing), "--sid-sizes", "16,16,16"],
         "exists; pass --overwrite"),
        (["tiny", "--out", str(existing), "--sid-sizes", "4,4"], "exists; pass --overwrite"),
        (["extend", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o3"), "--sid-sizes", "8,8"],
         "already has SID tokens for sizes [16, 16, 16]"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("conrec-model: error:") and message in err and err.count("\n") == 1, err
    assert (existing / "keep.txt").read_text() == "mine" and not (existing / "config.json").exists()
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    main(["tiny", "--out", str(existing), "--sid-sizes", "4,4", "--overwrite"])
    assert (existing / "config.json").is_file()


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


def untied_copy(tiny_model_dir, dest):
    from transformers import AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    m.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(dest)
    return dest


def test_sid_lora_adapter_trains_the_sid_rows_and_merges_back(tiny_model_dir, tmp_path):
    """LoRA on linear layers never moves the new SID token rows; the adapter from
    init_sid_lora_adapter does (input embeddings and lm_head), loaded the way verl's SFT trainer
    loads ``model.lora_adapter_path``, and merge_lora_export puts the trained rows back."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from conrec_verl.model_builder import init_sid_lora_adapter, merge_lora_export, sid_token_ids

    with pytest.raises(ValueError, match="ties its input embeddings"):
        init_sid_lora_adapter(tiny_model_dir, tmp_path / "tied_adapter")
    base_dir = untied_copy(tiny_model_dir, tmp_path / "untied")  # as Qwen3-8B: untied embeddings and lm_head
    adapter = init_sid_lora_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = sid_token_ids(tok)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter), is_trainable=True)
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    before_in = plain.get_input_embeddings().weight.detach().clone()
    before_out = plain.lm_head.weight.detach().clone()
    # one SFT step on an answer that is a SID
    text = "Items the user marked not interested: <a_1><b_2><c_3>"
    x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:])
    loss.backward()
    opt.step()
    merged = model.merge_and_unload()
    after_in, after_out = merged.get_input_embeddings().weight.detach(), merged.lm_head.weight.detach()
    other = [i for i in range(after_in.shape[0]) if i not in set(ids)]
    assert not torch.allclose(after_in[ids], before_in[ids])  # the SID rows moved
    assert not torch.allclose(after_out[ids], before_out[ids])
    assert torch.equal(after_in[other], before_in[other])  # nothing else of the embedding did
    # a verl-style export (the PEFT-wrapped state dict) merges into the same model
    model2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter), is_trainable=True)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.cross_entropy(model2(x).logits[0, :-1], x[0, 1:]).backward()
    opt2.step()
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.detach().contiguous().clone() for k, v in model2.state_dict().items()}, str(export / "model.safetensors"))
    for f in base_dir.iterdir():
        if f.suffix != ".safetensors":
            (export / f.name).write_bytes(f.read_bytes())
    ours = AutoModelForCausalLM.from_pretrained(merge_lora_export(export, tmp_path / "merged", lora_alpha=8, r=4))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, merged(x).logits, atol=1e-4)


@pytest.mark.slow
def test_verl_lora_sft_step_moves_the_sid_rows(tiny_model_dir, tmp_path):
    """One step of verl's own SFT trainer (torchrun, CPU) from a conrec-model lora-init adapter:
    the merged export's SID rows of the input embeddings and lm_head changed, no other row did."""
    import json
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from conrec_verl.core.prompts import render_history_prompt
    from conrec_verl.model_builder import main, merge_lora_export, sid_token_ids
    from conrec_verl.runtime.cpu_env import cpu_env

    base = untied_copy(tiny_model_dir, tmp_path / "untied")
    main(["lora-init", "--model", str(base), "--out", str(tmp_path / "adapter"), "--rank", "4", "--alpha", "8"])
    rows = [{"messages": [{"role": "user", "content": render_history_prompt(2, [], ["<a_1><b_2><c_3>"], [])},
                          {"role": "assistant", "content": f"<a_{i % 4}><b_{(i + 1) % 4}><c_{(i + 2) % 4}>"}]}
            for i in range(32)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
           "-m", "verl.trainer.sft_trainer", "--config-path", str(root / "recipes/conrec/config"),
           "--config-name", "sft_cpu_tiny", f"model.path={base}", f"data.train_files={tmp_path / 'sft.parquet'}",
           f"trainer.default_local_dir={tmp_path / 'ck'}", "trainer.total_training_steps=1", "model.lora_rank=4",
           "model.lora_alpha=8", f"model.lora_adapter_path={tmp_path / 'adapter'}"]
    proc = subprocess.run(cmd, env=dict(os.environ, **cpu_env()), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    export = tmp_path / "ck" / "global_step_1" / "huggingface"
    meta = json.loads((export.parent / "lora_train_meta.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merge_lora_export(export, tmp_path / "merged", meta["lora_alpha"],
                                                                    meta["r"]), dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = sid_token_ids(AutoTokenizer.from_pretrained(base))
    other = [i for i in range(plain.lm_head.weight.shape[0]) if i not in set(ids)]
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.lm_head.weight):
        a, b = get(plain).detach(), get(merged).detach()
        assert not torch.allclose(a[ids], b[ids])
        assert torch.equal(a[other], b[other])


@pytest.mark.parametrize("hidden", [64, 256, 320])
def test_tiny_models_of_any_width_run_a_forward_pass(hidden):
    """Heads scale with the width (hidden 320: 5 heads); the key/value heads must divide them."""
    import torch

    from conrec_verl.model_builder import build_tiny_model, build_tokenizer

    tok = build_tokenizer((4, 4), [])
    model = build_tiny_model(tok, num_layers=1, hidden_size=hidden)
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[-1] == model.config.vocab_size


def test_a_packed_sft_micro_batch_keeps_its_rows_apart(tiny_model_dir):
    """verl's SFT trainer (``use_remove_padding``, the recipes' dynamic micro-batches) packs rows
    into one sequence and calls the model with ``position_ids`` restarting at 0 per row, no
    attention mask and ``use_cache=False``. With ``sdpa`` on a CPU there is no varlen kernel: the
    rows stay apart only because transformers turns the restarting positions into a block-diagonal
    mask. If that ever stops, every row would attend to the rows packed before it in training but
    not at inference; this is the guard."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    rows = [tok(t, return_tensors="pt").input_ids[0] for t in _prompt_texts()[:3]]
    with torch.no_grad():
        alone = [model(r[None], use_cache=False).logits[0] for r in rows]
        packed_ids = torch.cat(rows)[None]
        positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
        packed = model(packed_ids, position_ids=positions, use_cache=False).logits[0]
        # the counterfactual the test must be able to see: without restarting positions the later
        # rows come out different (they read the earlier rows, at shifted positions)
        unmasked = model(packed_ids, use_cache=False).logits[0]
    start = 0
    for r, ref in zip(rows, alone):
        torch.testing.assert_close(packed[start:start + len(r)], ref, atol=1e-5, rtol=1e-5)
        start += len(r)
    assert (unmasked[len(rows[0]):] - torch.cat(alone[1:])).abs().max() > 1e-3


@pytest.mark.parametrize("hidden,d", [(64, 8), (16, 32)])
def test_codebook_sid_init_puts_each_sid_row_along_its_codeword(tmp_path, hidden, d):
    """sid_init=codebook: SID rows are s * M codeword. With h >= d, M keeps lengths, so inner
    products are the codewords' times s^2 and an item's summed SID rows keep the geometry of its
    reconstructed embedding; with h < d, M is a seeded projection. The rows have the other rows'
    spread, every other row is the random build's, and the codebook must match the SID sizes."""
    import numpy as np

    from conrec_verl.core.sid import Codebook, SidTokenMap
    from conrec_verl.model_builder import ModelBuildError, save_tiny_model

    rng = np.random.default_rng(3)
    sizes = (4, 3)
    book = Codebook([rng.normal(size=(n, d)).astype(np.float32) for n in sizes])
    save_tiny_model(tmp_path / "rand", sizes, hidden_size=hidden, seed=5)
    save_tiny_model(tmp_path / "book", sizes, hidden_size=hidden, seed=5, sid_init="codebook", codebook=book)
    rand = AutoModelForCausalLM.from_pretrained(tmp_path / "rand").get_input_embeddings().weight.detach().double()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "book")
    tok = AutoTokenizer.from_pretrained(tmp_path / "book")
    flat = [t for level in SidTokenMap(tok, sizes).ids for t in level]
    emb = model.get_input_embeddings().weight.detach().double()
    others = [i for i in range(emb.shape[0]) if i not in set(flat)]
    assert torch.equal(emb[others], rand[others])
    assert emb[flat].std().item() == pytest.approx(emb[others].std().item(), rel=1e-5)  # the other rows' spread
    rows, words = emb[flat].numpy(), np.concatenate(book.codewords).astype(np.float64)
    assert not np.allclose(rows, rand[flat].numpy())
    if hidden >= d:
        c = (rows * rows).sum() / (words * words).sum()  # s^2
        np.testing.assert_allclose(rows @ rows.T, c * (words @ words.T), rtol=1e-4, atol=1e-7)
        # an item (1, 2): the sum of its two SID rows has the length of its reconstruction, times s
        item = rows[1] + rows[sizes[0] + 2]
        recon = book.codewords[0][1].astype(np.float64) + book.codewords[1][2]
        assert np.linalg.norm(item) == pytest.approx(np.sqrt(c) * np.linalg.norm(recon), rel=1e-4)
    else:  # a projection: lengths shrink (never grow) and the same seed gives the same rows
        c = (rows * rows).sum() / (words * words).sum()
        lengths = np.linalg.norm(rows, axis=1) / (np.sqrt(c) * np.linalg.norm(words, axis=1))
        assert lengths.std() > 1e-3  # not a length-keeping map: the ratios vary
        save_tiny_model(tmp_path / "again", sizes, hidden_size=hidden, seed=5, sid_init="codebook", codebook=book)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").get_input_embeddings().weight.detach()
        assert torch.equal(again.double(), emb)
    with pytest.raises(ModelBuildError, match="needs the build's codebook"):
        save_tiny_model(tmp_path / "x", sizes, sid_init="codebook")
    with pytest.raises(ModelBuildError, match="differ from the SID sizes"):
        save_tiny_model(tmp_path / "y", (4, 4), sid_init="codebook", codebook=book)
    with pytest.raises(ModelBuildError, match="sid_init must be one of"):
        save_tiny_model(tmp_path / "z", sizes, sid_init="zeros")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_codebook_sid_init_keeps_random_rows_for_zero_codewords_and_fills_an_untied_head():
    """The disambiguation level of sid.collisions=extra_level has zero codewords: its tokens keep
    their random rows (a zero row would make a collision group's items identical). An untied
    output matrix gets the same directions at its own spread."""
    import numpy as np
    from transformers import Qwen3Config

    from conrec_verl.core.sid import Codebook, SidTokenMap
    from conrec_verl.model_builder import build_tokenizer, init_sid_embeddings_from_codebook

    rng = np.random.default_rng(4)
    sizes = (4, 3, 2)
    book = Codebook([rng.normal(size=(4, 8)), rng.normal(size=(3, 8)), np.zeros((2, 8))])
    tok = build_tokenizer(sizes)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)  # another spread than the input rows
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    info = init_sid_embeddings_from_codebook(model, tok, book, seed=1)
    ids = SidTokenMap(tok, sizes).ids
    live, dead = ids[0] + ids[1], ids[2]
    emb, out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    assert info["rows"] == 7 and info["kept_random"] == 2
    assert torch.equal(emb[dead], before_in[dead]) and torch.equal(out[dead], before_out[dead])
    assert not torch.allclose(emb[live], before_in[live])
    others = [i for i in range(len(tok)) if i not in set(live + dead)]
    assert out[live].std().item() == pytest.approx(out[others].std().item(), rel=1e-4)
    assert emb[live].std().item() == pytest.approx(emb[others].std().item(), rel=1e-4)
    ratio = out[live] / emb[live]  # the same rows, another scale
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
