"""Validation hit rates of model folders: what picks a GRPO checkpoint by the metric evaluation reports.

verl validates a GRPO run with one greedy answer per row and the mean reward; on MovieLens-100K
both rose at every checkpoint while FHR@20 on the evaluation split fell (BENCHMARKS.md). This
module scores model folders the way :mod:`conrec_verl.evaluation` scores the test split -- top K
by item-constrained beam search, the same exclusion rule and prompt budget, FHR@K / HR@K from
:mod:`conrec_verl.core.metrics` -- on the validation users' rows (``rl/val.parquet``, never
trained on), so the pipeline (``grpo.select_by_val.metric: FHR@20``) can pick the checkpoint, or
keep the model GRPO started from, by the metric that is reported::

    python -m conrec_verl.evaluation.select --data RUN/data --model start=RUN/models/sft_warmup \\
        --model step8=RUN/grpo/global_step_8/actor/huggingface --metric FHR@20 --out val.json

It prints and writes ``{"metric", "k", "split", "rows", "scores": {name: value}, "best": name}``
(ties go to the model named first).

With ``--ensembles`` it scores every non-empty subset of the ``--model`` folders as an ensemble
row of ``conrec-eval --ensemble`` (each item ranked by the members' mean log-probability, exact over
the catalogue) and names the best subset on the same validation rows, so that the members of a
reported ensemble are chosen without looking at the evaluation split::

    python -m conrec_verl.evaluation.select --data RUN/data --ensembles \
        --model a=RUN/models/grpo --model b=RUN2/models/grpo --model c=RUN3/models/grpo

(ties go to fewer members, then to the subset listed first). It then writes ``{"metric", "k",
"split", "rows", "context", "budget", "exclusion", "folders": {name: folder}, "ensembles":
[{"members": [name, ...], "score": value}, ...] (best first), "best": [name, ...]}`` and prints the
``conrec-eval --ensemble`` arguments of the best subset on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Mapping

from conrec_verl.core.eval_data import DECODES, DEFAULT_EXCLUSION, EXCLUSION_RULES, EvalInputError, load_eval_data
from conrec_verl.core.metrics import HIT_METRIC_RE as METRIC_RE, metric_samples


def parse_metric(metric: str) -> tuple[str, int]:
    """``"FHR@20"`` -> ``("FHR", 20)``; anything else is a ValueError naming the forms allowed."""
    m = METRIC_RE.match(str(metric).strip())
    if not m:
        raise ValueError(f"validation metric {metric!r} is not FHR@K or HR@K (e.g. FHR@20)")
    return m.group(1), int(m.group(2))


def validation_scores(data_dir, models: Mapping[str, str], metric: str = "FHR@20",
                      split: str = "rl/val.parquet", context: int | str = 3, budget: int | None = 384,
                      exclusion: str = DEFAULT_EXCLUSION, device: str = "auto", batch_size: int = 8,
                      num_beams: int | None = None, decode: str = "beam") -> dict:
    """``metric`` of every model folder in ``models`` (name -> folder, in order) on ``split``, each
    model decoded as a ``conrec-eval`` model row with that ``decode`` (beam or exact)."""
    from conrec_verl.evaluation.harness import model_predictions

    name, k = parse_metric(metric)
    if not models:
        raise ValueError("no model folders to score")
    data = load_eval_data(data_dir, split, unique_rows=False)
    targets = [r.target for r in data.rows]
    scores: dict[str, float] = {}
    n_rows = 0
    for label, folder in models.items():
        pset, _, _ = model_predictions(data, folder, k, num_beams=num_beams, batch_size=batch_size,
                                       prompt_stage=context, device=device, candidate_acc=False,
                                       max_prompt_tokens=budget, exclusion=exclusion, name=label, decode=decode)
        scores[label], n_rows = hit_rate(pset.sids, targets, name, k)
    finite = {m: v for m, v in scores.items() if math.isfinite(v)}
    best = max(finite.values()) if finite else None
    return {"metric": f"{name}@{k}", "k": k, "split": split, "rows": n_rows, "context": context, "budget": budget,
            "exclusion": exclusion, "decode": decode, "scores": scores,
            "best": next((m for m, v in finite.items() if v == best), None)}


#: subsets grow as 2^n: more folders than this is refused rather than left running for hours
MAX_ENSEMBLE_FOLDERS = 12


def hit_rate(top, targets, metric: str, k: int) -> tuple[float, int]:
    """Mean ``metric@k`` (``FHR``/``HR``) of ranked lists over the rows that count, and that count,
    as :func:`conrec_verl.core.metrics.metric_samples` scores them (nan, 0 when no row counts)."""
    values = metric_samples(top, targets, [k])[0].get(f"{metric}@{k}", [])
    return (float(sum(values) / len(values)) if values else float("nan")), len(values)


def ensemble_search(data_dir, models: Mapping[str, str], metric: str = "FHR@20", split: str = "rl/val.parquet",
                    context: int | str = 3, budget: int | None = 384, exclusion: str = DEFAULT_EXCLUSION,
                    device: str = "auto") -> dict:
    """``metric`` of every non-empty subset of ``models`` as an ensemble row of ``conrec-eval``
    (:func:`conrec_verl.evaluation.harness.mean_catalogue_scores` then ``rank_catalogue``, the
    functions the evaluation calls) on ``split``; the best subset (ties: fewer members, then the
    first listed) under ``best``."""
    from conrec_verl.evaluation.harness import EnsembleSpec, mean_catalogue_scores, rank_catalogue

    name, k = parse_metric(metric)
    names = list(models)
    if not names:
        raise ValueError("no model folders to score")
    if len(names) > MAX_ENSEMBLE_FOLDERS:
        raise ValueError(f"--ensembles scores 2^n - 1 subsets: give at most {MAX_ENSEMBLE_FOLDERS} folders, got {len(names)}")
    EnsembleSpec([models[m] for m in names], context, budget)  # the folder checks of an ensemble row (no repeats)
    data = load_eval_data(data_dir, split, unique_rows=False)
    targets = [r.target for r in data.rows]
    cache: dict = {}
    results = []
    n_rows = 0
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            mean, _ = mean_catalogue_scores(data, [models[m] for m in subset], context, budget, device, cache=cache)
            top, _, _ = rank_catalogue(data, mean, k, exclusion)
            value, n_rows = hit_rate(top, targets, name, k)
            results.append({"members": list(subset), "score": value})
    finite = [r for r in results if math.isfinite(r["score"])]
    best = max(finite, key=lambda r: r["score"]) if finite else None  # max keeps the first of equals
    ranked = sorted(results, key=lambda r: -r["score"] if math.isfinite(r["score"]) else math.inf)
    return {"metric": f"{name}@{k}", "k": k, "split": split, "rows": n_rows, "context": context, "budget": budget,
            "exclusion": exclusion, "folders": dict(models), "ensembles": ranked,
            "best": None if best is None else best["members"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conrec_verl.evaluation.select", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="data folder written by data_prep")
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR, repeatable (order breaks ties)")
    ap.add_argument("--metric", default="FHR@20", help="FHR@K or HR@K (default FHR@20)")
    ap.add_argument("--split", default="rl/val.parquet", help="rows to score (default: the validation users')")
    ap.add_argument("--context", default="3", choices=["1", "2", "3", "row"],
                    help="prompt context 1-3, or row (the split's stored prompt); default 3")
    ap.add_argument("--budget", default="384", help="prompt token budget, or none (default 384)")
    ap.add_argument("--exclusion", default=DEFAULT_EXCLUSION, choices=EXCLUSION_RULES)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decode", default="beam", choices=DECODES,
                    help="how each --model row finds its top K, as conrec-eval --decode (ensembles are always exact)")
    ap.add_argument("--ensembles", action="store_true",
                    help="score every subset of the --model folders as a conrec-eval --ensemble row and name the best")
    ap.add_argument("--out", help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    from conrec_verl.evaluation.cli import _budget, _pairs

    try:
        context = args.context if args.context == "row" else int(args.context)
        common = (args.data, _pairs(args.model, "--model"), args.metric, args.split, context,
                  _budget(args.budget, "--budget"), args.exclusion, args.device)
        result = ensemble_search(*common) if args.ensembles else validation_scores(*common, decode=args.decode)
    except (ValueError, EvalInputError, OSError) as exc:
        print(f"conrec-select: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    if args.ensembles and result["best"]:  # a hint on stderr: stdout stays one JSON document
        row = "+".join(result["best"])
        folders = ",".join(result["folders"][m] for m in result["best"])
        budget = "none" if result["budget"] is None else result["budget"]
        print(f"best on {result['split']}: conrec-eval ... --ensemble \"{row}={folders}\" "
              f"--model-prompt \"{row}={result['context']},{budget}\"", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
