"""The evaluation harness: every row (baseline, model folder or predictions file) is scored the
same way on the same split, then written as one report (markdown + JSON + PNG plots).

Row kinds
* baselines: ``random``, ``popularity``, ``swing``, ``sasrec`` (:mod:`conrec_verl.baselines`);
* model folders: any Hugging Face causal LM folder whose tokenizer has this build's SID tokens;
  top-K by SID-constrained beam search, Candidate Acc by the model's own likelihood of each
  candidate, and (with an alignment file) the 4-way alignment accuracy for the forget rate;
* predictions files in the JSONL interchange format (:mod:`conrec_verl.evaluation.predictions`).

The paper's Table 2 ablation is a list of model rows, e.g. ``warm-up SFT=<dir>``,
``+ alignment=<dir>``, ... with ``forget_reference="+ alignment"``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from conrec_verl.core.metrics import DEFAULT_KS, compute_metrics, forget_rate
from conrec_verl.core.neg_filter import NegativeFilter, removal_sweep
from conrec_verl.core.prompts import render_history_prompt
from conrec_verl.core.sid import Codes, extract_sids, format_sid, parse_sid
from conrec_verl.evaluation.data import EvalData, EvalInputError, load_eval_data
from conrec_verl.evaluation.predictions import PredictionSet, read_predictions, write_predictions

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class RowResult:
    name: str
    kind: str  # baseline | model | predictions
    metrics: dict
    wall_s: float
    filter_sweep: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


# -- producing predictions ------------------------------------------------------------------------
def baseline_predictions(data: EvalData, name: str, k: int, seed: int = 0, **params) -> tuple[PredictionSet, dict]:
    from conrec_verl.baselines import BASELINES

    if name not in BASELINES:
        raise EvalInputError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    model = BASELINES[name](seed=seed, **params).fit(data)
    info = {}
    if hasattr(model, "n_pairs"):
        info["swing_pairs_used"] = int(model.n_pairs)
        info["swing_pairs_without_sid"] = int(model.n_pairs_skipped)
    if getattr(model, "losses", None):
        info["train_loss_first_last"] = [model.losses[0], model.losses[-1]]
    return PredictionSet(name, model.recommend(k), model.candidate_scores()), info


def row_prompt(row, stage: str | int):
    """The prompt a model row is asked: the row's stored prompt, or re-rendered for a stage."""
    if stage == "row":
        if row.prompt is None:
            raise EvalInputError(f"user {row.user_id} cutoff {row.cutoff_day}: no 'prompt' column; pass a prompt stage 1-3")
        return row.prompt
    s = int(stage)
    return render_history_prompt(s, [format_sid(x) for x in row.hist_neg_recent],
                                 [format_sid(x) for x in row.hist_neg], [format_sid(x) for x in row.hist_pos])


