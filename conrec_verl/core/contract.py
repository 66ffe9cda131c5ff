"""The data contract of a data folder's RL and evaluation rows (``docs/data-format.md``), in one
place: the row layout and its parquet schemas, and the ground truth with its one parser and one
writer. data_prep writes rows with :func:`rl_record` and :meth:`GroundTruth.to_json`; the SID
dataset, the reward, the evaluation and the cleaning screen read them with :func:`parse_ground_truth`
/ :meth:`GroundTruth.parse` and :func:`missing_rl_columns`. The smoke data and the test fixtures use the
same writer, so a change of the contract is one change here.

Vocabulary: a row's ``context`` is what its prompt shows (1 = last-days dislikes, 2 = all dislikes,
3 = dislikes and likes); a ``stage`` is a position in the progressive-GRPO schedule
(``conrec_verl.core.schedule``), which trains one context.

No verl import (a pure core module); pyarrow only for the schemas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa

#: ``data_source`` of CoNRec rows (the reward manager scores only these by default)
DATA_SOURCE = "conrec"
ABILITY = "negative_recommendation"
#: the raw histories the SID dataset re-renders a prompt from, oldest first
HISTORY_COLUMNS = ("hist_neg_recent", "hist_neg", "hist_pos")
#: columns every RL row needs besides verl's own
REQUIRED_COLUMNS = HISTORY_COLUMNS + ("reward_model",)
#: ground-truth keys that hold lists of SID strings
GROUND_TRUTH_LIST_KEYS = ("future_neg", "swing", "future_pos", "long_tail_items")

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
STR_LIST = pa.list_(pa.string())
RL_EXTRA = pa.struct([("split", pa.string()), ("index", pa.int64()), ("user_id", pa.string()),
                      ("cutoff_day", pa.int64()), ("context", pa.int64()), ("long_tail_user", pa.bool_()),
                      ("sid_build", pa.string()), ("window_days", pa.int64()), ("n_hist_neg", pa.int64())])
RL_SCHEMA = pa.schema([("data_source", pa.string()), ("prompt", MESSAGES), ("ability", pa.string()),
                       ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
                       ("extra_info", RL_EXTRA), ("hist_neg_recent", STR_LIST), ("hist_neg", STR_LIST),
                       ("hist_pos", STR_LIST)])
#: evaluation rows: RL rows plus the candidate task (``candidates=[]``, ``candidate_target=-1`` when none)
EVAL_SCHEMA = RL_SCHEMA.append(pa.field("candidates", STR_LIST)).append(pa.field("candidate_target", pa.int64()))


class GroundTruthError(ValueError):
    """A ``reward_model.ground_truth`` value cannot be read."""


def parse_ground_truth(ground_truth: str | bytes | Mapping[str, Any]) -> dict:
    """The ground-truth JSON object of a row as a dict (the one JSON parser of the contract);
    an already-parsed mapping is accepted as is. Anything else is a :class:`GroundTruthError`."""
    if isinstance(ground_truth, Mapping):
        return dict(ground_truth)
    if isinstance(ground_truth, (bytes, bytearray)):
        ground_truth = ground_truth.decode("utf-8", errors="replace")
    if not isinstance(ground_truth, str):
        raise GroundTruthError(f"ground_truth must be a JSON string or a dict, got {type(ground_truth).__name__}")
    return json_object(ground_truth, f"ground_truth {ground_truth[:120]!r}", GroundTruthError)


def json_object(text: str, where: str, error: type[Exception] = ValueError) -> dict:
    """``text`` parsed as one JSON object; anything else is one ``error`` that starts with ``where``
    (the ground truth of a row, a line of a predictions file)."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise error(f"{where}: must be a JSON object, got {type(parsed).__name__}")
    return parsed


def ground_truth_sids(gt: Mapping[str, Any], key: str) -> list[str]:
    """The SID strings under ``key`` of a parsed ground truth (a bare string counts as one; entries
    that are not strings are left out -- the readers that validate report them)."""
    value = gt.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [v for v in value if isinstance(v, str)]
    except TypeError:
        return []


