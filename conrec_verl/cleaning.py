"""Cross-stage cleaning, the screening step: the model at the end of one GRPO stage answers the
rows the next stage may draw, and the rows it answers too close to the user's future likes are
flagged (:mod:`conrec_verl.core.cleaning` has the rule and the decision file).

    python -m conrec_verl.cleaning --model RUN/models/grpo_stage1 --data RUN/data \\
        --stage 2 --context 2 --out RUN/grpo_cleaning [--share 0.25 | --threshold 0.8] [--action augment]

The pipeline runs it between the stages when the profile sets ``grpo.cleaning.enabled: true``, and
passes the folder to the dataset adapter as ``data.conrec.row_weights``. Uses transformers and the
evaluation's constrained decoding; no verl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence


from conrec_verl.core.cleaning import CleaningError, CleaningRule, decision_path, write_decision
from conrec_verl.core.contract import REQUIRED_COLUMNS, missing_rl_columns, row_context
from conrec_verl.core.schedule import CONTEXTS, STAGE_ROWS, ScheduleError, rows_by_context


def read_rl_rows(path: str | os.PathLike) -> list[dict]:
    """The columns screening needs from an RL parquet (``docs/data-format.md``)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CleaningError(f"{path}: RL file not found")
    schema = pq.read_schema(path)
    missing = missing_rl_columns(schema.names)
    if missing:
        raise CleaningError(f"{path}: missing column(s) {missing} (see docs/data-format.md)")
    cols = [*REQUIRED_COLUMNS, "extra_info"]
    rows = pq.read_table(path, columns=[c for c in cols if c in schema.names]).to_pylist()
    for i, r in enumerate(rows):
        rm = r.get("reward_model")
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise CleaningError(f"{path}: column 'reward_model', row {i}: expected {{style, ground_truth}}")
    return rows


