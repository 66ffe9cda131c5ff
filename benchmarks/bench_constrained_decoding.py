"""Benchmark: SID-constrained beam search vs the same beam search without the constraint.

Builds a tiny random Qwen3 with SID tokens (no download), a random SID set of ``--items`` items,
and decodes ``--prompts`` prompts with K = ``--k`` beams both ways. Prints wall time, the overhead
ratio (constrained / unconstrained, measured in the same run), prompts per second, the invalid-SID
rate of each (0 required with the constraint), and checks every constrained result is distinct
and that its scores equal the teacher-forced log-probabilities. It also times Candidate Acc
scoring (``score_sids``: the prompt once, its KV cache shared by the 20 candidates) against the
naive way it replaced (the prompt repeated for every candidate in one forward pass), in the same run,
and checks both give the same log-probabilities. With ``--prompt-items`` near a real history the
prompt dominates and the saving is large.

    python benchmarks/bench_constrained_decoding.py --device cuda
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch


def random_catalogue(sizes, items: int, prompts: int, prompt_items: int, rnd: random.Random):
    """``items`` distinct random SIDs on codes of ``sizes`` and ``prompts`` context-2 prompts, each
    listing ``prompt_items`` of them (also used by ``bench_catalogue_scores.py``)."""
    from conrec_verl.core.prompts import render_history_prompt
    from conrec_verl.core.sid import format_sid

    sids = set()
    while len(sids) < items:
        sids.add(tuple(rnd.randrange(s) for s in sizes))
    pool = sorted(sids)
    return sids, [render_history_prompt(2, neg_all=[format_sid(x) for x in rnd.sample(pool, prompt_items)])
                  for _ in range(prompts)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sizes", default="64,64,64")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-items", type=int, default=20, help="history SIDs per prompt")
    p.add_argument("--candidates", type=int, default=20, help="candidates scored per prompt (Candidate Acc)")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conrec_verl.constrained import constrained_beam_search, score_sids
    from conrec_verl.core.sid_trie import SidTrie
    from conrec_verl.model_builder import save_tiny_model

    sizes = tuple(int(x) for x in args.sizes.split(","))
    rnd = random.Random(args.seed)
    sids, prompts = random_catalogue(sizes, args.items, args.prompts, args.prompt_items, rnd)
    trie = SidTrie(sids)
    pool = sorted(sids)
    with tempfile.TemporaryDirectory() as tmp:
        d = save_tiny_model(f"{tmp}/m", sizes, num_layers=args.layers, hidden_size=args.hidden, seed=args.seed)
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, args.dtype)).to(args.device)
    # warm-up (CUDA context, kernels)
    constrained_beam_search(model, tok, prompts[:2], trie, k=args.k, batch_size=2)

    def timed(constrained: bool):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = constrained_beam_search(model, tok, prompts, trie, k=args.k, batch_size=args.batch_size,
                                      constrained=constrained)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return res, time.perf_counter() - t

    free, t_free = timed(False)
    cons, t_cons = timed(True)
    beams = sum(r.n_beams for r in cons)
    inv_cons = sum(r.n_invalid for r in cons) / beams
    inv_free = sum(r.n_invalid for r in free) / max(1, sum(r.n_beams for r in free))
    ok = all(len(r.sids) == args.k and len(set(r.sids)) == args.k and all(s in trie for s in r.sids) for r in cons)
    check = score_sids(model, tok, prompts[0], cons[0].sids)
    max_diff = max(abs(a - b) for a, b in zip(check, cons[0].scores))
    print(f"device={args.device} dtype={args.dtype} gpu={torch.cuda.get_device_name(0) if args.device.startswith('cuda') else '-'}")
    print(f"items={len(trie)} sizes={sizes} prompts={args.prompts} k={args.k} beams={max(2, args.k)} "
          f"model: {args.layers} layers x {args.hidden}")
    print(f"unconstrained beam search (decodes L+2 tokens): {t_free:.3f} s ({args.prompts / t_free:.1f} prompts/s), "
          f"invalid-SID rate {inv_free:.3f}")
    print(f"constrained beam search:   {t_cons:.3f} s ({args.prompts / t_cons:.1f} prompts/s), "
          f"invalid-SID rate {inv_cons:.3f}")
    print(f"overhead ratio constrained/unconstrained: {t_cons / t_free:.2f}x")
    print(f"all constrained top-K valid and distinct: {ok}; |beam score - teacher-forced log-prob| max {max_diff:.2e}")
    cands = [rnd.sample(pool, args.candidates) for _ in prompts]
    t_naive, t_cached, diff = time_candidate_scoring(model, tok, prompts, cands, args.device)
    print(f"candidate scoring ({args.candidates} per prompt): naive (prompt x candidates) {t_naive:.3f} s, "
          f"shared KV cache {t_cached:.3f} s, {t_naive / t_cached:.1f}x faster; max |log-prob difference| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("candidate scoring with the shared KV cache disagrees with the naive scoring")
    if not ok or inv_cons > 0:
        raise SystemExit("constrained decoding produced an invalid or duplicate SID")


@torch.no_grad()
def naive_score_sids(model, tok, prompt, sids):
    """The scoring Candidate Acc used before: the prompt repeated for every candidate, one forward."""
    from conrec_verl.constrained import SidTokenMap, _encode

    L = len(sids[0])
    token_map = SidTokenMap(tok, [max(int(s[lv]) for s in sids) + 1 for lv in range(L)])
    device = next(model.parameters()).device
    prompt_ids = _encode(tok, [prompt], None, device)["input_ids"][0]
    cand = torch.tensor([[token_map.token_id(lv, c) for lv, c in enumerate(s)] for s in sids], device=device)
    ids = torch.cat([prompt_ids.unsqueeze(0).expand(len(sids), -1), cand], dim=1)
    logits = model(input_ids=ids).logits.float()
    P = prompt_ids.shape[0]
    logp = torch.log_softmax(logits[:, P - 1:P - 1 + L, :], dim=-1)
    return logp.gather(2, cand.unsqueeze(-1)).squeeze(-1).sum(dim=1).tolist()


def time_candidate_scoring(model, tok, prompts, cands, device):
    from conrec_verl.constrained import score_sids

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    naive = [naive_score_sids(model, tok, p, c) for p, c in zip(prompts, cands)]
    sync()
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    cached = [score_sids(model, tok, p, c) for p, c in zip(prompts, cands)]
    sync()
    t_cached = time.perf_counter() - t
    diff = max(abs(a - b) for x, y in zip(naive, cached) for a, b in zip(x, y))
    return t_naive, t_cached, diff


if __name__ == "__main__":
    main()
