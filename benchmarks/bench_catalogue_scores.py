"""Benchmark: exact catalogue scores level by level down the SID trie vs item by item, same run.

``conrec_verl.constrained.catalog_log_probs`` gives every item's exact log-probability after a
prompt (what ``conrec-eval --ensemble`` ranks by). It scores each *distinct* SID prefix once; the
way it replaced forced every item's own tokens after the prompt (``score_sids`` over the whole
catalogue, 256 items per forward pass). This script times both on the same prompts and model,
prints the decoded tokens per prompt, the wall time and speed-up, and the largest difference
between the two score matrices (they must agree: exit 1 when it exceeds ``--tolerance``).

    python benchmarks/bench_catalogue_scores.py                          # tiny model, 1,642 items
    python benchmarks/bench_catalogue_scores.py --model runs/ml100k_ship/models/sft_warmup \\
        --data runs/ml100k_ship/data --prompts 32                         # a trained model, its build

Without ``--model`` it builds a tiny random Qwen3 (``--layers`` x ``--hidden``) with SID tokens of
``--sizes`` and a random catalogue of ``--items`` items (MovieLens-100K's count by default). With
``--data`` the catalogue and prompts are the build's (its test rows in context 3, 384 tokens).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def item_by_item(model, tokenizer, prompts, trie, token_map, chunk: int) -> np.ndarray:
    """The replaced way: each item's own SID tokens forced after the prompt (``score_sids``)."""
    from conrec_verl.constrained import score_sids

    sids = list(trie.iter_sids())
    return np.asarray([score_sids(model, tokenizer, p, sids, None, token_map, chunk=chunk) for p in prompts],
                      dtype=np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: a tiny random model built here)")
    p.add_argument("--data", default=None, help="with --model: the build's data folder (catalogue and prompts)")
    p.add_argument("--sizes", default="16,16,16")
    p.add_argument("--items", type=int, default=1642)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-items", type=int, default=40, help="history SIDs per synthetic prompt")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-3)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conrec_verl.constrained import SidTokenMap, catalog_log_probs
    from conrec_verl.core.sid_trie import SidTrie
    from conrec_verl.model_builder import save_tiny_model

    torch.manual_seed(args.seed)
    rnd = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            if not args.model:
                p.error("--data needs --model (a model trained on that build)")
            from conrec_verl.core.eval_data import load_eval_data
            from conrec_verl.evaluation.harness import render_prompts

            data = load_eval_data(args.data)
            trie, sizes = data.trie(), data.codebook.sizes
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            prompts = render_prompts(data, tokenizer, 3, 384)[0][: args.prompts]
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_constrained_decoding import random_catalogue

            sizes = tuple(int(x) for x in args.sizes.split(","))
            sids, prompts = random_catalogue(sizes, args.items, args.prompts, args.prompt_items, rnd)
            trie = SidTrie(sids)
        path = args.model or save_tiny_model(f"{tmp}/m", sizes, num_layers=args.layers, hidden_size=args.hidden,
                                             seed=args.seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        token_map = SidTokenMap(tokenizer, sizes)
        codes = np.asarray(list(trie.iter_sids()))
        levels = codes.shape[1]
        by_level = sum(len(np.unique(codes[:, :lv], axis=0)) * lv for lv in range(1, levels))
        print(f"machine: {platform.machine()} {platform.system()}, torch threads {torch.get_num_threads()}; "
              f"{len(codes)} items, {levels} levels, {len(prompts)} prompts")
        print(f"decoded tokens per prompt after the prompt: item by item {len(codes) * (levels - 1)}, "
              f"level by level {by_level}")
        t0 = time.perf_counter()
        old = item_by_item(model, tokenizer, prompts, trie, token_map, args.chunk)
        t_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = catalog_log_probs(model, tokenizer, prompts, trie, token_map, chunk=args.chunk)
        t_new = time.perf_counter() - t0
    diff = float(np.abs(old - new).max())
    print(f"item by item:   {t_old:8.2f} s ({t_old / len(prompts) * 1000:.0f} ms per prompt)")
    print(f"level by level: {t_new:8.2f} s ({t_new / len(prompts) * 1000:.0f} ms per prompt)")
    print(f"speed-up {t_old / t_new:.2f}x; largest |difference| of the scores {diff:.2e} (tolerance {args.tolerance})")
    same_top = np.mean([set(np.argsort(-o)[:20]) == set(np.argsort(-n)[:20]) for o, n in zip(old, new)])
    print(f"prompts whose top 20 items agree: {same_top:.3f}")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
