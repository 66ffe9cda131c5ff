"""The predictions interchange format (JSONL), read and written by every evaluation tool.

One JSON object per line, one line per evaluation row::

    {"user_id": "42", "cutoff_day": 20220414, "sid_build": "<codebook fingerprint>",
     "predictions": ["<a_3><b_1><c_7>", ...],      # SID strings, best first (>= K of them)
     "scores": [-1.2, ...],                         # optional, one per prediction
     "candidate_scores": [0.1, ...]}                # optional, one per candidate of the row (CandAcc)

``sid_build`` must equal the data folder's (``manifest.json`` / ``codebook.npz`` fingerprint).
Entries that are not a SID of the build are kept as invalid (they count in ``invalid_rate`` and
use up a slot). The file must cover every row of the split exactly once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from conrec_verl.core.contract import json_object
from conrec_verl.core.metrics import metric_samples
from conrec_verl.core.sid import Codes, format_sid, parse_sid
from conrec_verl.core.eval_data import EvalData, EvalInputError
from conrec_verl.io_utils import atomic_write_text

FORMAT_HELP = __doc__.split("\n\n", 1)[1]


@dataclass
class PredictionSet:
    """Predictions aligned with ``EvalData.rows``: ``None`` marks an invalid entry."""

    name: str
    sids: list[list[Codes | None]]
    candidate_scores: list[list[float] | None]
    n_invalid_strings: int = 0


def read_prediction_lines(path: str | os.PathLike) -> list[dict]:
    """Parse and shape-check a predictions JSONL file (no data folder needed)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: predictions file not found")
    lines = []
    with path.open() as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            obj = json_object(line, where, EvalInputError)
            for key in ("user_id", "cutoff_day", "sid_build", "predictions"):
                if key not in obj:
                    raise EvalInputError(f"{where}: field {key!r} missing")
            if not isinstance(obj["predictions"], list) or not all(isinstance(p, str) for p in obj["predictions"]):
                raise EvalInputError(f"{where}: field 'predictions' must be a list of SID strings")
            try:
                obj["cutoff_day"] = int(obj["cutoff_day"])
            except (TypeError, ValueError) as exc:
                raise EvalInputError(f"{where}: field 'cutoff_day' = {obj['cutoff_day']!r} is not an integer") from exc
            obj["user_id"] = str(obj["user_id"])
            obj["_line"] = n
            lines.append(obj)
    if not lines:
        raise EvalInputError(f"{path}: no prediction lines")
    return lines


def read_predictions(path: str | os.PathLike, data: EvalData, k: int, name: str | None = None) -> PredictionSet:
    """Read a predictions file for ``data``'s split and check it fits (build, rows, K)."""
    path = Path(path)
    n_items = len(data.sid_items)
    if k > n_items:
        raise EvalInputError(f"K={k} is larger than the number of items with a SID ({n_items})")
    index = data.index()
    unscored = {r.key for r in data.all_rows} - set(index)  # rows of the split left out by max_rows
    sids: list[list[Codes | None] | None] = [None] * len(data.rows)
    cand: list[list[float] | None] = [None] * len(data.rows)
    n_invalid = 0
    for obj in read_prediction_lines(path):
        where = f"{path}: line {obj['_line']}"
        if obj["sid_build"] != data.sid_build:
            raise EvalInputError(f"{where}: field 'sid_build' = {obj['sid_build']!r}: these predictions are for another "
                                 f"SID build than {data.data_dir} ({data.sid_build!r})")
        key = (obj["user_id"], obj["cutoff_day"])
        if key in unscored:
            continue
        if key not in index:
            raise EvalInputError(f"{where}: user {key[0]} with cutoff {key[1]} is not a row of {data.split_path}")
        i = index[key]
        if sids[i] is not None:
            raise EvalInputError(f"{where}: user {key[0]} with cutoff {key[1]} appears twice")
        preds = obj["predictions"]
        if len(preds) < k:
            raise EvalInputError(f"{where}: field 'predictions' has {len(preds)} entries, fewer than K={k}")
        row: list[Codes | None] = []
        for p in preds:
            codes = parse_sid(p)
            if codes is None or codes not in data.sid_items:
                n_invalid += 1
                codes = None
            row.append(codes)
        sids[i] = row
        cs = obj.get("candidate_scores")
        if cs is not None:
            n_c = len(data.rows[i].target.candidates or [])
            if (not isinstance(cs, list) or len(cs) != n_c
                    or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in cs)):
                raise EvalInputError(f"{where}: field 'candidate_scores' needs {n_c} finite numbers (one per candidate)")
            cand[i] = [float(x) for x in cs]
    missing = [data.rows[i].key for i, s in enumerate(sids) if s is None]
    if missing:
        shown = ", ".join(f"user {u} cutoff {c}" for u, c in missing[:5])
        raise EvalInputError(f"{path}: {len(missing)} rows of {data.split_path} have no predictions "
                             f"(users missing from the file), e.g. {shown}")
    return PredictionSet(name or path.stem, sids, cand, n_invalid)  # type: ignore[arg-type]


def write_predictions(path: str | os.PathLike, data: EvalData, ranked: Sequence[Sequence[Codes | str | None]],
                      scores: Sequence[Sequence[float] | None] | None = None,
                      candidate_scores: Sequence[Sequence[float] | None] | None = None) -> Path:
    """Write one line per evaluation row (atomically)."""
    path = Path(path)
    if len(ranked) != len(data.rows):
        raise ValueError(f"{len(ranked)} prediction rows for {len(data.rows)} evaluation rows")
    lines = []
    for i, (row, preds) in enumerate(zip(data.rows, ranked)):
        obj = {"user_id": row.user_id, "cutoff_day": row.cutoff_day, "sid_build": data.sid_build,
               "predictions": [p if isinstance(p, str) else ("" if p is None else format_sid(p)) for p in preds]}
        if scores is not None and scores[i] is not None:
            obj["scores"] = [float(x) for x in scores[i]]
        if candidate_scores is not None and candidate_scores[i] is not None:
            obj["candidate_scores"] = [float(x) for x in candidate_scores[i]]
        lines.append(json.dumps(obj) + "\n")
    atomic_write_text(path, "".join(lines))
    return path


def predictions_file(folder: str | os.PathLike, name: str) -> Path:
    """Where conrec-eval keeps row ``name``'s predictions as scored: ``folder/<name as a file name>.jsonl``."""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "row"
    return Path(folder) / f"{slug}.jsonl"


def hit_samples(path: str | os.PathLike, data: EvalData, k: int, metric: str = "FHR") -> list[float]:
    """Per-row 1/0 outcomes of ``metric@k`` (``FHR``, ``HR``, ...) of a predictions file, scored as the
    harness scores them (:func:`conrec_verl.core.metrics.metric_samples`): two files of one split give
    lists over the same rows, ready for a paired test."""
    pset = read_predictions(path, data, k)
    samples, _, _ = metric_samples(pset.sids, data.targets, [k], pset.candidate_scores)
    key = f"{metric}@{k}"
    if key not in samples:
        raise EvalInputError(f"{path}: no per-row values of {key} (known: {', '.join(sorted(samples))})")
    return samples[key]
