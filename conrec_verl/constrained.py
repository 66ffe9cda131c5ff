"""SID-constrained decoding for Hugging Face causal LMs (the transformers adapter of the trie).

:class:`SidTrieLogitsProcessor` (or :func:`make_prefix_allowed_tokens_fn`) lets a model emit only
token paths that spell an existing SID of :class:`conrec_verl.core.sid_trie.SidTrie`: after the
prompt, step ``d`` may only produce the level-``d`` tokens that extend the prefix generated so far.
:func:`constrained_beam_search` returns, per prompt, the top-K *distinct* items with their scores.

Generation settings are set explicitly and the model's own ``generation_config`` is swapped for a
clean one during the call, because transformers fills every setting left unset from the model's
``generation_config`` (a checkpoint saved with ``do_sample=True``, ``num_beams=1``,
``repetition_penalty`` or ``bad_words_ids`` would otherwise silently change or break the search).

The validation rollouts of a CPU ``hf`` rollout backend can pass
``logits_processor=LogitsProcessorList([SidTrieLogitsProcessor(...)])`` to ``generate`` too.

Score of a returned SID: the sum of the model's log-probabilities of its tokens (unconstrained
softmax; the mask only restricts which tokens may be chosen; ``length_penalty=0``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from conrec_verl.core.sid import Codes, SidTokenMap, extract_sids, format_sid  # noqa: F401 - SidTokenMap re-exported
from conrec_verl.core.sid_trie import SidTrie


class ConstrainedDecodingError(ValueError):
    """The model/tokenizer cannot decode the requested SIDs, or the request is impossible."""


class _AllowedCache:
    def __init__(self, trie: SidTrie, token_map: SidTokenMap, dead_end_token: int):
        self.trie, self.map, self.dead = trie, token_map, int(dead_end_token)
        self.cache: dict[Codes | None, list[int]] = {}

    def allowed_ids(self, generated: Sequence[int]) -> list[int]:
        prefix = self.map.decode(generated) if len(generated) <= self.trie.num_levels else None
        if prefix not in self.cache:
            codes = self.trie.allowed(prefix) if prefix is not None else ()
            depth = len(prefix) if prefix is not None else 0
            ids = [self.map.token_id(depth, c) for c in codes]
            # complete SID or an impossible prefix: only the end token (the beam is finished / dead)
            self.cache[prefix] = ids or [self.dead]
        return self.cache[prefix]


class SidTrieLogitsProcessor(LogitsProcessor):
    """Masks every token that would not continue an existing SID (scores of others -> -inf).

    ``prompt_length``: length of the (left-padded) prompt block in ``input_ids``; tokens after it
    are the generated SID so far. ``prompt_length=None`` ("suffix mode", for callers that cannot
    know it, such as a rollout server's logits-processor hook): the generated SID is the trailing
    run of SID tokens, so the prompt must end with a non-SID token (every chat template's
    generation prompt does). After a complete SID only ``end_token_id`` is allowed.
    """

    def __init__(self, trie: SidTrie, token_map: SidTokenMap, prompt_length: int | None, end_token_id: int,
                 row_tries: Sequence[SidTrie] | None = None, beams_per_row: int = 1):
        """``row_tries`` (optional): one trie per prompt of the batch, e.g. ``trie.without(excluded)``
        as a per-row mask; input row ``r`` (beam search lays out ``beams_per_row`` rows per prompt)
        is constrained by ``row_tries[r // beams_per_row]``. Without it every row uses ``trie``."""
        self.prompt_length = None if prompt_length is None else int(prompt_length)
        self._allowed = _AllowedCache(trie, token_map, end_token_id)
        self._map = token_map
        self._L = trie.num_levels
        self._beams = max(1, int(beams_per_row))
        self._row_allowed: list[_AllowedCache] | None = None
        if row_tries is not None:
            by_id: dict[int, _AllowedCache] = {id(trie): self._allowed}
            self._row_allowed = [by_id.setdefault(id(t), _AllowedCache(t, token_map, end_token_id)) for t in row_tries]

    def _generated(self, row: list[int]) -> list[int]:
        if self.prompt_length is not None:
            return row
        n = 0
        while n < len(row) and row[len(row) - 1 - n] in self._map.reverse:
            n += 1
        return row[len(row) - n:] if n else []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is not None:
            tails = input_ids[:, self.prompt_length:].tolist()
        else:  # the last L + 1 tokens are enough to find a trailing SID run of up to L tokens
            tails = input_ids[:, -(self._L + 1):].tolist()
        rows: list[int] = []
        cols: list[int] = []
        for row, ids in enumerate(tails):
            cache = self._allowed if self._row_allowed is None else self._row_allowed[row // self._beams]
            allowed = cache.allowed_ids(self._generated(ids))
            rows.extend([row] * len(allowed))
            cols.extend(allowed)
        mask = torch.full_like(scores, float("-inf"))
        mask[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = 0.0
        return scores + mask


def rollout_logits_processor(tokenizer, model_config=None, sid_map: str | None = None, **_) -> SidTrieLogitsProcessor:
    """Factory for the ``hf`` rollout backend's hook (``engine_kwargs.hf.logits_processor``):
    ``"conrec_verl.constrained:rollout_logits_processor"`` with
    ``logits_processor_kwargs.sid_map=<data_dir>/sid_map.parquet`` makes validation rollouts emit
    only SIDs of that build (suffix mode: the chat template's generation prompt ends the prompt).
    """
    import pyarrow.parquet as pq

    from conrec_verl.core.sid import parse_sid

    if not sid_map:
        raise ConstrainedDecodingError("rollout_logits_processor needs sid_map=<path to sid_map.parquet>")
    sids = pq.read_table(sid_map, columns=["sid"]).column("sid").to_pylist()
    codes = []
    for row, text in enumerate(sids):
        c = parse_sid(text) if isinstance(text, str) else None
        if c is None:
            raise ConstrainedDecodingError(f"{sid_map}: column 'sid', row {row}: {text!r} is not a SID string")
        codes.append(c)
    trie = SidTrie(codes)
    eos, _ = _token_ids(tokenizer)
    return SidTrieLogitsProcessor(trie, SidTokenMap(tokenizer, trie.level_sizes()), None, eos)


def make_prefix_allowed_tokens_fn(
    trie: SidTrie, token_map: SidTokenMap, prompt_length: int, end_token_id: int
) -> Callable[[int, torch.Tensor], list[int]]:
    """The same constraint as a ``prefix_allowed_tokens_fn`` for ``model.generate``."""
    cache = _AllowedCache(trie, token_map, end_token_id)

    def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return cache.allowed_ids(input_ids[prompt_length:].tolist())

    return fn


@dataclass
class BeamResult:
    """Top-K of one prompt: distinct valid SIDs, best first, with summed log-prob scores."""

    sids: list[Codes]
    scores: list[float]
    n_invalid: int = 0  # beams that did not spell an existing SID (dead beams of a narrow trie when constrained)
    n_beams: int = 0
    exclusion_skipped: bool = False  # fewer than K items would remain: the row's exclusion was not applied

    @property
    def sid_strings(self) -> list[str]:
        return [format_sid(s) for s in self.sids]


def _render(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


@contextlib.contextmanager
def _clean_generation_config(model, eos_id: int, pad_id: int):
    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    try:
        yield
    finally:
        model.generation_config = saved


def _token_ids(tokenizer):
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise ConstrainedDecodingError("the tokenizer has no eos token")
    return int(eos), int(pad)


def _encode(tokenizer, prompts, max_prompt_tokens, device):
    texts = [_render(tokenizer, p) for p in prompts]
    saved_side, saved_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                        truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved_side, saved_trunc
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def constrained_beam_search(
    model,
    tokenizer,
    prompts: Sequence,
    trie: SidTrie,
    k: int = 20,
    num_beams: int | None = None,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    constrained: bool = True,
    progress: bool = False,
    exclude: Sequence[Collection[Codes]] | None = None,
) -> list[BeamResult]:
    """Top-``k`` distinct SIDs per prompt by beam search (``num_beams >= k``, greedy, no sampling).

    ``prompts``: user texts or chat message lists (rendered with the tokenizer's chat template and
    a generation prompt). ``constrained=False`` runs the same beam search without the trie, to
    measure how often an unconstrained model emits invalid SIDs (these count in ``n_invalid``).
    ``exclude`` (constrained only): per prompt, SIDs the search may not return -- a per-row mask on
    the trie (:meth:`SidTrie.without`), so each row still gets ``k`` valid, non-excluded items; a row
    whose exclusion would leave fewer than ``k`` items is searched unmasked (``exclusion_skipped``).
    """
    k = int(k)
    if k < 1:
        raise ConstrainedDecodingError(f"k must be >= 1, got {k}")
    if k > len(trie):
        raise ConstrainedDecodingError(f"k={k} is larger than the number of items with a SID ({len(trie)})")
    if exclude is not None:
        if not constrained:
            raise ConstrainedDecodingError("exclude needs constrained decoding (it masks the SID trie)")
        if len(exclude) != len(prompts):
            raise ConstrainedDecodingError(f"exclude has {len(exclude)} entries for {len(prompts)} prompts")
    # beam search (never greedy: greedy returns no sequence scores), at least k beams
    num_beams = max(2, k, int(num_beams or k))
    token_map = SidTokenMap(tokenizer, trie.level_sizes())
    eos_id, pad_id = _token_ids(tokenizer)
    L = trie.num_levels
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[BeamResult] = []
    starts = range(0, len(prompts), max(1, int(batch_size)))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="beam search", unit="batch")
    try:
        for start in starts:
            chunk = list(prompts[start:start + batch_size])
            enc = _encode(tokenizer, chunk, max_prompt_tokens, device)
            prompt_len = enc["input_ids"].shape[1]
            processors = LogitsProcessorList()
            row_tries, skipped = [trie] * len(chunk), [False] * len(chunk)
            if exclude is not None:
                for i, ex in enumerate(exclude[start:start + batch_size]):
                    drop = [s for s in ex if s in trie]
                    if drop and len(trie) - len(set(drop)) >= k:
                        row_tries[i] = trie.without(drop)
                    elif drop:
                        skipped[i] = True
            if constrained:
                processors.append(SidTrieLogitsProcessor(trie, token_map, prompt_len, eos_id,
                                                         row_tries if exclude is not None else None, num_beams))
            config = GenerationConfig(
                do_sample=False, num_beams=num_beams, num_return_sequences=num_beams,
                max_new_tokens=L if constrained else L + 2, min_new_tokens=0, early_stopping=True,
                length_penalty=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                use_cache=True,
                output_scores=True, return_dict_in_generate=True,
                eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
            )
            with _clean_generation_config(model, eos_id, pad_id):
                out = model.generate(**enc, generation_config=config, logits_processor=processors)
            seqs = out.sequences[:, prompt_len:].tolist()
            scores = out.sequences_scores.tolist()
            for i in range(len(chunk)):
                row_trie = row_tries[i]
                sids, vals, seen, invalid = [], [], set(), 0
                for j in range(i * num_beams, (i + 1) * num_beams):
                    score = float(scores[j])
                    gen = [t for t in seqs[j] if t not in (eos_id, pad_id)]
                    if constrained:
                        codes = token_map.decode(gen[:L]) if len(gen) >= L else None
                    else:
                        found = extract_sids(tokenizer.decode(gen, skip_special_tokens=True), L)
                        codes = found[0] if len(found) == 1 else None
                    if codes is None or codes not in row_trie or score == float("-inf"):
                        invalid += 1
                        continue
                    if codes in seen:
                        continue
                    seen.add(codes)
                    sids.append(codes)
                    vals.append(score)
                results.append(BeamResult(sids[:k], vals[:k], invalid, num_beams, skipped[i]))
    finally:
        if was_training:
            model.train()
    return results


@torch.no_grad()
def score_sids(model, tokenizer, prompt, sids: Sequence[Codes], max_prompt_tokens: int | None = None,
               token_map: SidTokenMap | None = None, chunk: int | None = None) -> list[float]:
    """Teacher-forced log-probability of each SID (its tokens only) after ``prompt``.

    Used for Candidate Acc and the alignment accuracy: rank SIDs by the model's own likelihood.
    The prompt runs once; its KV cache is repeated for the candidates, which then cost
    ``levels - 1`` tokens each. ``chunk``: repeat it for at most that many candidates at a time
    (memory bounded by ``chunk``, not by the number of SIDs; None = all at once). Pass a
    ``token_map`` built once when scoring many rows (building one reads the whole vocabulary).
    """
    if not sids:
        return []
    if chunk is not None and int(chunk) < 1:
        raise ConstrainedDecodingError(f"chunk must be >= 1, got {chunk}")
    L = len(sids[0])
    if token_map is None:
        sizes = [max(int(s[level]) for s in sids) + 1 for level in range(L)]
        token_map = SidTokenMap(tokenizer, sizes)
    device = next(model.parameters()).device
    enc = _encode(tokenizer, [prompt], max_prompt_tokens, device)
    cand = torch.tensor([[token_map.token_id(level, c) for level, c in enumerate(s)] for s in sids],
                        dtype=torch.long, device=device)
    step = cand.shape[0] if chunk is None else int(chunk)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=True)
        total = torch.log_softmax(out.logits[0, -1, :].float(), dim=-1)[cand[:, 0]]
        if L > 1:
            parts = []
            for start in range(0, cand.shape[0], step):
                part = cand[start:start + step]
                n = part.shape[0]
                # the last (or only) chunk may consume the prompt's cache; earlier ones repeat a copy
                cache = out.past_key_values if start + step >= cand.shape[0] else copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(n)
                mask = torch.ones(n, enc["input_ids"].shape[1] + L - 1, dtype=enc["attention_mask"].dtype, device=device)
                rest = model(input_ids=part[:, :-1], attention_mask=mask, past_key_values=cache, use_cache=True).logits.float()
                parts.append(torch.log_softmax(rest, dim=-1).gather(2, part[:, 1:].unsqueeze(-1)).squeeze(-1).sum(dim=1))
            total = total + torch.cat(parts)
    finally:
        if was_training:
            model.train()
    return total.tolist()


@torch.no_grad()
def catalog_log_probs(model, tokenizer, prompts: Sequence, trie: SidTrie, token_map: SidTokenMap | None = None,
                      progress: bool = False, chunk: int | None = 256) -> np.ndarray:
    """Exact log-probability of every SID of ``trie`` after each prompt: an array of shape
    (prompts, items), columns in ``trie.iter_sids()`` order.

    The exact counterpart of :func:`constrained_beam_search` (whose top K it equals when the beam
    misses nothing), scored level by level down the trie: the prompt runs once; level 0's
    log-probabilities come from its last position; for each level ``l >= 1`` every *distinct*
    prefix of ``l`` codes is teacher-forced after the prompt once, and each item below it reads
    its level-``l`` code's log-probability from that prefix's last position. An item's score is
    the sum over its levels, the same number :func:`score_sids` gives by forcing each item's own
    tokens. The cost is ``sum_l (distinct l-prefixes) x l`` decoded tokens per prompt instead of
    ``items x (levels - 1)`` (MovieLens-100K's build, 1,642 items on 16 x 16 x 16 codes: 486
    instead of 3,284; ``benchmarks/bench_catalogue_scores.py``). Prefixes run ``chunk`` at a time
    (None: all of a level at once) on a copy of the prompt's KV cache, so memory grows with
    ``chunk`` x prompt length, never with the catalogue; only the needed entries of each chunk's
    log-softmax are kept. Meant for evaluation,
    where several models' scores are combined item by item (``conrec-eval --ensemble``).
    """
    sids = np.asarray(list(trie.iter_sids()), dtype=np.int64)
    if sids.size == 0:
        return np.empty((len(prompts), 0), dtype=np.float32)
    if chunk is not None and int(chunk) < 1:
        raise ConstrainedDecodingError(f"chunk must be >= 1, got {chunk}")
    if token_map is None:
        token_map = SidTokenMap(tokenizer, trie.level_sizes())
    n_items, levels = sids.shape
    device = next(model.parameters()).device
    tokens = torch.tensor([[token_map.token_id(level, int(c)) for level, c in enumerate(row)] for row in sids],
                          dtype=torch.long, device=device)
    # the work of every prompt, planned once: per level l >= 1, chunks of distinct l-code prefixes
    # (token rows) with, for each, the items below them, their prefix's row in the chunk and their
    # level-l token
    plan = []
    for level in range(1, levels):
        _, first, inverse = np.unique(sids[:, :level], axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)  # numpy 2.0.0 returned it with the unique axis kept
        order = np.argsort(inverse, kind="stable")
        step = len(first) if chunk is None else int(chunk)
        for start in range(0, len(first), step):
            stop = min(start + step, len(first))
            lo, hi = np.searchsorted(inverse[order], [start, stop], side="left")
            items = torch.as_tensor(order[lo:hi], device=device)
            plan.append((level, tokens[torch.as_tensor(first[start:stop], device=device), :level], items,
                         torch.as_tensor(inverse[order[lo:hi]] - start, device=device), tokens[items, level]))
    # only the last position's logits are used (most Hugging Face causal LMs can skip the others)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = np.empty((len(prompts), n_items), dtype=np.float32)
    rows = range(len(prompts))
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="catalogue scores", unit="prompt")
    was_training = model.training
    model.eval()
    try:
        for i in rows:
            enc = _encode(tokenizer, [prompts[i]], None, device)
            first = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=True, **keep)
            total = torch.log_softmax(first.logits[0, -1, :].float(), dim=-1)[tokens[:, 0]]
            for level, part, items, row_in_part, next_token in plan:
                n = part.shape[0]
                cache = copy.deepcopy(first.past_key_values)
                cache.batch_repeat_interleave(n)
                mask = torch.ones(n, enc["input_ids"].shape[1] + level, dtype=enc["attention_mask"].dtype,
                                  device=device)
                logits = model(input_ids=part, attention_mask=mask, past_key_values=cache, use_cache=True,
                               **keep).logits[:, -1, :].float()
                total[items] += torch.log_softmax(logits, dim=-1)[row_in_part, next_token]
            out[i] = total.cpu().numpy()
    finally:
        if was_training:
            model.train()
    return out