@dataclass(frozen=True)
class GroundTruth:
    """A row's multi-day ground truth (``docs/data-format.md``). GTS = ``future_neg ∪ swing``,
    FPS = ``future_pos``. Field order is the JSON key order data_prep writes."""

    future_neg: tuple[str, ...] = ()
    swing: tuple[str, ...] = ()
    future_pos: tuple[str, ...] = ()
    next_neg: str | None = None
    long_tail_items: tuple[str, ...] = ()
    n_future_neg_cold: int = 0
    n_future_neg: int | None = None
    sid_build: str | None = None

    def to_json(self) -> str:
        """The ``reward_model.ground_truth`` string (the one writer of the contract)."""
        out: dict[str, Any] = {"future_neg": list(self.future_neg), "swing": list(self.swing),
                               "future_pos": list(self.future_pos), "next_neg": self.next_neg,
                               "long_tail_items": list(self.long_tail_items),
                               "n_future_neg_cold": int(self.n_future_neg_cold)}
        if self.n_future_neg is not None:
            out["n_future_neg"] = int(self.n_future_neg)
        if self.sid_build is not None:
            out["sid_build"] = self.sid_build
        return json.dumps(out)

    @classmethod
    def parse(cls, ground_truth: str | bytes | Mapping[str, Any]) -> "GroundTruth":
        """Read a ground truth; a list key holding something other than SID strings, or a count
        that is not an integer, is a :class:`GroundTruthError` naming the key."""
        gt = parse_ground_truth(ground_truth)
        lists = {}
        for key in GROUND_TRUTH_LIST_KEYS:
            value = gt.get(key)
            if value is None:
                value = []
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise GroundTruthError(f"ground_truth.{key} must be a list of SID strings, got {value!r:.120}")
            lists[key] = tuple(value)
        next_neg = gt.get("next_neg")
        if next_neg is not None and not isinstance(next_neg, str):
            raise GroundTruthError(f"ground_truth.next_neg must be a SID string or null, got {next_neg!r:.120}")
        counts = {}
        for key, default in (("n_future_neg_cold", 0), ("n_future_neg", None)):
            value = gt.get(key, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise GroundTruthError(f"ground_truth.{key} must be an integer, got {value!r:.120}")
            counts[key] = value if value is not None else default
        build = gt.get("sid_build")
        return cls(next_neg=next_neg, sid_build=str(build) if build is not None else None, **lists, **counts)


def rl_record(*, prompt_text: str, ground_truth: GroundTruth, extra_info: Mapping[str, Any],
              hist_neg_recent: Sequence[str], hist_neg: Sequence[str], hist_pos: Sequence[str],
              data_source: str = DATA_SOURCE) -> dict:
    """One RL row (the ``RL_SCHEMA`` layout; evaluation rows add ``candidates`` and
    ``candidate_target``): verl's ``data_source``/``prompt``/``ability``/``reward_model``/``extra_info``
    plus the raw histories."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt_text}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth.to_json()},
        "extra_info": dict(extra_info),
        "hist_neg_recent": list(hist_neg_recent),
        "hist_neg": list(hist_neg),
        "hist_pos": list(hist_pos),
    }


def row_context(extra_info: Mapping[str, Any] | None) -> Any:
    """The prompt context a row carries (``extra_info.context``: the one data_prep assigned to a
    training row, the one the dataset rendered an item with). Folders written before the field was
    named ``context`` call it ``stage``; both are read."""
    extra = extra_info or {}
    value = extra.get("context")
    return extra.get("stage") if value is None else value


def renamed_option(options: Mapping[str, Any], new: str, old: str, default: Any = None, where: str = "") -> Any:
    """``options[new]``, or the value under its old name ``old`` (a key renamed to this vocabulary).
    The old name wins over a new key left unset or at its ``default``; both set to different values
    is a :class:`ValueError` naming both (``where`` prefixes the names, e.g. ``"rl."``)."""
    new_value, old_value = options.get(new), options.get(old)
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None and new_value != old_value and new_value != default:
        raise ValueError(f"{where}{new}={new_value!r} and its old name {where}{old}={old_value!r} disagree; "
                         f"set only {where}{new}")
    return old_value


def missing_rl_columns(names: Sequence[str]) -> list[str]:
    """The columns of :data:`REQUIRED_COLUMNS` a table with columns ``names`` lacks."""
    return [c for c in REQUIRED_COLUMNS if c not in names]
