"""Benchmark the CoNRec reward.

1. Pure scorer throughput (``conrec_verl.core.scoring.Scorer``) on one core; target >= 20k responses/s.
2. Per-response cost of the ``conrec`` reward-loop manager vs verl's ``naive`` manager (with verl's
   built-in GSM8K rule scorer) on the same batch of decoded trajectories, measured in the same run;
   target ratio <= 1.5; and the naive manager with ``conrec_verl.plugins.compute_score`` (the
   custom-function route) against the same baseline, target ratio <= 1.5.

    python benchmarks/bench_reward.py [--responses 50000] [--rows 4096] [--check]

``--check`` exits non-zero when a target is missed. Everything is synthetic and local (a random
codebook of 3 x 256 codewords, 64-d; ground truths with 8 GTS and 16 FPS items; 8 responses per
ground truth, 10% of them invalid text).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from conrec_verl.core.reward import RewardConfig  # noqa: E402
from conrec_verl.core.scoring import Scorer  # noqa: E402
from conrec_verl.core.sid import Codebook, format_sid  # noqa: E402

SIZES = (256, 256, 256)
DIM = 64


def make_workload(n_responses: int, seed: int = 0, group: int = 8):
    rng = np.random.default_rng(seed)
    book = Codebook([rng.normal(size=(s, DIM)).astype(np.float32) for s in SIZES])

    def rsid():
        return format_sid([int(rng.integers(0, s)) for s in SIZES])

    texts, gts = [], []
    for g in range((n_responses + group - 1) // group):
        gt = json.dumps({"future_neg": [rsid() for _ in range(5)], "swing": [rsid() for _ in range(3)],
                         "future_pos": [rsid() for _ in range(16)], "next_neg": None})
        for _ in range(group):
            texts.append("I cannot tell." if rng.random() < 0.1 else rsid())
            gts.append(gt)
    return book, texts[:n_responses], gts[:n_responses]


def bench_scorer(book, texts, gts, variant="collab", repeats=3):
    """Best of ``repeats`` runs, each with a fresh scorer (cold caches)."""
    best = float("inf")
    for _ in range(repeats):
        scorer = Scorer(book, RewardConfig(variant=variant))
        t0 = time.perf_counter()
        scorer.score_many(texts, gts)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def bench_managers(n_rows: int, tmp: str):
    import torch
    from hydra import compose, initialize_config_dir

    import verl
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    import conrec_verl.plugins.reward_manager  # noqa: F401
    from conrec_verl.model_builder import build_tokenizer

    book, texts, gts = make_workload(n_rows, seed=1)
    book.save(os.path.join(tmp, "codebook.npz"))
    tok = build_tokenizer(SIZES)
    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

    def cfg(*overrides):
        with initialize_config_dir(config_dir=cfg_dir, version_base=None):
            return compose(config_name="ppo_trainer", overrides=list(overrides))

    pad = tok.pad_token_id
    resp_len = 16
    prompt = tok("predict", add_special_tokens=False)["input_ids"]

    def rows(data_source, texts, gts):
        out = []
        for text, gt in zip(texts, gts):
            ids = tok(text, add_special_tokens=False)["input_ids"][: resp_len - 1] + [tok.eos_token_id]
            responses = torch.full((1, resp_len), pad, dtype=torch.long)
            responses[0, : len(ids)] = torch.tensor(ids)
            attn = torch.zeros((1, len(prompt) + resp_len), dtype=torch.long)
            attn[0, : len(prompt) + len(ids)] = 1
            out.append(DataProto.from_dict(
                tensors={"prompts": torch.tensor([prompt]), "responses": responses, "attention_mask": attn},
                non_tensors={"data_source": np.array([data_source], dtype=object),
                             "reward_model": np.array([{"style": "rule", "ground_truth": gt}], dtype=object),
                             "extra_info": np.array([{"index": 0}], dtype=object)}))
        return out

    def timed(manager, batch):
        async def all_rows():
            return await asyncio.gather(*(manager.run_single(d) for d in batch))

        manager.loop.run_until_complete(all_rows())  # warm-up (thread pool, caches of the first pass)
        t0 = time.perf_counter()
        results = manager.loop.run_until_complete(all_rows())
        dt = time.perf_counter() - t0
        assert len(results) == len(batch)
        return dt / len(batch)

    conrec = load_reward_manager(cfg("reward.reward_manager.name=conrec",
                                     f"+reward.reward_kwargs.codebook_path={tmp}/codebook.npz"), tok)
    naive = load_reward_manager(cfg("reward.reward_manager.name=naive"), tok)
    naive_custom = load_reward_manager(cfg(
        "reward.custom_reward_function.path=pkg://conrec_verl.plugins.compute_score",
        f"+reward.custom_reward_function.reward_kwargs.codebook_path={tmp}/codebook.npz"), tok)

    gsm_gts = ["42"] * len(texts)
    gsm_texts = [f"The answer is #### {t}" for t in texts]  # same tokens to decode, plus a few
    t_conrec = timed(conrec, rows("conrec", texts, gts))
    t_naive = timed(naive, rows("openai/gsm8k", gsm_texts, gsm_gts))
    t_custom = timed(naive_custom, rows("conrec", texts, gts))
    return t_conrec, t_naive, t_custom


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--responses", type=int, default=50_000)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)

    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
        pinned = "pinned to one core"
    except (AttributeError, OSError):
        pinned = "not pinned"
    book, texts, gts = make_workload(args.responses)
    print(f"pure scorer ({pinned}, {args.responses} responses, 8 per ground truth, 10% invalid, "
          f"cold caches, best of 3; load average {os.getloadavg()[0]:.1f}):")
    ok = True
    for variant in ("collab", "hierarchical"):
        rate = bench_scorer(book, texts, gts, variant)
        print(f"  {variant:13s} {rate:10,.0f} responses/s   (target >= 20,000; ratio to target {rate / 20000:.2f})")
        ok &= rate >= 20_000

    with tempfile.TemporaryDirectory() as tmp:
        t_conrec, t_naive, t_custom = bench_managers(args.rows, tmp)
    ratio = t_conrec / t_naive
    print(f"reward-loop managers, per response over {args.rows} trajectories (same run):")
    print(f"  naive + verl gsm8k rule    {t_naive * 1e6:9.1f} us  (baseline)")
    print(f"  conrec                     {t_conrec * 1e6:9.1f} us  ratio {ratio:.2f}x (target <= 1.5x)")
    print(f"  naive + conrec compute_score {t_custom * 1e6:7.1f} us  ratio {t_custom / t_naive:.2f}x (target <= 1.5x)")
    ok &= ratio <= 1.5 and t_custom / t_naive <= 1.5
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
