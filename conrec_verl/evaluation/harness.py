"""The evaluation harness: every row (baseline, model folder or predictions file) is scored the
same way on the same split, then written as one report (markdown + JSON + PNG plots).

Row kinds
* baselines (:mod:`conrec_verl.baselines`): ``random``, ``popularity``, ``recent_popularity``,
  ``swing``, ``codislike`` (item-CF on co-dislike counts), ``sasrec`` (early-stopped);
* model folders: any Hugging Face causal LM folder whose tokenizer has this build's SID tokens;
  top-K by SID-constrained beam search, Candidate Acc by the model's own likelihood of each
  candidate, and the 4-way alignment accuracy on held-out alignment questions for the forget rate;
* ensembles (:class:`EnsembleSpec`): several model folders ranking the whole catalogue together,
  each item scored by the mean of the members' log-probabilities of its SID (exact, no beam);
* predictions files in the JSONL interchange format (:mod:`conrec_verl.evaluation.predictions`).

The same rules for every row:
* **exclusion** (``none`` | ``dislikes`` | ``interacted``, default ``interacted``): no row's top K
  holds an item the rule names (baselines mask their scores, model rows search a per-row masked
  trie and still return K valid items, predictions files have such items removed);
* **prompt** (model rows): the context the model was trained on and its token budget
  (:class:`ModelSpec`), rendered by :func:`conrec_verl.core.prompts.render_history_prompt` with the
  oldest history dropped first, exactly as the training dataset renders it;
* **uncertainty**: every headline metric gets a bootstrap 95% interval over rows, every non-baseline
  row a paired McNemar test of its per-row FHR@K hits against the best baseline.

The paper's Table 2 ablation is a list of model rows, e.g. ``warm-up SFT=<dir>``,
``+ alignment=<dir>``, ... with the forget rate measured against the alignment-SFT model
(``forget_reference_model``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from conrec_verl.core.metrics import DEFAULT_KS, compute_metrics, forget_rate, metric_samples
from conrec_verl.core.neg_filter import NegativeFilter, removal_sweep
from conrec_verl.core.prompts import budget_fits, chat_prompt_length, render_history_prompt
from conrec_verl.core.sid import Codes, extract_sids, format_sid, parse_sid
from conrec_verl.core.stats import bootstrap_ci, mcnemar
from conrec_verl.core.eval_data import (
    DECODES,
    DEFAULT_EXCLUSION,
    EvalData,
    EvalInputError,
    check_exclusion,
    load_eval_data,
)
from conrec_verl.evaluation.predictions import PredictionSet, predictions_file, read_predictions, write_predictions
from conrec_verl.io_utils import atomic_dir

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: the metrics that get bootstrap intervals (at the report's K) and the paired test's metric
CI_METRICS = ("HR", "FHR", "LUF", "LIF", "CandAcc")
PAIRED_METRIC = "FHR"
#: the GRPO recipes' final-stage context and the cpu_tiny recipe's ``data.max_prompt_length``
DEFAULT_CONTEXT = 3
DEFAULT_PROMPT_TOKENS = 384


@dataclass
class RowResult:
    name: str
    kind: str  # baseline | model | ensemble | predictions
    metrics: dict
    wall_s: float
    filter_sweep: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    ci: dict = field(default_factory=dict)          # metric -> [low, high] (bootstrap 95%)
    paired: dict | None = None                      # McNemar vs the best baseline


@dataclass
class ModelSpec:
    """A model row: its folder and the prompt it is asked with.

    ``context``: 1 | 2 | 3 (the progressive contexts of :data:`conrec_verl.core.prompts.STAGE_CONTEXTS`)
    or ``"row"`` (the split's stored prompt). ``max_prompt_tokens``: the token budget of the chat-
    templated prompt (the oldest history is dropped until it fits; None = no budget). Give each
    model the context and budget it was trained with: warm-up SFT -> its SFT context (2) and
    ``max_length``; GRPO -> the last stage's context (3) and ``data.max_prompt_length``.
    """

    path: str
    context: int | str = DEFAULT_CONTEXT
    max_prompt_tokens: int | None = DEFAULT_PROMPT_TOKENS

    def __post_init__(self):
        if self.context != "row":
            try:
                self.context = int(self.context)
            except (TypeError, ValueError):
                raise EvalInputError(f"model {self.path}: prompt context must be 1, 2, 3 or 'row', got {self.context!r}") from None
            if self.context not in (1, 2, 3):
                raise EvalInputError(f"model {self.path}: prompt context must be 1, 2, 3 or 'row', got {self.context!r}")
        if self.max_prompt_tokens is not None and int(self.max_prompt_tokens) < 1:
            raise EvalInputError(f"model {self.path}: prompt token budget must be >= 1, got {self.max_prompt_tokens!r}")


@dataclass
class EnsembleSpec:
    """An ensemble row: model folders asked with one context and budget (as :class:`ModelSpec`).

    Every item of the catalogue gets the mean over the members of the log-probability each gives
    its SID after the row's prompt (a product of experts, computed exactly by
    :func:`conrec_verl.constrained.catalog_log_probs`); the top K are the highest means among the
    items the exclusion rule leaves. Candidate Acc ranks the candidates by the same means. One
    member is allowed: that is exact decoding of one model, the reference its beam search approximates.
    """

    paths: Sequence[str]
    context: int | str = DEFAULT_CONTEXT
    max_prompt_tokens: int | None = DEFAULT_PROMPT_TOKENS

    def __post_init__(self):
        if isinstance(self.paths, (str, os.PathLike)):
            raise EvalInputError(f"an ensemble takes a list of model folders, got one path {str(self.paths)!r}")
        self.paths = tuple(str(p) for p in self.paths)
        if not self.paths:
            raise EvalInputError("an ensemble needs at least one model folder")
        seen: dict[str, str] = {}
        for p in self.paths:
            key = str(Path(p).resolve())
            if key in seen:
                raise EvalInputError(f"an ensemble lists one model folder twice: {seen[key]!r} and {p!r}")
            seen[key] = p
        checked = ModelSpec(self.paths[0], self.context, self.max_prompt_tokens)  # the same rules as a model row
        self.context, self.max_prompt_tokens = checked.context, checked.max_prompt_tokens


class PhaseTimer:
    """Wall time per evaluation phase, in the order the phases ran."""

    def __init__(self):
        self.phases: list[dict] = []

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append({"phase": phase, "seconds": round(time.perf_counter() - t0, 3)})


# -- producing predictions ------------------------------------------------------------------------
def baseline_predictions(data: EvalData, name: str, k: int, seed: int = 0, exclusion: str | None = None,
                         **params) -> tuple[PredictionSet, dict]:
    from conrec_verl.baselines import BASELINES

    if name not in BASELINES:
        raise EvalInputError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    if exclusion is not None:
        params = dict(params, exclusion=exclusion)
        params.pop("exclude_history", None)
    model = BASELINES[name](seed=seed, **params).fit(data)
    info = {}
    if hasattr(model, "n_pairs"):
        info["swing_pairs_used"] = int(model.n_pairs)
        info["swing_pairs_without_sid"] = int(model.n_pairs_skipped)
    if getattr(model, "losses", None):
        info["train_loss_first_last"] = [round(model.losses[0], 4), round(model.losses[-1], 4)]
    info.update(getattr(model, "fit_info", {}) or {})
    sids = model.recommend(k)
    if model.n_rows_not_excluded:
        info["rows_exclusion_skipped"] = int(model.n_rows_not_excluded)
    return PredictionSet(name, sids, model.candidate_scores()), info


def row_prompt(row, stage: str | int, fits=None):
    """The prompt a model row is asked: the row's stored prompt, or rendered for a context 1-3
    (``fits``: a token-budget test, see :func:`conrec_verl.core.prompts.budget_fits`)."""
    if stage == "row":
        if row.prompt is None:
            raise EvalInputError(f"user {row.user_id} cutoff {row.cutoff_day}: no 'prompt' column; pass a prompt context 1-3")
        return row.prompt
    s = int(stage)
    return render_history_prompt(s, [format_sid(x) for x in row.hist_neg_recent],
                                 [format_sid(x) for x in row.hist_neg], [format_sid(x) for x in row.hist_pos], fits=fits)


def render_prompts(data: EvalData, tokenizer, context: int | str, max_prompt_tokens: int | None):
    """Prompts of every row for one context and budget, and what they cost (recorded per row)."""
    fits = budget_fits(tokenizer, max_prompt_tokens)
    prompts = [row_prompt(r, context, fits) for r in data.rows]
    if context == "row" or max_prompt_tokens is None:
        lengths = [chat_prompt_length(tokenizer, p if isinstance(p, str) else p[-1]["content"]) for p in prompts]
    else:
        lengths = [chat_prompt_length(tokenizer, p) for p in prompts]
    full = [len(r.hist_neg_recent if context == 1 else r.hist_neg) + (len(r.hist_pos) if context == 3 else 0)
            for r in data.rows] if context != "row" else None
    shown = None
    if full is not None:
        shown = [len(extract_sids(p, data.num_levels)) for p in prompts]
    info = {"prompt_context": context, "prompt_budget": max_prompt_tokens,
            "prompt_tokens_mean": round(float(np.mean(lengths)), 1), "prompt_tokens_max": int(max(lengths))}
    if full is not None and shown is not None:
        info["rows_history_cut"] = int(sum(s < f for s, f in zip(shown, full)))
    return prompts, lengths, info


def load_model(model_dir: str | os.PathLike, device: str = "auto", dtype: str = "auto"):
    """A model folder and its tokenizer; ``dtype`` auto = bfloat16 on CUDA, float32 on CPU
    (``float32`` on CUDA gives the CPU's rankings, for numbers comparable across machines)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalInputError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in ("auto", "float32", "bfloat16"):
        raise EvalInputError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model, tokenizer


def alignment_rows(path: Path, data: EvalData, max_rows: int | None = None) -> list[tuple[str, list[Codes], Codes]]:
    """(prompt, options, answer) of the 4-way alignment task (``sft/alignment_heldout.parquet``)."""
    import pyarrow.parquet as pq

    out = []
    for i, raw in enumerate(pq.read_table(path).to_pylist()[: max_rows]):
        msgs = raw.get("messages") or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
        answer = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
        options = extract_sids(user or "", data.num_levels)
        codes = parse_sid((answer or "").strip())
        if user is None or codes is None or codes not in options:
            raise EvalInputError(f"{path}: row {i}: column 'messages' needs a user turn with the SID options and an "
                                 "assistant turn that is exactly one of them")
        out.append((user, options, codes))
    return out


def default_alignment_path(data: EvalData) -> Path | None:
    """Held-out alignment questions when data_prep wrote them, else None (training questions would
    measure memorisation, not forgetting)."""
    path = data.data_dir / "sft" / "alignment_heldout.parquet"
    return path if path.is_file() else None


def alignment_accuracy(model, tokenizer, rows, token_map) -> float | None:
    from conrec_verl.constrained import score_sids

    if not rows:
        return None
    correct = 0
    for prompt, options, answer in rows:
        s = score_sids(model, tokenizer, prompt, options, None, token_map)
        correct += options[int(np.argmax(s))] == answer
    return correct / len(rows)


def model_predictions(data: EvalData, model_dir, k: int, num_beams: int | None = None, batch_size: int = 8,
                      prompt_stage: str | int = DEFAULT_CONTEXT, device: str = "auto", candidate_acc: bool = True,
                      alignment_path: Path | None = None, alignment_max_rows: int | None = None,
                      measure_unconstrained: bool = False, max_prompt_tokens: int | None = DEFAULT_PROMPT_TOKENS,
                      exclusion: str = DEFAULT_EXCLUSION, exclude_history: bool | None = None,
                      extra_contexts: Sequence[int] = (), timer: PhaseTimer | None = None, name: str | None = None,
                      dtype: str = "auto", decode: str = "beam") -> tuple[PredictionSet, dict, list[list[float]]]:
    """Top-K by constrained beam search, candidate scores, alignment accuracy of one model folder.

    ``decode``: ``beam`` (the item-constrained beam search with ``num_beams`` beams, the paper's
    decoding) or ``exact`` (every item's exact log-probability,
    :func:`conrec_verl.constrained.catalog_log_probs`, ranked as an ensemble row ranks them,
    :func:`rank_catalogue`: the model's true top K, which the beam search can miss).

    The prompts are rendered for ``prompt_stage`` (context 1-3, or ``"row"``) within
    ``max_prompt_tokens``. ``exclusion`` masks each row's trie (:meth:`SidTrie.without`), so the
    top K never holds an excluded item and still has K valid SIDs. ``extra_contexts``: also decode
    in these contexts (same budget) and put their per-row FHR/HR outcomes in
    ``info["by_context"]``.
    """
    from conrec_verl.constrained import BeamResult, SidTokenMap, catalog_log_probs, constrained_beam_search, score_sids

    if exclude_history is not None:  # the older boolean form
        exclusion = "dislikes" if exclude_history else "none"
    check_exclusion(exclusion)
    if decode not in DECODES:
        raise EvalInputError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    timer = timer or PhaseTimer()
    label = name or Path(model_dir).name
    with timer(f"{label}: load model"):
        model, tokenizer = load_model(model_dir, device, dtype)
        trie = data.trie()
        token_map = SidTokenMap(tokenizer, data.codebook.sizes)
    with timer(f"{label}: render prompts"):
        prompts, lengths, info = render_prompts(data, tokenizer, prompt_stage, max_prompt_tokens)
    exclude = [r.excluded(exclusion) for r in data.rows] if exclusion != "none" else None
    info["exclusion"] = exclusion
    info["decode"] = decode

    def search(ps):
        if decode == "exact":
            scores = catalog_log_probs(model, tokenizer, ps, trie, token_map, progress=True)
            top, top_scores, unmasked = _rank_catalogue_rows(data, scores, k, exclusion)
            return [BeamResult(s_, sc, n_beams=k, exclusion_skipped=u) for s_, sc, u in zip(top, top_scores, unmasked)]
        return constrained_beam_search(model, tokenizer, ps, trie, k=k, num_beams=num_beams, batch_size=batch_size,
                                       max_prompt_tokens=None, progress=True, exclude=exclude)

    with timer(f"{label}: {'catalogue scores' if decode == 'exact' else 'beam search'}"):
        results = search(prompts)
    # dead beams can only come from a trie narrower than the beam at some depth; every returned SID is valid
    info["dead_beams"] = int(sum(r.n_invalid for r in results))
    if exclude is not None:
        info["rows_exclusion_skipped"] = int(sum(r.exclusion_skipped for r in results))
    if any(len(r.sids) < k for r in results):
        raise RuntimeError("constrained beam search returned fewer than K valid SIDs (should not happen)")
    cand_scores: list[list[float] | None] = []
    with timer(f"{label}: candidate scores"):
        for r, p in zip(data.rows, prompts):
            cands = r.target.candidates
            cand_scores.append(score_sids(model, tokenizer, p, cands, None, token_map)
                               if (candidate_acc and cands) else None)
    if measure_unconstrained:
        with timer(f"{label}: unconstrained decoding"):
            free = constrained_beam_search(model, tokenizer, prompts, trie, k=k, num_beams=num_beams,
                                           batch_size=batch_size, constrained=False)
        info["invalid_rate_unconstrained"] = sum(f.n_invalid for f in free) / max(1, sum(f.n_beams for f in free))
    if alignment_path is not None and Path(alignment_path).is_file():
        with timer(f"{label}: alignment accuracy"):
            rows = alignment_rows(Path(alignment_path), data, alignment_max_rows)
            info["alignment_acc"] = alignment_accuracy(model, tokenizer, rows, token_map)
            info["alignment_rows"] = len(rows)
            info["alignment_file"] = Path(alignment_path).name
    by_context = {}
    for ctx in extra_contexts:
        with timer(f"{label}: context {ctx}"):
            if ctx == prompt_stage:
                top = [r.sids for r in results]
                cinfo = {kk: v for kk, v in info.items() if kk.startswith("prompt_")}
            else:
                ps, _, cinfo = render_prompts(data, tokenizer, ctx, max_prompt_tokens)
                top = [r.sids for r in search(ps)]
            by_context[int(ctx)] = {"sids": top, **cinfo}
    if by_context:
        info["by_context"] = by_context
    return PredictionSet(label, [r.sids for r in results], cand_scores), info, [r.scores for r in results]


def catalogue_scores(data: EvalData, path: str, context: int | str = DEFAULT_CONTEXT,
                     max_prompt_tokens: int | None = DEFAULT_PROMPT_TOKENS, device: str = "auto",
                     dtype: str = "auto") -> tuple[np.ndarray, dict]:
    """One model folder's exact log-probability of every SID (columns in ``data.trie().iter_sids()``
    order) after each row's prompt, and the prompts' info (context, budget, lengths)."""
    from conrec_verl.constrained import SidTokenMap, catalog_log_probs

    model, tokenizer = load_model(path, device, dtype)
    prompts, _, info = render_prompts(data, tokenizer, context, max_prompt_tokens)
    scores = catalog_log_probs(model, tokenizer, prompts, data.trie(), SidTokenMap(tokenizer, data.codebook.sizes),
                               progress=True)
    return scores, info


def mean_catalogue_scores(data: EvalData, paths: Sequence[str], context: int | str = DEFAULT_CONTEXT,
                          max_prompt_tokens: int | None = DEFAULT_PROMPT_TOKENS, device: str = "auto",
                          dtype: str = "auto", cache: dict | None = None, timer: PhaseTimer | None = None,
                          label: str = "ensemble") -> tuple[np.ndarray, dict]:
    """The mean over ``paths`` (in order, float64) of their :func:`catalogue_scores`, and the first
    member's prompt info. ``cache`` (a dict kept by the caller) holds each member's matrix under its
    resolved folder, context, budget, split, rows, device and dtype, so a folder shared by several
    ensembles is scored once; selection (``evaluation.select --ensembles``) and evaluation average
    through this one function."""
    timer = timer or PhaseTimer()
    cache = {} if cache is None else cache
    total, info = None, None
    for i, path in enumerate(paths):
        key = (str(Path(path).resolve()), context, max_prompt_tokens, str(data.split_path), len(data.rows), device, dtype)
        if key not in cache:
            where = Path(path)
            with timer(f"{label}: member {i + 1} ({where.parent.name}/{where.name}): catalogue scores"):
                cache[key] = catalogue_scores(data, path, context, max_prompt_tokens, device, dtype)
        scores, pinfo = cache[key]
        info = info if info is not None else dict(pinfo)
        total = scores.astype(np.float64) if total is None else total + scores
    if total is None:
        raise EvalInputError("an ensemble needs at least one model folder")
    return total / len(paths), info


def rank_catalogue(data: EvalData, scores: np.ndarray, k: int,
                   exclusion: str = DEFAULT_EXCLUSION) -> tuple[list[list[Codes]], list[list[float]], int]:
    """Top ``k`` SIDs per row of a (rows, items) score matrix in ``data.trie().iter_sids()`` order,
    the items the exclusion rule names masked; a row whose exclusion would leave fewer than ``k``
    items is ranked unmasked, as the beam search does. Returns (top SIDs, their scores, rows unmasked)."""
    top, top_scores, unmasked = _rank_catalogue_rows(data, scores, k, exclusion)
    return top, top_scores, int(sum(unmasked))


def _rank_catalogue_rows(data: EvalData, scores: np.ndarray, k: int,
                         exclusion: str) -> tuple[list[list[Codes]], list[list[float]], list[bool]]:
    """:func:`rank_catalogue` with a flag per row (ranked unmasked) instead of their count."""
    check_exclusion(exclusion)
    sids = list(data.trie().iter_sids())
    if k > len(sids):
        raise EvalInputError(f"K={k} is larger than the number of items with a SID ({len(sids)})")
    if np.shape(scores) != (len(data.rows), len(sids)):
        raise EvalInputError(f"catalogue scores have shape {np.shape(scores)}; {data.split_path} needs "
                             f"({len(data.rows)} rows, {len(sids)} items)")
    column = {s: j for j, s in enumerate(sids)}
    ranked = np.array(scores, dtype=np.float64)
    unmasked = [False] * len(data.rows)
    if exclusion != "none":
        for i, row in enumerate(data.rows):
            cols = [column[s] for s in row.excluded(exclusion) if s in column]
            if len(sids) - len(cols) >= k:
                ranked[i, cols] = -np.inf
            elif cols:
                unmasked[i] = True
    top = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    return ([[sids[j] for j in row] for row in top],
            [[float(scores[i, j]) for j in row] for i, row in enumerate(top)], unmasked)


def ensemble_predictions(data: EvalData, spec: EnsembleSpec, k: int, exclusion: str = DEFAULT_EXCLUSION,
                         device: str = "auto", dtype: str = "auto", candidate_acc: bool = True,
                         timer: PhaseTimer | None = None, name: str | None = None,
                         cache: dict | None = None) -> tuple[PredictionSet, dict, list[list[float]]]:
    """Top K of an :class:`EnsembleSpec` row: mean catalogue log-probabilities
    (:func:`mean_catalogue_scores`, ``cache`` as there), excluded items masked (:func:`rank_catalogue`)."""
    check_exclusion(exclusion)
    label = name or "ensemble"
    mean, info = mean_catalogue_scores(data, spec.paths, spec.context, spec.max_prompt_tokens, device, dtype,
                                       cache, timer, label)
    top_sids, top_scores, skipped = rank_catalogue(data, mean, k, exclusion)
    column = {s: j for j, s in enumerate(data.trie().iter_sids())}
    cand_scores = [[float(mean[i, column[c]]) for c in r.target.candidates]
                   if (candidate_acc and r.target.candidates) else None for i, r in enumerate(data.rows)]
    info.update({"members": list(spec.paths), "combination": "mean log-probability over the catalogue (exact)",
                 "exclusion": exclusion, "rows_exclusion_skipped": skipped})
    return PredictionSet(label, top_sids, cand_scores), info, top_scores


def reference_alignment_accuracy(data: EvalData, model_dir, alignment_path: Path, device: str = "auto",
                                 alignment_max_rows: int | None = None, dtype: str = "auto") -> tuple[float | None, int]:
    """The alignment-SFT model's accuracy on the held-out alignment questions (the forget rate's reference)."""
    from conrec_verl.constrained import SidTokenMap

    model, tokenizer = load_model(model_dir, device, dtype)
    rows = alignment_rows(Path(alignment_path), data, alignment_max_rows)
    return alignment_accuracy(model, tokenizer, rows, SidTokenMap(tokenizer, data.codebook.sizes)), len(rows)


def apply_exclusion(data: EvalData, pset: PredictionSet, exclusion: str) -> int:
    """Remove excluded items from a predictions file's lists (in place); returns entries removed."""
    removed = 0
    if exclusion == "none":
        return 0
    for i, (row, preds) in enumerate(zip(data.rows, pset.sids)):
        ex = row.excluded(exclusion)
        kept = [p for p in preds if p is None or p not in ex]
        removed += len(preds) - len(kept)
        pset.sids[i] = kept
    return removed


# -- scoring ------------------------------------------------------------------------------------
def deployment_sweep(data: EvalData, pset: PredictionSet, k: int, thresholds: Sequence[float]) -> list[dict]:
    """Deployment filter over a threshold sweep: future dislikes removed vs future likes removed.

    Each row's top-``k`` predicted SIDs filter that row's future items (dislikes ``future_neg``,
    likes ``future_pos``; items without a SID are kept by construction and not counted).
    """
    filt = NegativeFilter(data.codebook, 0.0)
    preds, cands, labels = [], [], []
    for row, p in zip(data.rows, pset.sids):
        valid = [x for x in p[:k] if x is not None]
        neg, pos = row.target.future_neg, row.future_pos
        preds.append(np.array(valid, dtype=np.int64).reshape(-1, data.num_levels))
        cands.append(np.array(neg + pos, dtype=np.int64).reshape(-1, data.num_levels))
        labels.append(np.array([True] * len(neg) + [False] * len(pos)))
    sims = filt.max_similarity_batch(preds, cands)
    return removal_sweep(sims, labels, thresholds)


def output_similarity(data: EvalData, pset: PredictionSet, k: int) -> dict[str, float | None]:
    """Mean over rows and top-``k`` entries of the cosine (codebook-reconstructed embeddings, as
    the reward) between a prediction and the closest of the row's future dislikes / future likes:
    what the reward's two terms measure. A positive penalty that works shows as a lower
    ``sim_future_pos`` at a similar ``sim_future_neg``. Rows without future likes (dislikes) do not
    count towards that mean."""
    book = data.codebook
    cache: dict = {}

    def unit(codes):
        u = cache.get(codes)
        if u is None:
            e = book.embed(codes).astype(np.float64)
            n = float(np.linalg.norm(e))
            u = cache[codes] = e / n if n > 0 else e
        return u

    out = {}
    for name, attr in (("sim_future_neg", "neg"), ("sim_future_pos", "pos")):
        vals = []
        for row, preds in zip(data.rows, pset.sids):
            targets = row.target.future_neg if attr == "neg" else row.future_pos
            top = [p for p in preds[:k] if p is not None]
            if not targets or not top:
                continue
            T = np.stack([unit(t) for t in targets])
            P = np.stack([unit(p) for p in top])
            vals.append(float((P @ T.T).max(axis=1).mean()))
        out[f"{name}@{k}"] = float(np.mean(vals)) if vals else None
    return out


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_baselines(results: Sequence[RowResult], k: int) -> dict[str, str]:
    """Per headline metric, the name of the baseline row with the highest value."""
    base = [r for r in results if r.kind == "baseline"]
    out = {}
    for m in CI_METRICS:
        key = m if m == "CandAcc" else f"{m}@{k}"
        scored = [r for r in base if r.metrics.get(key) is not None]
        if scored:
            out[key] = max(scored, key=lambda r: r.metrics[key]).name
    return out


def run_evaluation(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    baselines: Sequence[str] | None = None,
    predictions: dict[str, str] | None = None,
    models: dict[str, str | ModelSpec] | None = None,
    k: int = 20,
    ks: Sequence[int] = DEFAULT_KS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    max_rows: int | None = None,
    baseline_params: dict[str, dict] | None = None,
    model_params: dict | None = None,
    forget_reference: str | None = None,
    title: str | None = None,
    split: str = "eval/test.parquet",
    exclusion: str = DEFAULT_EXCLUSION,
    forget_reference_model: str | os.PathLike | None = None,
    all_contexts: bool = False,
    n_boot: int = 1000,
    ensembles: dict[str, EnsembleSpec] | None = None,
) -> dict:
    """Evaluate every row and write ``report.md``, ``metrics.json``, PNG plots and the predictions.

    Every row obeys ``exclusion``. ``models`` maps a row name to a folder (asked with the default
    context and budget) or a :class:`ModelSpec`. The forget rate's reference accuracy comes from
    ``forget_reference_model`` (the alignment-SFT model's folder; only its alignment accuracy is
    measured) or from the model row named ``forget_reference``. ``all_contexts``: also decode every
    model row in contexts 1, 2 and 3 (same budget) for the report's by-context table. ``ensembles``
    maps a row name to an :class:`EnsembleSpec` (kind ``ensemble``; tested against the best baseline
    like a model row).
    """
    from conrec_verl.baselines import BASELINES, DEFAULT_BASELINES
    from conrec_verl.evaluation.report import write_report_files

    t_all = time.time()
    timer = PhaseTimer()
    check_exclusion(exclusion)
    baselines = DEFAULT_BASELINES if baselines is None else tuple(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise EvalInputError(f"unknown baseline(s) {unknown}; choose from {sorted(BASELINES)}")
    if (model_params or {}).get("decode", "beam") not in DECODES:
        raise EvalInputError(f"decode must be one of {', '.join(DECODES)}, got {model_params['decode']!r}")
    specs = {name: (m if isinstance(m, ModelSpec) else ModelSpec(str(m))) for name, m in (models or {}).items()}
    ensembles = {name: (e if isinstance(e, EnsembleSpec) else EnsembleSpec(e)) for name, e in (ensembles or {}).items()}
    # a missing model folder fails before any baseline or model runs
    for name, folder in [*((n, sp.path) for n, sp in specs.items()),
                         *((n, p) for n, e in ensembles.items() for p in e.paths)]:
        if not (Path(folder) / "config.json").is_file():
            raise EvalInputError(f"row {name!r}: {folder}: not a Hugging Face model folder (no config.json)")
    with timer("load data"):
        data = load_eval_data(data_dir, split=split, max_rows=max_rows)
    ks = sorted({int(x) for x in ks} | {int(k)})
    n_items = len(data.sid_items)
    if max(ks) > n_items:
        raise EvalInputError(f"K={max(ks)} is larger than the number of items with a SID ({n_items}) in {data.data_dir}")
    with atomic_dir(out_dir, merge=True) as stage:  # predictions and report files, moved in at the end
        pred_dir = stage / "predictions"
        results: list[RowResult] = []
        samples: dict[str, dict] = {}
        names = [*baselines, *(predictions or {}), *specs, *ensembles]
        if len(set(names)) != len(names):
            raise EvalInputError(f"row names must be unique, got {names}")
        # read all predictions files first: a bad file fails before any expensive work
        with timer("read predictions files"):
            psets = {name: read_predictions(path, data, max(ks), name) for name, path in (predictions or {}).items()}
        mp = dict(model_params or {})
        mp.pop("exclude_history", None)
        align_path = mp.pop("alignment_path", None) or default_alignment_path(data)
        ref_acc = None
        if forget_reference_model is not None:
            if align_path is None:
                raise EvalInputError(f"{data.data_dir}/sft/alignment_heldout.parquet: not found; the forget rate "
                                     "needs held-out alignment questions (rebuild the data folder, or pass an alignment file)")
            with timer("forget reference: alignment accuracy"):
                ref_acc, n_ref = reference_alignment_accuracy(data, forget_reference_model, align_path,
                                                              mp.get("device", "auto"), mp.get("alignment_max_rows"),
                                                              mp.get("dtype", "auto"))
        for name in baselines:
            t0 = time.time()
            with timer(f"baseline {name}"):
                pset, info = baseline_predictions(data, name, max(ks), seed=seed, exclusion=exclusion,
                                                  **(baseline_params or {}).get(name, {}))
            results.append(_score(data, pset, "baseline", ks, k, thresholds, time.time() - t0, info, samples))
            write_predictions(predictions_file(pred_dir, name), data, pset.sids, candidate_scores=pset.candidate_scores)
        for name, pset in psets.items():
            t0 = time.time()
            removed = apply_exclusion(data, pset, exclusion)
            results.append(_score(data, pset, "predictions", ks, k, thresholds, time.time() - t0,
                                  {"file": str(predictions[name]), "excluded_entries_removed": removed},  # type: ignore[index]
                                  samples))
            # the row as scored (after the exclusion rule), beside the others: a paired test between
            # rows (benchmarks/paired_rows.py) reads every row from predictions/
            write_predictions(predictions_file(pred_dir, name), data, pset.sids, candidate_scores=pset.candidate_scores)
        for name, spec in specs.items():
            t0 = time.time()
            pset, info, scores = model_predictions(
                data, spec.path, max(ks), prompt_stage=spec.context, max_prompt_tokens=spec.max_prompt_tokens,
                exclusion=exclusion, alignment_path=align_path, extra_contexts=(1, 2, 3) if all_contexts else (),
                timer=timer, name=name, **mp)
            pset.name = name
            info["model_dir"] = str(spec.path)
            by_context = info.pop("by_context", None)
            row = _score(data, pset, "model", ks, k, thresholds, time.time() - t0, info, samples)
            if by_context:
                row.info["by_context"] = _by_context(data, by_context, k, n_boot, seed)
            results.append(row)
            write_predictions(predictions_file(pred_dir, name), data, pset.sids, scores, pset.candidate_scores)
        catalogue_cache: dict = {}
        for name, espec in ensembles.items():
            t0 = time.time()
            pset, info, scores = ensemble_predictions(
                data, espec, max(ks), exclusion=exclusion, device=mp.get("device", "auto"), dtype=mp.get("dtype", "auto"),
                candidate_acc=mp.get("candidate_acc", True), timer=timer, name=name, cache=catalogue_cache)
            results.append(_score(data, pset, "ensemble", ks, k, thresholds, time.time() - t0, info, samples))
            write_predictions(predictions_file(pred_dir, name), data, pset.sids, scores, pset.candidate_scores)
        with timer("forget rate, intervals, paired tests"):
            if forget_reference_model is None and forget_reference is not None:
                ref = next((r for r in results if r.name == forget_reference), None)
                if ref is None or ref.info.get("alignment_acc") is None:
                    raise EvalInputError(f"forget reference {forget_reference!r} is not a model row with an alignment accuracy")
                ref_acc = ref.info["alignment_acc"]
            forget_info = None
            if ref_acc is not None:
                forget_info = {"reference": str(forget_reference_model or forget_reference), "reference_acc": ref_acc,
                               "alignment_file": Path(align_path).name if align_path else None}
                if forget_reference_model is not None:
                    forget_info["reference_rows"] = n_ref
                for r in results:
                    if r.kind == "model" and r.info.get("alignment_acc") is not None and ref_acc > 0:
                        r.metrics["forget_rate"] = forget_rate(ref_acc, r.info["alignment_acc"])
            best = best_baselines(results, k)
            for r in results:
                for m in CI_METRICS:
                    key = m if m == "CandAcc" else f"{m}@{k}"
                    vals = samples[r.name][0].get(key, [])
                    ci = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
                    r.ci[key] = None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
            pkey = f"{PAIRED_METRIC}@{k}"
            if pkey in best:
                ref_vals = samples[best[pkey]][0].get(pkey, [])
                for r in results:
                    if r.kind != "baseline":
                        t = mcnemar(samples[r.name][0].get(pkey, []), ref_vals)
                        r.paired = {"metric": pkey, "against": best[pkey], "n": t.n, "only_row": t.only_a,
                                    "only_baseline": t.only_b, "diff": round(t.diff, 4), "p_value": t.p_value}
        report = {
            "title": title or f"conrec-eval: {data.data_dir.name}",
            "data_dir": str(data.data_dir),
            "split": str(data.split_path.relative_to(data.data_dir)),
            "sid_build": data.sid_build,
            "n_items": n_items,
            "n_rows": len(data.rows),
            "n_rows_split": len(data.all_rows),
            "reduced": data.reduced,
            "exclusion": exclusion,
            "k": int(k),
            "ks": ks,
            "thresholds": list(map(float, thresholds)),
            "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "level": 0.95},
            "best_baseline": best,
            "forget": forget_info,
            "machine": machine_info(),
            "wall_s": None,
            "timings": timer.phases,
            "rows": [r.__dict__ for r in results],
        }
        report["wall_s"] = round(time.time() - t_all, 2)
        write_report_files(report, stage)
    return report


def _score(data, pset, kind, ks, k, thresholds, wall, info, samples: dict | None = None) -> RowResult:
    metrics = compute_metrics(pset.sids, data.targets, ks, pset.candidate_scores)
    metrics.update(output_similarity(data, pset, k))
    if samples is not None:
        samples[pset.name] = metric_samples(pset.sids, data.targets, ks, pset.candidate_scores)
    sweep = deployment_sweep(data, pset, k, thresholds) if thresholds else []
    return RowResult(pset.name, kind, metrics, round(wall, 3), sweep, info)


def _by_context(data: EvalData, by_context: dict, k: int, n_boot: int, seed: int) -> dict:
    out = {}
    for ctx, entry in sorted(by_context.items()):
        buckets, _, _ = metric_samples(entry["sids"], data.targets, [k])
        cell = {kk: v for kk, v in entry.items() if kk != "sids"}
        for m in ("FHR", "HR"):
            vals = buckets.get(f"{m}@{k}", [])
            cell[f"{m}@{k}"] = float(np.mean(vals)) if vals else None
            ci = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
            cell[f"{m}@{k}_ci"] = None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
        out[str(ctx)] = cell
    return out


def load_report(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
