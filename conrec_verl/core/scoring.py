"""Pure reward scoring for CoNRec (no verl import).

Shared by the ``conrec`` reward manager, the plain ``compute_score`` function and the evaluation
metrics, so training reward and evaluation cannot drift.
"""

from __future__ import annotations

from typing import Sequence

from conrec_verl.core.sid import Codes


def prefix_depth(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading levels two SIDs share (0 .. num_levels)."""
    depth = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        depth += 1
    return depth


def best_prefix_depth(pred: Codes, targets: Sequence[Codes]) -> int:
    """The deepest shared prefix between ``pred`` and any target (0 when ``targets`` is empty)."""
    return max((prefix_depth(pred, t) for t in targets), default=0)


def exact_hit(pred: Codes, targets: Sequence[Codes]) -> bool:
    """Whether ``pred`` is exactly one of ``targets``."""
    pred = tuple(int(c) for c in pred)
    return any(pred == tuple(int(c) for c in t) for t in targets)
