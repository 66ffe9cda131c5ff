"""What GRPO rollouts spell with and without the item trie: the share of non-item outputs before/after.

    python benchmarks/rollout_non_items.py --data runs/ml100k/data --model runs/ml100k/models/sft_warmup \\
        [--rows 256] [--n 8] [--temperature 1.0] [--max-new-tokens 6] [--seed 0]

Samples ``--n`` rollouts for each of ``--rows`` training prompts (``rl/train.parquet``, a seeded
draw, each row in the context data_prep assigned it) with the ``hf`` rollout backend's own
generator (:class:`conrec_verl.runtime.hf_rollout.HFGenerator`, the recipe's sampling settings),
once unconstrained and once with the item trie the recipes turn on
(``engine_kwargs.hf.logits_processor``: :func:`conrec_verl.constrained.rollout_logits_processor`).
Each output is classed by the reward's own scorer (``item_map: auto``): no SID (invalid), a SID that
is no item of the build (non-item: the format penalty) or an item; the mean reward is the reward's.
Prints one table and exits 1 when a constrained rollout is not an item (the trie failed).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np


def sample_rows(path: Path, rows: int, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["prompt", "reward_model"]).to_pylist()
    if not table:
        raise ValueError(f"{path}: no rows")
    picked = sorted(random.Random(seed).sample(range(len(table)), min(rows, len(table))))
    return [table[i] for i in picked]


def classify(scorer, texts: list[str], ground_truths: list[str]) -> dict[str, float]:
    """Shares of invalid / non-item / item outputs and the mean reward, by the reward's scorer."""
    kinds = {"invalid": 0, "non_item": 0, "item": 0}
    rewards = []
    for text, gt in zip(texts, ground_truths):
        res = scorer.score(text, gt)
        kinds["non_item" if res.non_item else ("item" if res.valid else "invalid")] += 1
        rewards.append(res.reward)
    n = max(len(texts), 1)
    return {**{k: v / n for k, v in kinds.items()}, "reward": float(np.mean(rewards)) if rewards else 0.0,
            "outputs": len(texts)}


def rollouts(generator, tokenizer, rows: list[dict], n: int, temperature: float, max_new_tokens: int,
             seed: int, batch: int = 64) -> list[str]:
    from conrec_verl.runtime.hf_rollout import GenerationRequest

    prompts = [tokenizer.apply_chat_template(list(r["prompt"]), add_generation_prompt=True, tokenize=True)
               for r in rows]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    requests = [GenerationRequest(p, max_new_tokens, temperature=temperature) for p in prompts for _ in range(n)]
    texts = []
    for start in range(0, len(requests), batch):
        part = requests[start:start + batch]
        for res in generator.generate(part, seed=seed + start):
            texts.append(tokenizer.decode(res.token_ids, skip_special_tokens=True))
    return texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a data_prep folder (rl/train.parquet, codebook.npz, sid_map.parquet)")
    ap.add_argument("--model", required=True, help="a Hugging Face model folder (e.g. the warm-up SFT export)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--n", type=int, default=8, help="rollouts per prompt (the recipe's rollout.n)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=6, help="the recipe's data.max_response_length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from conrec_verl.constrained import rollout_logits_processor
    from conrec_verl.plugins.compute_score import get_scorer
    from conrec_verl.runtime.hf_rollout import load_generator

    data = Path(args.data)
    for need in ("rl/train.parquet", "codebook.npz", "sid_map.parquet"):
        if not (data / need).is_file():
            print(f"rollout_non_items: {data / need} not found (a data_prep folder is needed)", file=sys.stderr)
            return 2
    if args.rows < 1 or args.n < 1:
        print("rollout_non_items: --rows and --n must be >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rows = sample_rows(data / "rl" / "train.parquet", args.rows, args.seed)
    gts = [r["reward_model"]["ground_truth"] for r in rows for _ in range(args.n)]
    scorer = get_scorer({"codebook_path": str(data / "codebook.npz")})
    free = load_generator(args.model, device="cpu")
    trie = rollout_logits_processor(free.tokenizer, None, sid_map=str(data / "sid_map.parquet"))
    results = {}
    for name, processor in (("unconstrained", None), ("item trie (recipe default)", trie)):
        free.logits_processor = processor
        texts = rollouts(free, free.tokenizer, rows, args.n, args.temperature, args.max_new_tokens, args.seed)
        results[name] = classify(scorer, texts, gts)
    print(f"rollouts of {args.model} on {len(rows)} rows of {data / 'rl' / 'train.parquet'} x {args.n}, "
          f"temperature {args.temperature}, seed {args.seed}\n")
    print("| rollouts | outputs | invalid | non-item | item | mean reward |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['outputs']} | {r['invalid']:.4f} | {r['non_item']:.4f} | {r['item']:.4f} | "
              f"{r['reward']:.4f} |")
    constrained = results["item trie (recipe default)"]
    if constrained["item"] < 1.0:
        print(f"rollout_non_items: {1 - constrained['item']:.4f} of the constrained rollouts are not items",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