def load_model(model_dir: str | os.PathLike, device: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalInputError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model, tokenizer


def alignment_rows(path: Path, data: EvalData, max_rows: int | None = None) -> list[tuple[str, list[Codes], Codes]]:
    """(prompt, options, answer) of the 4-way alignment task from ``sft/alignment.parquet``."""
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


def model_predictions(data: EvalData, model_dir, k: int, num_beams: int | None = None, batch_size: int = 8,
                      prompt_stage: str | int = "row", device: str = "auto", candidate_acc: bool = True,
                      alignment_path: Path | None = None, alignment_max_rows: int | None = 500,
                      measure_unconstrained: bool = False, max_prompt_tokens: int | None = None,
                      exclude_history: bool = False, history_cap: int = 200,
                      ) -> tuple[PredictionSet, dict, list[list[float]]]:
    """Top-K by constrained beam search, candidate scores, alignment accuracy of one model folder.

    ``exclude_history=True`` drops the row's own past dislikes from the top K, as the baselines do
    by default: each batch is searched with ``K + (longest history in the batch, <= history_cap)``
    results and the history items are removed (kept at the end only if too few remain).
    """
    from conrec_verl.constrained import SidTokenMap, constrained_beam_search, score_sids

    model, tokenizer = load_model(model_dir, device)
    trie = data.trie()
    token_map = SidTokenMap(tokenizer, data.codebook.sizes)
    prompts = [row_prompt(r, prompt_stage) for r in data.rows]
    if exclude_history:
        results = _beam_search_excluding_history(model, tokenizer, prompts, trie, k, num_beams, batch_size,
                                                 max_prompt_tokens, [set(r.hist_neg) for r in data.rows],
                                                 history_cap)
    else:
        results = constrained_beam_search(model, tokenizer, prompts, trie, k=k, num_beams=num_beams,
                                          batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, progress=True)
    # dead beams can only come from a trie narrower than the beam at some depth; every returned SID is valid
    info: dict = {"dead_beams": int(sum(r.n_invalid for r in results))}
    if any(len(r.sids) < k for r in results):
        raise RuntimeError("constrained beam search returned fewer than K valid SIDs (should not happen)")
    cand_scores: list[list[float] | None] = []
    for r, p in zip(data.rows, prompts):
        cands = r.target.candidates
        cand_scores.append(score_sids(model, tokenizer, p, cands, max_prompt_tokens, token_map)
                           if (candidate_acc and cands) else None)
    if measure_unconstrained:
        free = constrained_beam_search(model, tokenizer, prompts, trie, k=k, num_beams=num_beams,
                                       batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, constrained=False)
        info["invalid_rate_unconstrained"] = sum(f.n_invalid for f in free) / max(1, sum(f.n_beams for f in free))
    if alignment_path is not None and Path(alignment_path).is_file():
        rows = alignment_rows(Path(alignment_path), data, alignment_max_rows)
        correct = 0
        for prompt, options, answer in rows:
            s = score_sids(model, tokenizer, prompt, options, max_prompt_tokens, token_map)
            correct += options[int(np.argmax(s))] == answer
        info["alignment_acc"] = correct / len(rows) if rows else None
        info["alignment_rows"] = len(rows)
    return PredictionSet(Path(model_dir).name, [r.sids for r in results], cand_scores), info, [r.scores for r in results]


def _beam_search_excluding_history(model, tokenizer, prompts, trie, k, num_beams, batch_size, max_prompt_tokens,
                                   histories, history_cap: int = 200):
    from conrec_verl.constrained import BeamResult, constrained_beam_search

    out = []
    for lo in range(0, len(prompts), batch_size):
        hist = histories[lo:lo + batch_size]
        wide = min(len(trie), k + min(max(len(h) for h in hist), history_cap))
        res = constrained_beam_search(model, tokenizer, prompts[lo:lo + batch_size], trie, k=wide,
                                      num_beams=max(wide, num_beams or 0), batch_size=batch_size,
                                      max_prompt_tokens=max_prompt_tokens)
        for r, h in zip(res, hist):
            fresh = [(s, v) for s, v in zip(r.sids, r.scores) if s not in h]
            seen = [(s, v) for s, v in zip(r.sids, r.scores) if s in h]
            top = (fresh + seen)[:k]
            out.append(BeamResult([s for s, _ in top], [v for _, v in top], r.n_invalid, r.n_beams))
    return out


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


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_evaluation(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    baselines: Sequence[str] = ("random", "popularity", "swing", "sasrec"),
    predictions: dict[str, str] | None = None,
    models: dict[str, str] | None = None,
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
) -> dict:
    """Evaluate every row and write ``report.md``, ``metrics.json``, PNG plots and the predictions."""
    from conrec_verl.evaluation.report import write_report

    from conrec_verl.baselines import BASELINES

    t_all = time.time()
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise EvalInputError(f"unknown baseline(s) {unknown}; choose from {sorted(BASELINES)}")
    data = load_eval_data(data_dir, split=split, max_rows=max_rows)
    ks = sorted({int(x) for x in ks} | {int(k)})
    n_items = len(data.sid_items)
    if max(ks) > n_items:
        raise EvalInputError(f"K={max(ks)} is larger than the number of items with a SID ({n_items}) in {data.data_dir}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pred_dir = stage / "predictions"
        results: list[RowResult] = []
        names = [*baselines, *(predictions or {}), *(models or {})]
        if len(set(names)) != len(names):
            raise EvalInputError(f"row names must be unique, got {names}")
        # read all predictions files first: a bad file fails before any expensive work
        psets = {name: read_predictions(path, data, max(ks), name) for name, path in (predictions or {}).items()}
        for name in baselines:
            t0 = time.time()
            pset, info = baseline_predictions(data, name, max(ks), seed=seed, **(baseline_params or {}).get(name, {}))
            results.append(_score(data, pset, "baseline", ks, k, thresholds, time.time() - t0, info))
            write_predictions(pred_dir / f"{_slug(name)}.jsonl", data, pset.sids, candidate_scores=pset.candidate_scores)
        for name, pset in psets.items():
            t0 = time.time()
            results.append(_score(data, pset, "predictions", ks, k, thresholds, time.time() - t0,
                                  {"file": str(predictions[name])}))  # type: ignore[index]
        mp = dict(model_params or {})
        if "alignment_path" not in mp and (data.data_dir / "sft" / "alignment.parquet").is_file():
            mp["alignment_path"] = data.data_dir / "sft" / "alignment.parquet"
        for name, model_dir in (models or {}).items():
            t0 = time.time()
            pset, info, scores = model_predictions(data, model_dir, max(ks), **mp)
            pset.name = name
            info["model_dir"] = str(model_dir)
            results.append(_score(data, pset, "model", ks, k, thresholds, time.time() - t0, info))
            write_predictions(pred_dir / f"{_slug(name)}.jsonl", data, pset.sids, scores, pset.candidate_scores)
        if forget_reference is not None:
            ref = next((r for r in results if r.name == forget_reference), None)
            if ref is None or ref.info.get("alignment_acc") is None:
                raise EvalInputError(f"forget reference {forget_reference!r} is not a model row with an alignment accuracy")
            for r in results:
                if r.kind == "model" and r.info.get("alignment_acc") is not None:
                    r.metrics["forget_rate"] = forget_rate(ref.info["alignment_acc"], r.info["alignment_acc"])
        report = {
            "title": title or f"conrec-eval: {data.data_dir.name}",
            "data_dir": str(data.data_dir),
            "split": str(data.split_path.relative_to(data.data_dir)),
            "sid_build": data.sid_build,
            "n_items": n_items,
            "n_rows": len(data.rows),
            "k": int(k),
            "ks": ks,
            "thresholds": list(map(float, thresholds)),
            "machine": machine_info(),
            "wall_s": None,
            "rows": [r.__dict__ for r in results],
        }
        report["wall_s"] = round(time.time() - t_all, 2)
        write_report(report, out_dir, staged=stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "row"


def _score(data, pset, kind, ks, k, thresholds, wall, info) -> RowResult:
    metrics = compute_metrics(pset.sids, data.targets, ks, pset.candidate_scores)
    sweep = deployment_sweep(data, pset, k, thresholds) if thresholds else []
    return RowResult(pset.name, kind, metrics, round(wall, 3), sweep, info)


def load_report(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
