"""Cross-stage data cleaning of progressive GRPO (pure; no verl, no torch).

The paper: "the previous stage's model screens the next stage's data; samples whose output is too
close to what the user will *like* are augmented" (threshold and method are a [gap]). Our reading,
configurable under ``grpo.cleaning`` of a pipeline profile:

1. Before stage ``k > 1`` trains, the model at the end of stage ``k - 1`` answers every row stage
   ``k`` may draw, asked in stage ``k``'s prompt context (constrained decoding, its top
   ``top_n`` items; :mod:`conrec_verl.cleaning`).
2. ``sim_fps`` of a row = the largest cosine between those answers and the row's future likes
   (FPS), through the codebook-reconstructed embeddings the reward uses
   (:class:`conrec_verl.core.scoring.Scorer`), so screening and reward measure "close" alike.
3. A row is *flagged* when ``sim_fps >= threshold`` or, with ``share``, when it is among the
   ``share`` of rows with the highest ``sim_fps`` (rows without future likes are never flagged).
4. ``action: augment`` (default) lets a flagged row enter stage ``k``'s draw ``repeat`` times,
   so the collaborative reward's positive penalty meets more of the cases where the model leans
   towards likes; ``action: drop`` removes flagged rows instead (the "cleaning" reading).

The decision for one stage is a JSON file (:func:`write_decision`); the dataset adapter turns it
into row weights of :class:`conrec_verl.core.schedule.CurriculumOrder` (``data.conrec.row_weights``
= the folder). A decision is written once, before its stage starts, and never changes after, so a
resumed run draws the same rows.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

ACTIONS = ("augment", "drop")
DEFAULT_SHARE = 0.25
DECISION_RE = re.compile(r"^stage_(\d+)\.json$")


class CleaningError(ValueError):
    """The cleaning config or a decision file is invalid (the message names the key or file)."""


@dataclass(frozen=True)
class CleaningRule:
    """Which screened rows are flagged and what happens to them (see module docstring)."""

    threshold: float | None = None
    share: float | None = None  # None and no threshold: DEFAULT_SHARE
    action: str = "augment"
    repeat: int = 2
    top_n: int = 1

    def __post_init__(self):
        if self.threshold is None and self.share is None:
            object.__setattr__(self, "share", DEFAULT_SHARE)
        if (self.threshold is None) == (self.share is None):
            raise CleaningError("cleaning: set exactly one of threshold (a cosine) and share (a fraction of rows), "
                                f"got threshold={self.threshold!r}, share={self.share!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold) and -1 <= self.threshold <= 1):
            raise CleaningError(f"cleaning.threshold must be a cosine in [-1, 1], got {self.threshold!r}")
        if self.share is not None and not (isinstance(self.share, (int, float)) and 0 < self.share <= 1):
            raise CleaningError(f"cleaning.share must be in (0, 1], got {self.share!r}")
        if self.action not in ACTIONS:
            raise CleaningError(f"cleaning.action must be one of {ACTIONS}, got {self.action!r}")
        if not isinstance(self.repeat, int) or isinstance(self.repeat, bool) or self.repeat < 2:
            raise CleaningError(f"cleaning.repeat must be an integer >= 2, got {self.repeat!r}")
        if not isinstance(self.top_n, int) or isinstance(self.top_n, bool) or self.top_n < 1:
            raise CleaningError(f"cleaning.top_n must be an integer >= 1, got {self.top_n!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "CleaningRule":
        options = dict(options or {})
        options.pop("enabled", None)
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise CleaningError(f"cleaning: unknown key(s) {unknown}; known: enabled, "
                                f"{', '.join(cls.__dataclass_fields__)}")
        if options.get("threshold") is not None:
            options["share"] = None  # a threshold, when set, replaces the share
        return cls(**options)

    def flag(self, sim_fps: Sequence[float], has_fps: Sequence[bool]) -> np.ndarray:
        """Boolean mask of the flagged rows."""
        sim = np.asarray(sim_fps, dtype=np.float64)
        ok = np.asarray(has_fps, dtype=bool)
        if sim.shape != ok.shape:
            raise CleaningError(f"{sim.size} similarities for {ok.size} rows")
        if self.threshold is not None:
            return ok & (sim >= self.threshold)
        n = int(math.floor(self.share * int(ok.sum())))
        flagged = np.zeros(sim.shape, dtype=bool)
        if n:
            candidates = np.flatnonzero(ok)
            # highest similarity first; ties broken by row order so the decision is reproducible
            order = candidates[np.lexsort((candidates, -sim[candidates]))]
            flagged[order[:n]] = True
        return flagged

    def weights(self, flagged: np.ndarray) -> np.ndarray:
        """Per-row draw count: 1, or ``repeat`` / 0 for flagged rows."""
        return np.where(np.asarray(flagged, dtype=bool), self.repeat if self.action == "augment" else 0, 1)


def decision_path(folder: str | os.PathLike, stage_index: int) -> Path:
    return Path(folder) / f"stage_{int(stage_index)}.json"


def write_decision(folder: str | os.PathLike, stage_index: int, context: int, rows: Sequence[int],
                   sim_fps: Sequence[float], has_fps: Sequence[bool], rule: CleaningRule,
                   **info: Any) -> dict:
    """Flag ``rows`` (dataset row indices) by their screened ``sim_fps`` and write the stage's
    decision atomically; returns it."""
    from conrec_verl.io_utils import atomic_write_text

    rows = [int(r) for r in rows]
    flagged = rule.flag(sim_fps, has_fps)
    weights = rule.weights(flagged)
    sim = np.asarray(sim_fps, dtype=np.float64)
    has = np.asarray(has_fps, dtype=bool)
    decision = {
        "stage": int(stage_index), "context": int(context), "rule": asdict(rule),
        "screened": len(rows), "rows_with_future_likes": int(has.sum()), "flagged": int(flagged.sum()),
        "sim_fps_mean": float(sim[has].mean()) if has.any() else None,
        "sim_fps_flagged_min": float(sim[flagged].min()) if flagged.any() else None,
        "weights": {str(r): int(w) for r, w in zip(rows, weights) if w != 1},
        "sim_fps_by_row": {str(r): round(float(x), 5) for r, x, h in zip(rows, sim, has) if h},
        **info,
    }
    atomic_write_text(decision_path(folder, stage_index), json.dumps(decision, indent=1))
    return decision


def load_row_weights(folder: str | os.PathLike | None) -> dict[int, dict[int, int]]:
    """``{stage index: {row: weight}}`` of every decision in ``folder`` (``{}`` for None or a
    folder that does not exist yet: stages without a decision draw unweighted)."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise CleaningError(f"data.conrec.row_weights={folder} is not a folder")
        return {}
    out: dict[int, dict[int, int]] = {}
    for path in sorted(folder.iterdir()):
        m = DECISION_RE.match(path.name)
        if not m:
            continue
        try:
            decision = json.loads(path.read_text())
            weights = {int(r): int(w) for r, w in decision["weights"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CleaningError(f"{path}: not a cleaning decision ({exc!r}); delete it to screen the stage again") \
                from None
        if int(decision.get("stage", -1)) != int(m.group(1)):
            raise CleaningError(f"{path}: its 'stage' is {decision.get('stage')!r}, its name says {m.group(1)}")
        out[int(m.group(1))] = weights
    return out
