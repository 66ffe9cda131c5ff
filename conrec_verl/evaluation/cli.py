"""``conrec-eval`` / ``python -m conrec_verl.evaluation``: evaluate baselines, model folders and
predictions files on a data folder's evaluation split and write a report folder.

Example::

    python -m conrec_verl.evaluation --data runs/ml100k/data --out runs/ml100k/eval \\
        --model "warm-up SFT=runs/ml100k/models/sft_warmup" --model-prompt "warm-up SFT=2,504" \\
        --model "GRPO=runs/ml100k/models/grpo" --model-prompt "GRPO=3,384" \\
        --forget-reference-model runs/ml100k/models/sft_alignment \\
        --ensemble "two runs=runs/ml100k/models/grpo,runs/ml100k_win/models/grpo"
"""

from __future__ import annotations

import argparse
import os
import sys

from conrec_verl.core.eval_data import DECODES, DEFAULT_EXCLUSION, EXCLUSION_RULES, EvalInputError
from conrec_verl.evaluation.harness import (
    DEFAULT_CONTEXT,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_THRESHOLDS,
    EnsembleSpec,
    ModelSpec,
    run_evaluation,
)
from conrec_verl.evaluation.predictions import FORMAT_HELP


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (reported as one line, exit code 2)."""
    from conrec_verl.core.sid import CodebookError
    from conrec_verl.core.sid_trie import SidTrieError

    errors: tuple[type[Exception], ...] = (EvalInputError, CodebookError, SidTrieError)
    if "conrec_verl.constrained" in sys.modules:
        errors += (sys.modules["conrec_verl.constrained"].ConstrainedDecodingError,)
    return errors


def _pairs(values: list[str] | None, flag: str, form: str = "NAME=PATH") -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"{flag} expects {form}, got {v!r}")
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


def _budget(text: str, flag: str) -> int | None:
    if str(text).strip().lower() in ("none", "0"):
        return None
    try:
        v = int(text)
    except ValueError as exc:
        raise EvalInputError(f"{flag} expects a number of tokens or 'none', got {text!r}") from exc
    if v < 1:
        raise EvalInputError(f"{flag} must be >= 1 (or 'none'), got {text!r}")
    return v


def model_specs(models: dict[str, str], prompts: dict[str, str], context: str, budget: int | None,
                ensembles: dict[str, str] | None = None) -> tuple[dict[str, ModelSpec], dict[str, EnsembleSpec]]:
    """``--model NAME=DIR`` and ``--ensemble NAME=DIR,DIR,...`` rows, with ``--model-prompt
    NAME=CONTEXT[,BUDGET]`` overrides (an ensemble's override applies to all its members)."""
    ensembles = ensembles or {}
    unknown = sorted(set(prompts) - set(models) - set(ensembles))
    if unknown:
        raise EvalInputError(f"--model-prompt names rows that are not --model or --ensemble rows: {unknown}")

    def prompt(name):
        ctx, b = context, budget
        if name in prompts:
            c, _, bb = prompts[name].partition(",")
            ctx = c.strip() or context
            if bb.strip():
                b = _budget(bb.strip(), f"--model-prompt {name}")
        return ctx, b

    out = {name: ModelSpec(path, *prompt(name)) for name, path in models.items()}
    ens = {}
    for name, paths in ensembles.items():
        members = [p.strip() for p in paths.split(",") if p.strip()]
        try:
            if not members:
                raise EvalInputError("expects NAME=DIR[,DIR...], got no folder")
            ens[name] = EnsembleSpec(members, *prompt(name))
        except EvalInputError as exc:
            raise EvalInputError(f"--ensemble {name}: {exc}") from None
    return out, ens


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
    from conrec_verl.baselines import DEFAULT_BASELINES

    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help="comma-separated baselines, or 'none' (default: all, %(default)s)")
    p.add_argument("--exclusion", default=DEFAULT_EXCLUSION, choices=list(EXCLUSION_RULES),
                   help="items no row may recommend: the user's items before the cutoff (interacted = liked or "
                        "disliked), past dislikes only, or none; the same rule for every row (default: %(default)s)")
    p.add_argument("--predictions", action="append", metavar="NAME=FILE", help="a predictions JSONL row (repeatable)")
    p.add_argument("--model", action="append", metavar="NAME=DIR",
                   help="a Hugging Face model folder row, decoded by SID-constrained beam search (repeatable)")
    p.add_argument("--k", type=int, default=20, help="K of the main table (default: %(default)s)")
    p.add_argument("--ks", default="1,5,10,20", help="K values of the metric-by-K plot (default: %(default)s)")
    p.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)),
                   help="deployment-filter cosine thresholds to sweep, or 'none' (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="score only the first N rows: a smoke run (the report says so and makes no goal claim; "
                        "baselines still learn from the whole split)")
    p.add_argument("--seed", type=int, default=0, help="seeds the baselines and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--sasrec-epochs", type=int, default=200, help="SASRec epoch cap (early stopping decides)")
    p.add_argument("--sasrec-patience", type=int, default=20,
                   help="SASRec early stopping: epochs without validation improvement (0 = train all epochs)")
    p.add_argument("--sasrec-target-span", type=int, default=1,
                   help="SASRec: each position learns its next N dislikes (dense all-action; default 1: the next one)")
    p.add_argument("--swing-recency-decay", type=float, default=1.0)
    p.add_argument("--prompt-context", "--prompt-stage", dest="prompt_context", default=str(DEFAULT_CONTEXT),
                   choices=["row", "1", "2", "3"],
                   help="model prompts: progressive context 1-3 rendered within --max-prompt-tokens, or the "
                        "split's stored prompt (default: %(default)s, the last GRPO stage's)")
    p.add_argument("--ensemble", action="append", metavar="NAME=DIR[,DIR...]",
                   help="an ensemble row: every catalogue item ranked by the mean of the model folders' log-probabilities "
                        "of its SID (exact; one folder = exact decoding of that model) (repeatable)")
    p.add_argument("--model-prompt", action="append", metavar="NAME=CONTEXT[,BUDGET]",
                   help="a model or ensemble row's own context and token budget, e.g. 'warm-up SFT=2,504' (repeatable)")
    p.add_argument("--all-contexts", action="store_true",
                   help="also decode every model row in contexts 1, 2 and 3 (by-context table)")
    p.add_argument("--num-beams", type=int, default=None, help="beams (>= K; default K)")
    p.add_argument("--decode", choices=DECODES, default="beam",
                   help="how model rows find their top K: beam (item-constrained beam search, the paper's) or exact "
                        "(every item's log-probability, level by level down the SID trie: the model's true top K)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-prompt-tokens", default=str(DEFAULT_PROMPT_TOKENS),
                   help="token budget of a model prompt (chat template included); the oldest history is dropped "
                        "until it fits, as in training; 'none' = no budget (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU; float32 on CUDA ranks as the CPU does)")
    p.add_argument("--no-candidate-acc", action="store_true", help="skip scoring the candidates with model rows")
    p.add_argument("--measure-unconstrained", action="store_true",
                   help="also report the share of beams that are not a valid SID when the same beam search runs without the constraint")
    p.add_argument("--alignment", default=None,
                   help="alignment questions for the forget rate (default: <data>/sft/alignment_heldout.parquet, "
                        "the questions data_prep held out of SFT)")
    p.add_argument("--forget-reference-model", default=None, metavar="DIR",
                   help="the alignment-SFT model: its alignment accuracy is the forget rate's reference (paper Table 3)")
    p.add_argument("--forget-reference", default=None,
                   help="or: the model row whose alignment accuracy is the reference")
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
        if args.k < 1:
            raise EvalInputError(f"--k must be >= 1, got {args.k}")
        if args.max_rows is not None and args.max_rows < 1:
            raise EvalInputError(f"--max-rows must be >= 1, got {args.max_rows}")
        model_params = {"num_beams": args.num_beams, "batch_size": args.batch_size, "device": args.device,
                        "dtype": args.dtype, "decode": args.decode,
                        "candidate_acc": not args.no_candidate_acc,
                        "measure_unconstrained": args.measure_unconstrained}
        if args.alignment:
            model_params["alignment_path"] = args.alignment
        specs, ensembles = model_specs(_pairs(args.model, "--model"), _pairs(args.model_prompt, "--model-prompt"),
                                       args.prompt_context, _budget(args.max_prompt_tokens, "--max-prompt-tokens"),
                                       _pairs(args.ensemble, "--ensemble", "NAME=DIR[,DIR...]"))
        report = run_evaluation(
            args.data, args.out, baselines=baselines,
            predictions=_pairs(args.predictions, "--predictions"), models=specs, ensembles=ensembles,
            k=args.k, ks=_ints(args.ks, "--ks"), thresholds=thresholds, seed=args.seed, max_rows=args.max_rows,
            baseline_params={
                "swing": {"recency_decay": args.swing_recency_decay},
                "sasrec": {"epochs": args.sasrec_epochs, "patience": args.sasrec_patience,
                           "target_span": args.sasrec_target_span}},
            model_params=model_params, forget_reference=args.forget_reference,
            forget_reference_model=args.forget_reference_model, title=args.title,
            split=args.split, exclusion=args.exclusion, all_contexts=args.all_contexts, n_boot=args.bootstrap,
        )
    except ValueError as exc:
        if not isinstance(exc, user_errors()):
            raise  # a bug, not bad input: keep the traceback
        print(f"conrec-eval: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a read-only --out folder, or --out under a file: one line, not a traceback
        print(f"conrec-eval: error: cannot write or read {exc.filename or args.out}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    k = report["k"]
    for r in report["rows"]:
        fhr = r["metrics"].get(f"FHR@{k}")
        print(f"{r['name']:>24}  FHR@{k}={'–' if fhr is None else f'{fhr:.4f}'}")
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