def screen_stage(model_dir: str | os.PathLike, data_dir: str | os.PathLike, stage_index: int, context: int,
                 out_dir: str | os.PathLike, rule: CleaningRule, rl_file: str | os.PathLike | None = None,
                 stage_rows: str = "assigned", max_prompt_tokens: int | None = None, batch_size: int = 16,
                 device: str = "auto", dtype: str = "auto", max_rows: int | None = None) -> dict:
    """Screen the rows stage ``stage_index`` (prompt ``context``) may draw with the model in
    ``model_dir`` and write ``out_dir/stage_<index>.json``; returns the decision."""
    from conrec_verl.constrained import constrained_beam_search
    from conrec_verl.core.prompts import budget_fits, render_history_prompt
    from conrec_verl.core.scoring import Scorer
    from conrec_verl.core.sid import Codebook
    from conrec_verl.core.sid_trie import SidTrie
    from conrec_verl.core.eval_data import load_sid_map
    from conrec_verl.evaluation.harness import load_model

    if context not in CONTEXTS:
        raise CleaningError(f"context must be one of {CONTEXTS}, got {context!r}")
    data_dir = Path(data_dir)
    rl_file = Path(rl_file) if rl_file else data_dir / "rl" / "train.parquet"
    codebook = Codebook.load(data_dir / "codebook.npz")
    _, sid_items = load_sid_map(data_dir / "sid_map.parquet", codebook)
    rows = read_rl_rows(rl_file)
    assigned = [row_context(r.get("extra_info")) for r in rows] if stage_rows == "assigned" else None
    try:
        pool = rows_by_context([len(r["hist_neg_recent"] or ()) for r in rows], [len(r["hist_neg"] or ()) for r in rows],
                               assigned, how=stage_rows, where=str(rl_file))[int(context)]
    except ScheduleError as exc:
        raise CleaningError(str(exc)) from None
    if max_rows is not None:
        pool = pool[: int(max_rows)]
    if not pool:
        raise CleaningError(f"{rl_file}: stage {stage_index} (context {context}) has no row to screen")
    t0 = time.time()
    model, tokenizer = load_model(model_dir, device, dtype)
    fits = budget_fits(tokenizer, max_prompt_tokens)
    prompts = [render_history_prompt(int(context), rows[i]["hist_neg_recent"] or [], rows[i]["hist_neg"] or [],
                                     rows[i]["hist_pos"] or [], fits=fits) for i in pool]
    trie = SidTrie(sid_items.keys())
    answers = constrained_beam_search(model, tokenizer, prompts, trie, k=rule.top_n, num_beams=max(2, rule.top_n),
                                      batch_size=batch_size, progress=True)
    scorer = Scorer(codebook)
    sim_fps, has_fps = [], []
    for i, ans in zip(pool, answers):
        targets = scorer.targets(rows[i]["reward_model"]["ground_truth"])
        has_fps.append(bool(targets.fps))
        sims = [scorer.score_codes(codes, targets).sim_fps for codes in ans.sids[: rule.top_n]]
        sim_fps.append(max(sims) if sims else 0.0)
    return write_decision(out_dir, stage_index, context, pool, sim_fps, has_fps, rule, model=str(model_dir),
                          rl_file=str(rl_file), stage_rows=stage_rows, max_prompt_tokens=max_prompt_tokens,
                          seconds=round(time.time() - t0, 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conrec_verl.cleaning", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="the previous stage's Hugging Face export")
    parser.add_argument("--data", required=True, help="the data_prep folder (codebook.npz, sid_map.parquet, rl/)")
    parser.add_argument("--rl-file", default=None, help="RL rows to screen (default: DATA/rl/train.parquet)")
    parser.add_argument("--stage", type=int, required=True, help="the stage index about to train (1-based)")
    parser.add_argument("--context", type=int, required=True, choices=CONTEXTS, help="that stage's prompt context")
    parser.add_argument("--out", required=True, help="the decisions folder (data.conrec.row_weights)")
    parser.add_argument("--stage-rows", default="assigned", choices=STAGE_ROWS, help="data.conrec.stage_rows")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="data.max_prompt_length of the run")
    parser.add_argument("--threshold", type=float, default=None, help="flag rows whose answer has cos >= this to a future like")
    parser.add_argument("--share", type=float, default=None, help="flag this share of rows closest to their future likes "
                        "(default 0.25 when --threshold is not given)")
    parser.add_argument("--action", default="augment", choices=("augment", "drop"))
    parser.add_argument("--repeat", type=int, default=2, help="draws of a flagged row with --action augment")
    parser.add_argument("--top-n", type=int, default=1, help="answers per row screened (the closest counts)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing decision for this stage")
    args = parser.parse_args(argv)
    from conrec_verl.core.contract import GroundTruthError
    from conrec_verl.core.sid import CodebookError
    from conrec_verl.core.eval_data import EvalInputError

    try:
        share = None if args.threshold is not None else (0.25 if args.share is None else args.share)
        rule = CleaningRule(threshold=args.threshold, share=share, action=args.action, repeat=args.repeat,
                            top_n=args.top_n)
        path = decision_path(args.out, args.stage)
        if path.exists() and not args.overwrite:
            raise CleaningError(f"{path} exists (a stage's decision never changes once it trained); pass --overwrite")
        d = screen_stage(args.model, args.data, args.stage, args.context, args.out, rule, rl_file=args.rl_file,
                         stage_rows=args.stage_rows, max_prompt_tokens=args.max_prompt_tokens,
                         batch_size=args.batch_size, device=args.device)
    except (CleaningError, GroundTruthError, EvalInputError, CodebookError, OSError) as exc:
        print(f"conrec-clean: error: {exc}", file=sys.stderr)
        return 2
    print(f"stage {d['stage']} (context {d['context']}): screened {d['screened']} rows, {d['rows_with_future_likes']} "
          f"with future likes, flagged {d['flagged']} ({rule.action}); mean cos to future likes "
          f"{d['sim_fps_mean'] if d['sim_fps_mean'] is None else round(d['sim_fps_mean'], 3)} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
