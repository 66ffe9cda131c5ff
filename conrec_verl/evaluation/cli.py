"""``conrec-eval`` / ``python -m conrec_verl.evaluation``: evaluate baselines, model folders and
predictions files on a data folder's evaluation split and write a report folder.

Example::

    python -m conrec_verl.evaluation --data runs/ml100k/data --out runs/ml100k/eval \\
        --model "warm-up SFT=runs/ml100k/sft_warmup/huggingface" \\
        --model "+ alignment=runs/ml100k/sft_align/huggingface" --forget-reference "+ alignment"
"""

from __future__ import annotations

import argparse
import os
import sys

from conrec_verl.evaluation.data import EvalInputError
from conrec_verl.evaluation.harness import DEFAULT_THRESHOLDS, run_evaluation
from conrec_verl.evaluation.predictions import FORMAT_HELP


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (reported as one line, exit code 2)."""
    from conrec_verl.core.sid import CodebookError
    from conrec_verl.core.sid_trie import SidTrieError

    errors: tuple[type[Exception], ...] = (EvalInputError, CodebookError, SidTrieError)
    if "conrec_verl.constrained" in sys.modules:
        errors += (sys.modules["conrec_verl.constrained"].ConstrainedDecodingError,)
    return errors


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"{flag} expects NAME=PATH, got {v!r}")
        if name in out:
            raise EvalInputError(f"{flag}: row name {name!r} given twice")
        out[name] = path
    return out


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise EvalInputError(f"{flag} expects comma-separated integers, got {text!r}") from exc
    if not vals or min(vals) < 1:
        raise EvalInputError(f"{flag} values must be >= 1, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conrec-eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score CoNRec model folders, predictions files and baselines on one evaluation split "
                    "(HR/FHR/LUF/LIF@K, SID-prefix hits, Candidate Acc, invalid-SID rate, forget rate, "
                    "deployment-filter sweep). Writes report.md, metrics.json, PNG plots and predictions/.",
        epilog="Predictions file format (--predictions):\n\n" + FORMAT_HELP)
    p.add_argument("--run", default=None,
                   help="a run folder: --data defaults to RUN/data and --out to RUN/eval")
    p.add_argument("--data", default=None, help="data folder written by data_prep (docs/data-format.md)")
    p.add_argument("--out", default=None, help="report folder to write")
    p.add_argument("--split", default="eval/test.parquet", help="evaluation split inside the data folder")
    p.add_argument("--baselines", default="random,popularity,swing,sasrec",
                   help="comma-separated baselines, or 'none' (default: %(default)s)")
    p.add_argument("--predictions", action="append", metavar="NAME=FILE", help="a predictions JSONL row (repeatable)")
    p.add_argument("--model", action="append", metavar="NAME=DIR",
                   help="a Hugging Face model folder row, decoded by SID-constrained beam search (repeatable)")
    p.add_argument("--k", type=int, default=20, help="K of the main table (default: %(default)s)")
    p.add_argument("--ks", default="1,5,10,20", help="K values of the metric-by-K plot (default: %(default)s)")
    p.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)),
                   help="deployment-filter cosine thresholds to sweep, or 'none' (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sasrec-epochs", type=int, default=40)
    p.add_argument("--swing-recency-decay", type=float, default=1.0)
    p.add_argument("--keep-history", action="store_true",
                   help="let baselines recommend items already in the user's negative history")
    p.add_argument("--prompt-stage", default="row", choices=["row", "1", "2", "3"],
                   help="model prompts: the row's stored prompt, or re-rendered for progressive stage 1-3")
    p.add_argument("--num-beams", type=int, default=None, help="beams (>= K; default K)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="left-truncate longer prompts")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--model-exclude-history", action="store_true",
                   help="drop each row's past dislikes from model rows' top K (baselines do so unless --keep-history)")
    p.add_argument("--no-candidate-acc", action="store_true", help="skip scoring the candidates with model rows")
    p.add_argument("--measure-unconstrained", action="store_true",
                   help="also report the share of beams that are not a valid SID when the same beam search runs without the constraint")
    p.add_argument("--alignment", default=None,
                   help="alignment task parquet for the forget rate (default: <data>/sft/alignment.parquet)")
    p.add_argument("--forget-reference", default=None,
                   help="model row whose alignment accuracy is 'after alignment SFT' for the forget rate")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (SASRec, CPU decoding); 1 is fastest for tiny models on a busy machine")
    p.add_argument("--title", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run:
        args.data = args.data or os.path.join(args.run, "data")
        args.out = args.out or os.path.join(args.run, "eval")
    if not args.data or not args.out:
        parser.error("give --data and --out, or --run")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        baselines = [] if args.baselines.strip().lower() == "none" else [
            b.strip() for b in args.baselines.split(",") if b.strip()]
        try:
            thresholds = [] if args.thresholds.strip().lower() == "none" else [
                float(x) for x in args.thresholds.split(",")]
        except ValueError as exc:
            raise EvalInputError(f"--thresholds expects comma-separated numbers, got {args.thresholds!r}") from exc
        model_params = {"num_beams": args.num_beams, "batch_size": args.batch_size, "device": args.device,
                        "prompt_stage": args.prompt_stage, "candidate_acc": not args.no_candidate_acc,
                        "measure_unconstrained": args.measure_unconstrained,
                        "max_prompt_tokens": args.max_prompt_tokens,
                        "exclude_history": args.model_exclude_history}
        if args.alignment:
            model_params["alignment_path"] = args.alignment
        exclude = not args.keep_history
        report = run_evaluation(
            args.data, args.out, baselines=baselines,
            predictions=_pairs(args.predictions, "--predictions"), models=_pairs(args.model, "--model"),
            k=args.k, ks=_ints(args.ks, "--ks"), thresholds=thresholds, seed=args.seed, max_rows=args.max_rows,
            baseline_params={
                "random": {"exclude_history": exclude}, "popularity": {"exclude_history": exclude},
                "swing": {"exclude_history": exclude, "recency_decay": args.swing_recency_decay},
                "sasrec": {"exclude_history": exclude, "epochs": args.sasrec_epochs}},
            model_params=model_params, forget_reference=args.forget_reference, title=args.title,
            split=args.split,
        )
    except ValueError as exc:
        if not isinstance(exc, user_errors()):
            raise  # a bug, not bad input: keep the traceback
        print(f"conrec-eval: error: {exc}", file=sys.stderr)
        return 2
    k = report["k"]
    for r in report["rows"]:
        fhr = r["metrics"].get(f"FHR@{k}")
        print(f"{r['name']:>24}  FHR@{k}={'–' if fhr is None else f'{fhr:.4f}'}")
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
