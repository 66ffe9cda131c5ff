"""Regenerate the quality section of BENCHMARKS.md on the two real logs.

    python benchmarks/bench_quality.py --work runs/bench_quality [--datasets kuairand,ml100k] \\
        [--model "ml100k:warm-up SFT=runs/ml100k/sft/huggingface" ...] [--write BENCHMARKS.md]

For each dataset it
1. builds the data folder with data_prep (KuaiRand: the bundled sample; MovieLens-100K: fetched at
   run time into ``<work>/cache`` by ``data_prep.fetch_movielens``, never committed), unless
   ``<work>/<dataset>/data`` already exists;
2. runs the evaluation harness on its whole ``eval/test.parquet``: every baseline (random,
   popularity, recency-weighted popularity, Swing item-CF, co-dislike item-CF, early-stopped SASRec)
   plus every model row given with ``--model`` (the Table 2 ablation: warm-up SFT, + alignment,
   + progressive GRPO, + future negative reward, + positive penalty, + cross-stage cleaning), each decoded by
   SID-constrained beam search with the prompt context and token budget it was trained with
   (SFT-only rows: ``--sft-prompt``; GRPO rows: ``--grpo-prompt``), the same exclusion rule for
   every row, bootstrap intervals and McNemar tests against the best baseline;
3. writes ``<work>/<dataset>/eval/`` (report.md, metrics.json, plots, predictions) and replaces the
   text between ``<!-- quality:begin -->`` and ``<!-- quality:end -->`` in ``--write`` (appended
   when the markers are missing) with both datasets' tables, the machine, the wall times, the cold
   share, the model rows still missing, the distance to the project goal (full-pipeline
   FHR@20 >= 1.25 x the best baseline) and the Table 2 steps, each ablation row against the row
   before it (``step_table``: whether every step is non-decreasing within its interval).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conrec_verl.core.eval_data import load_eval_data  # noqa: E402
from conrec_verl.core.stats import bootstrap_ci, mcnemar  # noqa: E402
from conrec_verl.evaluation.harness import ModelSpec, run_evaluation  # noqa: E402
from conrec_verl.evaluation.predictions import hit_samples, predictions_file  # noqa: E402
from conrec_verl.evaluation.report import GOAL_RATIO, markdown  # noqa: E402
from conrec_verl.io_utils import atomic_write_text  # noqa: E402

ABLATION_ROWS = ["warm-up SFT", "+ alignment", "+ progressive GRPO", "+ future negative reward", "+ positive penalty",
                 "+ cross-stage cleaning"]
SFT_ROWS = ABLATION_ROWS[:2]  # trained by SFT only: asked in the warm-up SFT's context
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
DATASETS = {
    "kuairand": {"title": "KuaiRand like/hate sample (bundled)", "config": "kuairand", "overrides": []},
    "ml100k": {"title": "MovieLens-100K (rating <= 2 = dislike)", "config": "movielens", "overrides": []},
}


def prepare(name: str, work: Path, extra: list[str]) -> Path:
    data = work / name / "data"
    if (data / "eval" / "test.parquet").is_file():
        print(f"[{name}] reusing {data}")
        return data
    env = dict(os.environ)
    overrides = list(DATASETS[name]["overrides"]) + extra
    if name == "ml100k":
        cache = work / "cache"
        subprocess.run([sys.executable, "-m", "conrec_verl.data_prep.fetch_movielens", "--cache", str(cache)], check=True, env=env)
        overrides.append(f"input.path={cache / 'ml-100k'}")
    hydra_dir = tempfile.mkdtemp(prefix="hydra_")
    subprocess.run([sys.executable, "-m", "conrec_verl.data_prep", "--config-name", DATASETS[name]["config"], f"out_dir={data}",
                    "progress=false", f"hydra.run.dir={hydra_dir}", "hydra.output_subdir=null", *overrides],
                   check=True, env=env)
    return data


def training_time(model_dir: str) -> tuple[float, list[str]] | None:
    """Wall seconds the pipeline spent to produce ``model_dir`` (``RUN/models/<x>``): the phases recorded
    in ``RUN/pipeline.json`` up to the one that exported it (SFT phases a GRPO branch inherited from
    its parent run included), or ``None`` when the model was not made by the pipeline."""
    model = Path(model_dir).resolve()
    state_path = model.parent.parent / "pipeline.json"
    if not state_path.is_file():
        return None
    done = json.loads(state_path.read_text()).get("done", {})
    total, phases = 0.0, []
    for phase, info in done.items():
        if phase == "eval":
            continue
        total += float(info.get("seconds", 0.0))
        if not info.get("skipped"):
            phases.append(phase)
        # the last two parts (models/<x>): a run folder copied elsewhere (another machine) still matches
        if info.get("path") and Path(info["path"]).parts[-2:] == model.parts[-2:]:
            return total, phases
    return None


def section(name: str, report: dict, missing: list[str], models: dict[str, str] | None = None,
            work: Path | None = None) -> str:
    body = markdown(report)
    body = re.sub(r"^## ", "#### ", body, flags=re.M)
    body = re.sub(r"^# .*\n", "", body, count=1)
    body = body.replace("Plots: `", f"Plots (in `{name}/eval/`): `")
    body = body.replace(str(ROOT) + os.sep, "")  # model_dir=runs/... rather than this machine's checkout path
    if work is not None and not work.resolve().is_relative_to(ROOT):  # a work folder elsewhere: $WORK/...
        body = body.replace(str(work.resolve()) + os.sep, "$WORK/")
    lines = [f"### {DATASETS[name]['title']}", "", body.strip(), ""]
    times = {row: training_time(path) for row, path in (models or {}).items()}
    if any(times.values()):
        lines += ["#### Training wall time per model row", "", "| row | pipeline phases | training wall s |", "|---|---|---|"]
        for row, t in times.items():
            if t is not None:
                lines.append(f"| {row} | {', '.join(t[1])} | {t[0]:.0f} |")
        lines.append("")
    if missing:
        lines += [f"Model rows not evaluated yet (no trained model given): {', '.join(missing)}.", ""]
    k = report["k"]
    rows = report["rows"]
    base = [r for r in rows if r["kind"] == "baseline" and r["metrics"].get(f"FHR@{k}") is not None]
    full = next((r for r in rows if r["name"] == ABLATION_ROWS[-1]), None)
    if base:
        best = max(base, key=lambda r: r["metrics"][f"FHR@{k}"])
        target = GOAL_RATIO * best["metrics"][f"FHR@{k}"]
        if full is None:
            lines.append(f"Goal: the full pipeline needs FHR@{k} >= {target:.4f} ({GOAL_RATIO}x {best['name']}); "
                         "not measured yet.")
        elif report.get("reduced"):
            lines.append("Goal: not assessed (a smoke run on part of the split claims nothing).")
        else:
            got = full["metrics"][f"FHR@{k}"]
            t = full.get("paired") or {}
            sig = bool(t) and t["p_value"] < 0.05 and t["diff"] > 0
            met = got >= target and sig
            lines.append(f"Goal: full pipeline FHR@{k} = {got:.4f} vs target {target:.4f} ({GOAL_RATIO}x {best['name']}; "
                         + ("met" if met else f"{max(0.0, target - got):.4f} short") + "); paired test against "
                         f"{best['name']}: difference {t.get('diff', 0):+.4f}, McNemar p = {t.get('p_value', float('nan')):.2g}.")
        lines.append("")
    return "\n".join(lines)


def step_table(hits: dict[str, list[float]], k: int = 20, n_boot: int = 1000, seed: int = 0) -> tuple[list[str], bool | None]:
    """The Table 2 steps read as the goal asks ("each step non-decreasing within its interval"):
    every ablation row in ``hits`` (per-row FHR@k hits over the same evaluation rows) against the
    ablation row before it. A step *drops* when it is significantly below that row (exact McNemar,
    p < 0.05, negative difference) or that row's FHR lies above the step's bootstrap 95% interval;
    a lower value within noise is not a drop. Returns the markdown lines and whether no step drops
    (``None`` with fewer than two rows)."""
    present = [r for r in ABLATION_ROWS if r in hits]
    if len(present) < 2:
        return [], None
    lines = [f"#### Table 2 steps (each row against the row before it, FHR@{k})", "",
             "A step drops when it is significantly below the row before it (exact McNemar on the same rows, p < 0.05) "
             "or the row before it lies above the step's bootstrap 95% interval.", "",
             "| step | FHR@{0} [95% interval] | row before it | difference | rows only the step hits | rows only the row before hits "
             "| McNemar p | row before above the interval | drops |".format(k),
             "|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for prev, cur in zip(present, present[1:]):
        a, b = hits[cur], hits[prev]
        if len(a) != len(b):
            raise ValueError(f"rows {cur!r} and {prev!r} were scored on {len(a)} and {len(b)} rows: not paired")
        t = mcnemar(a, b)
        lo, hi = bootstrap_ci(a, n_boot=n_boot, seed=seed) or (float("nan"), float("nan"))
        mean_a, mean_b = sum(a) / max(len(a), 1), sum(b) / max(len(b), 1)
        above = mean_b > hi
        drop = (t.diff < 0 and t.p_value < 0.05) or above
        ok = ok and not drop
        lines.append(f"| {cur} | {mean_a:.4f} [{lo:.3f}, {hi:.3f}] | {prev} ({mean_b:.4f}) | {t.diff:+.4f} | {t.only_a} | "
                     f"{t.only_b} | {t.p_value:.2g} | {'yes' if above else 'no'} | {'**yes**' if drop else 'no'} |")
    missing = [r for r in ABLATION_ROWS if r not in hits]
    lines += ["", f"Table 2 steps non-decreasing within their intervals: **{'yes' if ok else 'no'}**"
              + (f" (rows not evaluated: {', '.join(missing)}; each step is taken against the row before it that was)" if missing else "")
              + ".", ""]
    return lines, ok


def prompt_for(values: list[str], dataset: str, default: str = "3,384") -> str:
    """The ``CONTEXT,TOKENS`` for ``dataset`` from ``[DATASET:]CONTEXT,TOKENS`` values (last wins)."""
    out = default
    for v in values:
        ds, sep, rest = v.partition(":")
        if not sep:
            out = v
        elif ds == dataset:
            out = rest
    return out


def write_section(path: Path, text: str) -> None:
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n## Quality\n\n" + block
    atomic_write_text(path, new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench_quality", help="working folder (data, reports)")
    p.add_argument("--datasets", default="kuairand,ml100k")
    p.add_argument("--model", action="append", default=[], metavar="DATASET:NAME=DIR",
                   help="a model row, e.g. 'ml100k:+ alignment=runs/ml/align/huggingface' (repeatable)")
    p.add_argument("--forget-reference-model", action="append", default=[], metavar="DATASET=DIR",
                   help="the alignment-SFT model of a dataset (the forget rate's reference, paper Table 3)")
    p.add_argument("--sft-prompt", action="append", default=[], metavar="[DATASET:]CONTEXT,TOKENS",
                   help="context and token budget of the SFT-only rows (default 3,384: cpu_tiny warm-up SFT teaches "
                        "contexts 1-3 within 96 history items); DATASET: for one log only (repeatable)")
    p.add_argument("--grpo-prompt", action="append", default=[], metavar="[DATASET:]CONTEXT,TOKENS",
                   help="context and token budget of the GRPO rows (default 3,384: cpu_tiny's last stage)")
    p.add_argument("--all-contexts", action="store_true",
                   help="also decode every model row in contexts 1, 2 and 3 (the by-context table)")
    p.add_argument("--prep-override", action="append", default=[], metavar="DATASET:KEY=VALUE",
                   help="extra data_prep override for one dataset (repeatable)")
    p.add_argument("--sasrec-epochs", type=int, default=200, help="SASRec epoch cap (early stopping decides)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model dtype (float32 on CUDA ranks as the CPU does)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="score only the first N rows of each split: a smoke run that claims nothing")
    p.add_argument("--no-unconstrained", action="store_true",
                   help="skip the second, unconstrained decoding that measures invalid_rate_unconstrained")
    p.add_argument("--command", default="python benchmarks/bench_quality.py",
                   help="the command named in the section's header (run_ablation.sh passes itself)")
    p.add_argument("--write", default=None, help="markdown file whose quality section to replace (e.g. BENCHMARKS.md)")
    args = p.parse_args()
    work = Path(args.work)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown datasets {unknown}; choose from {sorted(DATASETS)}")
    models: dict[str, dict[str, str]] = {d: {} for d in names}
    refs = dict(r.partition("=")[::2] for r in args.forget_reference_model)
    for spec in args.model:
        ds, sep, rest = spec.partition(":")
        row, sep2, path = rest.partition("=")
        if not (sep and sep2) or ds not in models:
            raise SystemExit(f"--model expects DATASET:NAME=DIR with DATASET in {names}, got {spec!r}")
        models[ds][row] = path
    t0 = time.time()
    parts = []
    for name in names:
        t = time.time()
        extra = [o.partition(":")[2] for o in args.prep_override if o.partition(":")[0] == name]
        data = prepare(name, work, extra)
        rows = models[name]
        specs = {}
        prompts_used = {"sft": prompt_for(args.sft_prompt, name), "grpo": prompt_for(args.grpo_prompt, name)}
        for row, path in rows.items():
            ctx, _, budget = prompts_used["sft" if row in SFT_ROWS else "grpo"].partition(",")
            specs[row] = ModelSpec(path, ctx, int(budget) if budget else None)
        report = run_evaluation(
            data, work / name / "eval", models=specs, k=20, max_rows=args.max_rows,
            baseline_params={"sasrec": {"epochs": args.sasrec_epochs}},
            model_params={"device": args.device, "dtype": args.dtype, "measure_unconstrained": not args.no_unconstrained},
            forget_reference_model=refs.get(name) if refs.get(name) and Path(refs[name]).is_dir() else None,
            all_contexts=args.all_contexts, title=DATASETS[name]["title"])
        missing = [r for r in ABLATION_ROWS if r not in rows]
        part = section(name, report, missing, rows, work)
        ablation = [row for row in rows if row in ABLATION_ROWS]
        if len(ablation) >= 2:  # each Table 2 step against the row before it, on the rows as scored
            eval_data = load_eval_data(data, max_rows=args.max_rows)
            hits = {row: hit_samples(predictions_file(work / name / "eval" / "predictions", row), eval_data, 20)
                    for row in ablation}
            part = part.rstrip("\n") + "\n\n" + "\n".join(step_table(hits, 20)[0])
        part = part.replace("\n\n", f"\n\nModel prompts (context,tokens): SFT-only rows {prompts_used['sft']}, "
                            f"GRPO rows {prompts_used['grpo']}.\n\n", 1)
        parts.append(part)
        print(f"[{name}] done in {time.time() - t:.0f} s -> {work / name / 'eval' / 'report.md'}")
    budget = []
    if args.max_rows:
        budget.append(f"SMOKE RUN: only the first {args.max_rows} evaluation rows of each split, no claims")
    if args.sasrec_epochs != 200:
        budget.append(f"SASRec capped at {args.sasrec_epochs} epochs (default 200, early stopping)")
    if args.no_unconstrained:
        budget.append("no unconstrained decoding (invalid_rate_unconstrained not measured)")
    header = (f"Regenerated by `{args.command}` on {datetime.date.today().isoformat()}, "
              f"{platform.platform()} ({os.cpu_count()} CPUs); evaluation wall time {time.time() - t0:.0f} s. K = 20. Numbers are whatever they are; "
              "see each dataset's notes on cold-start items.\n")
    header += ("Every row: the full evaluation split unless said below, exclusion rule `interacted`, bootstrap 95% "
               "intervals, exact McNemar test of per-row FHR@20 against the best baseline.\n")
    if budget:
        header += "\nReduced: " + "; ".join(budget) + ".\n"
    text = header + "\n" + "\n".join(parts)
    if args.write:
        write_section(Path(args.write), text)
        print(f"wrote the quality section of {args.write}")
    else:
        print(text)


if __name__ == "__main__":
    main()
