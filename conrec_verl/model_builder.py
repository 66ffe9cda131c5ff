"""Build the tiny model/tokenizer the tests and the CPU recipes use, or add SID tokens to any HF model.

Two entry points:

* :func:`save_tiny_model` -- a randomly initialised Qwen3 causal LM (a few layers) and a
  tokenizer that knows every semantic-ID token (``<a_0>`` ...), the prompt words, a chat
  template, and encodes ``"\\n"`` as one token. Saved as a normal Hugging Face folder, loadable by
  ``AutoTokenizer`` / ``AutoModelForCausalLM`` and therefore by verl.
* :func:`extend_model_with_sid_tokens` -- take any existing HF model folder (e.g. a user's Qwen3
  checkpoint), add the SID tokens and resize the embeddings.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here on the prompt texts, so no
input can be silently dropped (every byte has a token); SID and chat tokens are added tokens.
transformers 5.x rebuilds tokenizers of ``qwen2``/``qwen3`` model types as a byte-level BPE
``Qwen2Tokenizer`` regardless of ``tokenizer_class`` -- which is exactly what this tokenizer is, so
the round trip through ``AutoTokenizer.from_pretrained`` is lossless (a test asserts it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from conrec_verl.core.prompts import vocabulary_corpus
from conrec_verl.core.sid import Codebook, CodebookError, SidTokenMap, all_sid_tokens
from conrec_verl.io_utils import atomic_dir

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"


class MissingSidTokensError(ValueError):
    """A tokenizer/model folder lacks the semantic-ID tokens a codebook needs."""


def _training_corpus(extra_texts: Iterable[str]) -> list[str]:
    base = vocabulary_corpus()
    # digits, punctuation and common words so free text (titles, numbers) tokenises compactly
    base += ["0 1 2 3 4 5 6 7 8 9 10 100 1000", "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
             "a b c d e f g h i j k l m n o p q r s t u v w x y z", ". , : ; ! ? ( ) [ ] - ' \" / &",
             "user assistant system item items title"]
    return base + [t for t in extra_texts if isinstance(t, str) and t]


def build_tokenizer(sid_sizes: Sequence[int], extra_texts: Iterable[str] = (), vocab_size: int = 1024):
    """A ``PreTrainedTokenizerFast`` with byte-level BPE + SID tokens + chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _training_corpus(extra_texts)
    # repeat the fixed prompt texts so their words become single tokens
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in all_sid_tokens(sid_sizes)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def build_tiny_model(tokenizer, num_layers: int = 2, hidden_size: int = 64, num_heads: int | None = None,
                     intermediate_size: int | None = None, seed: int = 0):
    """A randomly initialised Qwen3 causal LM sized for CPU tests and small from-scratch runs.

    Defaults scale with ``hidden_size``: ``num_heads = max(4, hidden_size // 64)`` (head dim 64 once
    the model is wide enough) and ``intermediate_size = 2 * hidden_size`` (the 2 x 64 test model:
    4 heads, 128)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    num_heads = int(num_heads) if num_heads else max(4, hidden_size // 64)
    intermediate_size = int(intermediate_size) if intermediate_size else 2 * hidden_size
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of the {num_heads} attention heads")
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if num_heads % 2 == 0 else num_heads,  # must divide num_heads
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        torch_dtype="float32",
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


SID_INITS = ("random", "codebook")


def init_sid_embeddings_from_codebook(model, tokenizer, codebook: Codebook, seed: int = 0) -> dict:
    """Give every SID token's embedding row the direction of its codeword (``sid_init: codebook``).

    Token ``(l, c)`` gets ``s * M @ codewords[l][c]``, with ``M`` a fixed random map (seeded) from
    the codebook's width ``d`` to the model's ``h`` and one scale ``s`` for every level, chosen so
    that the SID rows have the standard deviation of the model's other rows. When ``h >= d`` (the
    tiny profiles: 32 -> 64) ``M`` has orthonormal columns and keeps every length and inner product
    (times ``s``); residual quantisation makes an item's embedding about the sum of its codewords,
    so the sum of an item's SID token rows is then about ``s * M @ e_item``: items the log says are
    alike start close, where random rows know nothing. When ``h < d``, ``M`` is an orthonormal
    projection and keeps them only approximately. A codeword of length zero (the disambiguation
    level of ``sid.collisions: extra_level`` has no geometry) keeps its token's random row, so the
    items of a collision group stay apart. Output rows follow when the model ties them to the
    input rows; an untied output matrix gets the same rows at its own scale. Returns
    ``{"rows": rows set, "kept_random": rows left random, "scale": s}``."""
    import numpy as np
    import torch

    sizes = [int(n) for n in codebook.sizes]
    ids = SidTokenMap(tokenizer, sizes).ids
    d = int(codebook.codewords[0].shape[1])
    emb = model.get_input_embeddings().weight
    h = int(emb.shape[1])
    gen = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(max(h, d), min(h, d), generator=gen, dtype=torch.float64))
    m = q if h >= d else q.T  # (h, d)
    words = torch.from_numpy(np.concatenate(codebook.codewords).astype(np.float64))  # (sum sizes, d)
    live = words.norm(dim=1) > 0
    rows = (words @ m.T)[live]  # (live codewords, h)
    flat = [tid for level in ids for tid in level]
    target = [tid for tid, ok in zip(flat, live.tolist()) if ok]
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[flat] = False
    out = model.get_output_embeddings()
    tied = out is None or out.weight.data_ptr() == emb.data_ptr()
    spread = float(rows.std()) if len(target) > 1 else 0.0

    def fill(weight) -> float:
        scale = float(weight[others].double().std()) / spread if spread > 0 else 0.0
        if target and scale > 0:
            weight[target] = (rows * scale).to(weight.dtype)
        return scale

    with torch.no_grad():
        scale = fill(emb)
        if not tied:
            fill(out.weight)
    return {"rows": len(target) if scale > 0 else 0, "kept_random": len(flat) - (len(target) if scale > 0 else 0),
            "scale": scale}


def save_tiny_model(out_dir: str | os.PathLike, sid_sizes: Sequence[int], extra_texts: Iterable[str] = (),
                    num_layers: int = 2, hidden_size: int = 64, seed: int = 0, sid_init: str = "random",
                    codebook: Codebook | None = None) -> Path:
    """Build and save the tiny model + tokenizer as one HF folder (atomically). ``sid_init``:
    ``random`` (every row alike) or ``codebook`` (:func:`init_sid_embeddings_from_codebook`; needs
    ``codebook``)."""
    if sid_init not in SID_INITS:
        raise ModelBuildError(f"sid_init must be one of {', '.join(SID_INITS)}; got {sid_init!r}")
    if sid_init == "codebook" and codebook is None:
        raise ModelBuildError("sid_init=codebook needs the build's codebook (conrec-model tiny --data-dir)")
    if sid_init == "codebook" and list(codebook.sizes) != [int(n) for n in sid_sizes]:
        raise ModelBuildError(f"codebook sizes {list(codebook.sizes)} differ from the SID sizes {list(sid_sizes)}")
    tokenizer = build_tokenizer(sid_sizes, extra_texts)
    model = build_tiny_model(tokenizer, num_layers=num_layers, hidden_size=hidden_size, seed=seed)
    if sid_init == "codebook":
        init_sid_embeddings_from_codebook(model, tokenizer, codebook, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    return _save(model, tokenizer, out_dir, sid_sizes)


def _save(model, tokenizer, out_dir, sid_sizes) -> Path:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "conrec_sid.json").write_text(json.dumps({"sid_sizes": list(map(int, sid_sizes))}))
    return Path(out_dir)


def missing_sid_tokens(tokenizer, sid_sizes: Sequence[int]) -> list[str]:
    """SID tokens that ``tokenizer`` does not encode as one known token."""
    vocab = tokenizer.get_vocab()
    return [t for t in all_sid_tokens(sid_sizes) if t not in vocab]


def check_sid_tokens(tokenizer, sid_sizes: Sequence[int], where: str = "tokenizer") -> None:
    """Raise :class:`MissingSidTokensError` naming what is missing and how to fix it."""
    missing = missing_sid_tokens(tokenizer, sid_sizes)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingSidTokensError(
            f"{where} lacks {len(missing)} of {sum(sid_sizes)} semantic-ID tokens for codebook sizes "
            f"{list(sid_sizes)} (e.g. {shown}). Add them with "
            f"`python -m conrec_verl.model_builder extend --model <path> --sid-sizes "
            f"{','.join(map(str, sid_sizes))} --out <new folder>`."
        )


def extend_model_with_sid_tokens(model_path: str | os.PathLike, out_dir: str | os.PathLike,
                                 sid_sizes: Sequence[int]) -> Path:
    """Copy an HF model folder, adding the SID tokens and resizing the embeddings.

    New embedding rows are initialised to the mean of the existing ones (transformers' default).
    """
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_path).is_dir():
        raise ModelBuildError(f"model folder not found: {model_path}")
    if not (Path(model_path) / "config.json").is_file():
        raise ModelBuildError(f"{model_path} is not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    present = sid_sizes_in(tokenizer)
    if present and any(len(present) > len(sid_sizes) or present[i] > int(sid_sizes[i]) for i in range(len(present))):
        raise ModelBuildError(f"{model_path} already has SID tokens for sizes {list(present)}, more than the requested "
                              f"{list(sid_sizes)}: its conrec_sid.json would contradict its tokenizer; extend the "
                              "original model or pass the codebook's sizes")
    missing = missing_sid_tokens(tokenizer, sid_sizes)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in missing])
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    return _save(model, tokenizer, out_dir, sid_sizes)


class ModelBuildError(ValueError):
    """A model folder or option conrec-model cannot use; the message says what to change."""


def sid_sizes_in(tokenizer) -> tuple[int, ...]:
    """Per level, 1 + the largest SID code the tokenizer has a token for (``()`` for none)."""
    from conrec_verl.core.sid import LEVEL_LETTERS, SID_TOKEN_RE

    top: dict[int, int] = {}
    for token in tokenizer.get_vocab():
        m = SID_TOKEN_RE.fullmatch(token)
        if m:
            level = LEVEL_LETTERS.index(m.group(1))
            top[level] = max(top.get(level, 0), int(m.group(2)) + 1)
    return tuple(top.get(level, 0) for level in range(max(top) + 1)) if top else ()


def _refuse_existing(out, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise ModelBuildError(f"{out} exists; pass --overwrite to replace it")


PEFT_PREFIX = "base_model.model."


def sid_token_ids(tokenizer) -> list[int]:
    """Ids of every SID token (``<a_0>``, ``<b_17>``, ...) in a tokenizer's vocabulary, sorted."""
    from conrec_verl.core.sid import SID_TOKEN_RE

    return sorted(i for t, i in tokenizer.get_vocab().items() if SID_TOKEN_RE.fullmatch(t))


def init_sid_lora_adapter(model_dir: str | os.PathLike, out_dir: str | os.PathLike, r: int = 16,
                          lora_alpha: float = 32, target_modules: str | list[str] = "all-linear") -> Path:
    """A fresh LoRA adapter for ``model_dir`` whose SID token rows train too.

    LoRA on the linear layers alone never changes the input embeddings or the ``lm_head`` rows of
    the SID tokens, which :func:`extend_model_with_sid_tokens` added at a mean initialisation: the
    model could not tell SIDs apart. PEFT's ``trainable_token_indices`` makes exactly those rows
    trainable, in the input embeddings and in the ``lm_head`` (models with tied embeddings are
    refused: verl's FSDP2 cannot load the aliased adapter). verl's SFT
    trainer loads the adapter with ``model.lora_adapter_path=<out_dir>`` (``PeftModel.from_pretrained(...,
    is_trainable=True)``); :func:`merge_lora_export` merges the trained rows back."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = sid_token_ids(tokenizer)
    if not ids:
        raise ValueError(f"{model_dir}: the tokenizer has no SID tokens (build it with conrec-model extend)")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if getattr(model.config, "tie_word_embeddings", False):
        # PEFT then wraps the tied lm_head with the same token adapter, and verl 0.9.1's FSDP2 loader
        # fails on the aliased parameter ("mixed torch.Tensor and DTensor")
        raise ValueError(f"{model_dir}: the model ties its input embeddings and lm_head; a LoRA adapter with trainable "
                         "SID rows cannot be loaded by verl's FSDP2 then. Fine-tune fully (model.lora_rank=0) or "
                         "untie the embeddings first (Qwen3-8B and larger are untied)")
    tokens = {"embed_tokens": ids, "lm_head": ids}
    peft_model = get_peft_model(model, LoraConfig(r=int(r), lora_alpha=float(lora_alpha), target_modules=target_modules,
                                                  trainable_token_indices=tokens, task_type="CAUSAL_LM"))
    with atomic_dir(Path(out_dir)) as tmp:
        peft_model.save_pretrained(str(tmp))
    return Path(out_dir)


def merge_lora_export(export_dir: str | os.PathLike, out_dir: str | os.PathLike, lora_alpha: float, r: int) -> Path:
    """Turn verl's LoRA SFT export (a PEFT-wrapped state dict: ``base_model.model.*``,
    ``*.base_layer.weight``, ``*.lora_A/B.default.weight``) into a plain HF model folder with the
    adapters merged: ``W = W0 + (lora_alpha / r) * B @ A``; trained SID token rows
    (``*.token_adapter.trainable_tokens_delta.default``, :func:`init_sid_lora_adapter`) replace
    those rows of the embedding / ``lm_head``.

    ``AutoModelForCausalLM`` would otherwise load such an export with every weight *missing* and
    freshly initialised (a warning only) -- the next pipeline stage would start from noise.
    """
    import torch
    from safetensors.torch import load_file, save_file

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    files = sorted(export_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{export_dir}: no .safetensors weights to merge")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    scale = float(lora_alpha) / float(r)
    plain: dict[str, torch.Tensor] = {}
    token_ids = None
    for key, tensor in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".trainable_tokens_delta." in name:
            continue
        if ".token_adapter.base_layer." in name:  # trainable SID token rows (init_sid_lora_adapter)
            module, _, leaf = name.partition(".token_adapter.base_layer.")
            delta = state.get(f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta.default")
            tensor = tensor.clone()
            if delta is not None:
                if token_ids is None:
                    from transformers import AutoTokenizer

                    token_ids = torch.tensor(sid_token_ids(AutoTokenizer.from_pretrained(export_dir)))
                if len(token_ids) != delta.shape[0]:
                    raise ValueError(f"{export_dir}: {delta.shape[0]} trained token rows for {module} but the "
                                     f"tokenizer has {len(token_ids)} SID tokens")
                tensor[token_ids] = delta.to(tensor.dtype)  # the trained rows replace the base rows
            plain[f"{module}.{leaf}"] = tensor.contiguous()
            continue
        if ".base_layer." in name:
            module, _, leaf = name.partition(".base_layer.")
            name = f"{module}.{leaf}"
            if leaf == "weight":
                a = state.get(f"{PEFT_PREFIX}{module}.lora_A.default.weight")
                b = state.get(f"{PEFT_PREFIX}{module}.lora_B.default.weight")
                if a is not None and b is not None:
                    merged = tensor.float() + scale * (b.float() @ a.float())
                    tensor = merged.to(tensor.dtype)
        plain[name] = tensor.contiguous().clone()  # tied weights share storage; safetensors refuses that
    with atomic_dir(out_dir) as tmp:
        for item in export_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
                (tmp / item.name).write_bytes(item.read_bytes())
        save_file(plain, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _sizes_arg(value: str) -> list[int]:
    try:
        sizes = [int(x) for x in value.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--sid-sizes must look like 32,32,32; got {value!r}") from exc
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sid-sizes must be positive integers; got {value!r}")
    return sizes


def _texts_from_data_dir(data_dir: Path) -> list[str]:
    """User texts of the SFT sets in a data_prep folder (so titles tokenise compactly)."""
    texts: list[str] = []
    sft = data_dir / "sft"
    if sft.is_dir():
        import pyarrow.parquet as pq

        for f in sorted(sft.glob("*.parquet")):
            table = pq.read_table(f, columns=["messages"])
            for messages in table.column("messages").to_pylist()[:20000]:
                texts.extend(m["content"] for m in messages if m.get("content"))
    return texts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conrec-model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    tiny = sub.add_parser("tiny", help="build a tiny random Qwen3 + tokenizer with SID tokens")
    tiny.add_argument("--out", required=True)
    group = tiny.add_mutually_exclusive_group(required=True)
    group.add_argument("--sid-sizes", type=_sizes_arg, help="codebook sizes per level, e.g. 32,32,32")
    group.add_argument("--data-dir", type=Path, help="a data_prep folder: sizes from its codebook, words from its texts")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--sid-init", choices=SID_INITS, default="random",
                      help="SID token rows: random, or codebook (each row its codeword's direction; needs --data-dir)")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ext = sub.add_parser("extend", help="add SID tokens to an existing HF model folder")
    ext.add_argument("--model", required=True)
    ext.add_argument("--out", required=True)
    ext.add_argument("--sid-sizes", type=_sizes_arg, required=True)
    ext.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    lora = sub.add_parser("lora-init", help="a fresh LoRA adapter whose SID token rows train too "
                                            "(verl SFT: model.lora_adapter_path=<out>)")
    lora.add_argument("--model", required=True)
    lora.add_argument("--out", required=True)
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--alpha", type=float, default=32)
    lora.add_argument("--target-modules", default="all-linear")
    args = parser.parse_args(argv)
    try:
        _run_cli(parser, args)
    except (ModelBuildError, MissingSidTokensError, CodebookError, OSError) as exc:
        print(f"conrec-model: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_cli(parser, args) -> None:
    if args.cmd in ("tiny", "extend"):
        _refuse_existing(args.out, args.overwrite)
    if args.cmd == "tiny":
        texts: list[str] = []
        sizes, book = args.sid_sizes, None
        if args.data_dir is not None:
            book = Codebook.load(args.data_dir / "codebook.npz")
            sizes = list(book.sizes)
            texts = _texts_from_data_dir(args.data_dir)
        elif args.sid_init == "codebook":
            parser.error("--sid-init codebook needs --data-dir (the build's codebook.npz)")
        out = save_tiny_model(args.out, sizes, texts, num_layers=args.layers, hidden_size=args.hidden, seed=args.seed,
                              sid_init=args.sid_init, codebook=book)
        print(f"tiny model with SID sizes {sizes} ({args.sid_init} SID rows) written to {out}")
    elif args.cmd == "extend":
        out = extend_model_with_sid_tokens(args.model, args.out, args.sid_sizes)
        print(f"{args.model} + SID tokens {args.sid_sizes} written to {out}")
    elif args.cmd == "lora-init":
        out = init_sid_lora_adapter(args.model, args.out, args.rank, args.alpha, args.target_modules)
        print(f"LoRA adapter (rank {args.rank}, SID token rows trainable) for {args.model} written to {out}")
    else:
        parser.print_help()
        raise SystemExit(2)


if __name__ == "__main__":
    main()
