"""Batch deployment negative filter: ``python -m conrec_verl.evaluation.filter_cli``.

Inputs
* ``--data``: the data folder (its ``codebook.npz``, ``sid_map.parquet`` and SID build);
* ``--predictions``: predicted negatives per user, in the predictions JSONL format (``user_id``,
  ``cutoff_day``, ``sid_build``, ``predictions``); for a user with several lines the latest
  ``cutoff_day`` is used; ``--top`` keeps the first N predictions of each line;
* ``--candidates``: a parquet (or csv) table with ``user_id`` and either ``item_id`` (mapped to its
  SID through ``sid_map.parquet``) or ``sid``; any other columns are carried through.

Output (``--out``, parquet or csv by extension, written atomically): the candidate table plus
``max_sim`` (highest cosine similarity to any of the user's predicted negatives; NaN when the
candidate has no SID or the user has no predictions) and ``removed`` (``max_sim >= threshold``).
Candidates without a SID and users without predictions are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from conrec_verl.core.neg_filter import NegativeFilter
from conrec_verl.core.sid import Codebook, CodebookError, parse_sid
from conrec_verl.core.eval_data import EvalInputError, load_sid_map
from conrec_verl.evaluation.predictions import read_prediction_lines
from conrec_verl.io_utils import atomic_path


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise EvalInputError(f"{path}: candidates file not found")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, dtype={"user_id": str, "item_id": str})
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise EvalInputError(f"{path}: cannot read the candidates table ({type(exc).__name__}: {exc}); "
                             "expected parquet, or csv by extension") from exc


OUT_SUFFIXES = (".parquet", ".csv")


def _write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


def filter_candidates(data_dir, predictions, candidates: pd.DataFrame, threshold: float,
                      top: int | None = None, candidates_name: str = "candidates") -> pd.DataFrame:
    """Library form of the CLI: returns ``candidates`` with ``max_sim`` and ``removed`` added."""
    data_dir = Path(data_dir)
    if not -1.0 <= float(threshold) <= 1.0:
        raise EvalInputError(f"threshold {threshold} is a cosine similarity and must be in [-1, 1]")
    try:
        book = Codebook.load(data_dir / "codebook.npz")
    except CodebookError as exc:
        raise EvalInputError(str(exc)) from exc
    item_sids, sid_items = load_sid_map(data_dir / "sid_map.parquet", book)
    latest: dict[str, tuple[int, list]] = {}
    for obj in read_prediction_lines(predictions):
        if obj["sid_build"] != book.fingerprint:
            raise EvalInputError(f"{predictions}: line {obj['_line']}: field 'sid_build' = {obj['sid_build']!r}: "
                                 f"predictions for another SID build than {data_dir} ({book.fingerprint!r})")
        codes = [parse_sid(p) for p in obj["predictions"][:top]]
        codes = [c for c in codes if c is not None and c in sid_items]
        if obj["user_id"] not in latest or obj["cutoff_day"] > latest[obj["user_id"]][0]:
            latest[obj["user_id"]] = (obj["cutoff_day"], codes)
    if "user_id" not in candidates.columns:
        raise EvalInputError(f"{candidates_name}: column 'user_id' missing (has {list(candidates.columns)})")
    L = book.num_levels
    cand_codes = np.full((len(candidates), L), -1, dtype=np.int64)
    if "sid" in candidates.columns:
        for row, s in enumerate(candidates["sid"].tolist()):
            c = parse_sid(s) if isinstance(s, str) else None
            if c is None or not book.is_valid(c):
                raise EvalInputError(f"{candidates_name}: column 'sid', row {row}: {s!r} is not a SID of this build")
            cand_codes[row] = c
    elif "item_id" in candidates.columns:
        for row, item in enumerate(candidates["item_id"].astype(str).tolist()):
            c = item_sids.get(item)
            if c is not None:
                cand_codes[row] = c
    else:
        raise EvalInputError(f"{candidates_name}: needs a column 'item_id' or 'sid' (has {list(candidates.columns)})")
    users = candidates["user_id"].astype(str).to_numpy()
    order = np.argsort(users, kind="stable")
    uniq, starts = np.unique(users[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    preds, cands, positions = [], [], []
    for u, lo, hi in zip(uniq, starts, bounds):
        idx = order[lo:hi]
        idx = idx[cand_codes[idx, 0] >= 0]  # candidates without a SID are kept
        p = latest.get(u, (0, []))[1]
        if not len(idx) or not p:
            continue
        preds.append(np.array(p, dtype=np.int64))
        cands.append(cand_codes[idx])
        positions.append(idx)
    max_sim = np.full(len(candidates), np.nan, dtype=np.float64)
    filt = NegativeFilter(book, threshold)
    for idx, sims in zip(positions, filt.max_similarity_batch(preds, cands)):
        max_sim[idx] = sims
    out = candidates.copy()
    out["max_sim"] = max_sim
    out["removed"] = np.nan_to_num(max_sim, nan=-np.inf) >= threshold
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conrec-filter", description=__doc__.split("\n\n", 1)[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--candidates", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.9, help="cosine threshold (default: %(default)s)")
    p.add_argument("--top", type=int, default=None, help="use the first N predictions per user (default: all)")
    args = p.parse_args(argv)
    try:
        if not -1.0 <= args.threshold <= 1.0:
            raise EvalInputError(f"--threshold {args.threshold} is a cosine similarity and must be in [-1, 1]")
        if args.top is not None and args.top < 1:
            raise EvalInputError(f"--top must be >= 1 (the first N predictions per user), got {args.top}")
        if Path(args.out).suffix not in OUT_SUFFIXES:
            raise EvalInputError(f"--out {args.out}: the table is written as parquet or csv by extension; "
                                 f"name it *.parquet or *.csv")
        cand_path = Path(args.candidates)
        df = filter_candidates(args.data, args.predictions, _read_table(cand_path), args.threshold, args.top,
                               str(cand_path))
        _write_table(df, Path(args.out))
    except ValueError as exc:
        from conrec_verl.evaluation.cli import user_errors

        if not isinstance(exc, user_errors()):
            raise
        print(f"conrec-filter: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --out: one line, not a traceback
        print(f"conrec-filter: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{int(df['removed'].sum())} of {len(df)} candidates removed -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
