"""Read and validate what the evaluation needs from a data folder (see ``docs/data-format.md``).

Every problem is raised as one :class:`EvalInputError` naming the file, the column and the row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from conrec_verl.core.contract import GroundTruthError, parse_ground_truth
from conrec_verl.core.metrics import EvalTarget
from conrec_verl.core.sid import Codebook, CodebookError, Codes, parse_sid
from conrec_verl.core.sid_trie import SidTrie


class EvalInputError(ValueError):
    """Bad evaluation input: the message names the file, column and row."""


#: What every predictor must leave out of a row's top K (the same rule for baselines, model rows
#: and predictions files): ``none``; ``dislikes`` = the row's past dislikes (``hist_neg``);
#: ``interacted`` = every item the user liked or disliked before the cutoff (``hist_neg`` and
#: ``hist_pos``). Neutral events (e.g. MovieLens rating 3) are dropped by data_prep, so they are
#: not in the rows and not excluded.
EXCLUSION_RULES = ("none", "dislikes", "interacted")
DEFAULT_EXCLUSION = "interacted"
#: how a model row finds its top K: the item-constrained beam search, or every item's exact
#: log-probability (``conrec_verl.evaluation.harness.model_predictions``)
DECODES = ("beam", "exact")


def check_exclusion(rule: str) -> str:
    if rule not in EXCLUSION_RULES:
        raise EvalInputError(f"exclusion rule must be one of {list(EXCLUSION_RULES)}, got {rule!r}")
    return rule


def _sid(value, where: str) -> Codes:
    codes = parse_sid(value) if isinstance(value, str) else None
    if codes is None:
        raise EvalInputError(f"{where}: {value!r} is not a SID string")
    return codes


def _sid_list(values, where: str) -> list[Codes]:
    if values is None:
        return []
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        raise EvalInputError(f"{where}: expected a list of SID strings, got {type(values).__name__}")
    return [_sid(v, f"{where}[{i}]") for i, v in enumerate(values)]


@dataclass
class EvalRow:
    user_id: str
    cutoff_day: int
    target: EvalTarget
    hist_neg: list[Codes]
    hist_neg_recent: list[Codes]
    hist_pos: list[Codes]
    future_pos: list[Codes]
    prompt: list[dict] | None

    @property
    def key(self) -> tuple[str, int]:
        return (self.user_id, self.cutoff_day)

    def excluded(self, rule: str) -> set[Codes]:
        """SIDs the row's top K must not contain under ``rule`` (:data:`EXCLUSION_RULES`)."""
        if rule == "none":
            return set()
        if rule == "dislikes":
            return set(self.hist_neg)
        if rule == "interacted":
            return set(self.hist_neg) | set(self.hist_pos)
        raise EvalInputError(f"exclusion rule must be one of {list(EXCLUSION_RULES)}, got {rule!r}")


@dataclass
class EvalData:
    """One data folder's evaluation split with its SID build."""

    data_dir: Path
    split_path: Path
    sid_build: str
    codebook: Codebook
    item_sids: dict[str, Codes]          # item_id -> SID (from sid_map.parquet)
    sid_items: dict[Codes, str]          # SID -> item_id
    rows: list[EvalRow]
    manifest: dict = field(default_factory=dict)
    #: every row of the split, also when ``rows`` is cut by ``max_rows``: what the baselines learn
    #: from must not depend on how many rows are scored
    all_rows: list[EvalRow] = field(default_factory=list)

    def __post_init__(self):
        if not self.all_rows:
            self.all_rows = list(self.rows)

    @property
    def reduced(self) -> bool:
        """Whether only part of the split is scored (a smoke run: no quality claims)."""
        return len(self.rows) < len(self.all_rows)

    @property
    def num_levels(self) -> int:
        return self.codebook.num_levels

    @property
    def catalogue(self) -> list[Codes]:
        """Every SID of the build, sorted (the item universe for baselines and the trie)."""
        return sorted(self.sid_items)

    def trie(self) -> SidTrie:
        return SidTrie(self.sid_items.keys(), self.num_levels)

    @property
    def targets(self) -> list[EvalTarget]:
        return [r.target for r in self.rows]

    def index(self) -> dict[tuple[str, int], int]:
        return {r.key: i for i, r in enumerate(self.rows)}


def _read_table(path: Path, columns: tuple[str, ...], missing: str):
    """A parquet table that must have ``columns``; one clear error naming the file otherwise."""
    if not path.is_file():
        raise EvalInputError(f"{path}: {missing}")
    table = pq.read_table(path)
    for col in columns:
        if col not in table.column_names:
            raise EvalInputError(f"{path}: column {col!r} missing (has {table.column_names})")
    return table


def load_sid_map(path: Path, codebook: Codebook) -> tuple[dict[str, Codes], dict[Codes, str]]:
    table = _read_table(path, ("item_id", "sid"), "file not found (every data folder needs a SID map)")
    item_sids: dict[str, Codes] = {}
    sid_items: dict[Codes, str] = {}
    for row, (item, sid) in enumerate(zip(table.column("item_id").to_pylist(), table.column("sid").to_pylist())):
        codes = _sid(sid, f"{path}: column 'sid', row {row}")
        if not codebook.is_valid(codes):
            raise EvalInputError(f"{path}: column 'sid', row {row}: {sid} is outside the codebook sizes {codebook.sizes}")
        if codes in sid_items and sid_items[codes] != str(item):
            raise EvalInputError(
                f"{path}: column 'sid', row {row}: SID {sid} is shared by items {sid_items[codes]!r} and {item!r}; "
                "exact-hit metrics need one item per SID (deduplicate the SID build)")
        item_sids[str(item)] = codes
        sid_items[codes] = str(item)
    return item_sids, sid_items


def _row(path: Path, i: int, raw: dict, sid_build: str) -> EvalRow:
    where = f"{path}: row {i}"
    extra = raw.get("extra_info") or {}
    if "user_id" not in extra or "cutoff_day" not in extra:
        raise EvalInputError(f"{where}: column 'extra_info' lacks user_id / cutoff_day")
    row_build = extra.get("sid_build")
    if row_build and row_build != sid_build:
        raise EvalInputError(f"{where}: column 'extra_info.sid_build' is {row_build!r}, the data folder's is {sid_build!r}")
    rm = raw.get("reward_model") or {}
    gt_text = rm.get("ground_truth")
    try:
        gt = parse_ground_truth(gt_text) if isinstance(gt_text, str) else None
    except GroundTruthError as exc:
        raise EvalInputError(f"{where}: column 'reward_model.ground_truth': {exc}") from exc
    if not isinstance(gt, dict) or "future_neg" not in gt:
        raise EvalInputError(f"{where}: column 'reward_model.ground_truth' must be a JSON object with 'future_neg'")
    col = f"{where}: column 'reward_model.ground_truth'"
    next_neg = gt.get("next_neg")
    target = EvalTarget(
        future_neg=_sid_list(gt.get("future_neg"), f"{col}.future_neg"),
        next_neg=_sid(next_neg, f"{col}.next_neg") if next_neg is not None else None,
        long_tail_items=_sid_list(gt.get("long_tail_items"), f"{col}.long_tail_items"),
        long_tail_user=bool(extra.get("long_tail_user", False)),
        n_future_neg_cold=int(gt.get("n_future_neg_cold") or 0),
    )
    # a row without a candidate task (e.g. its future dislikes are all cold): no / empty candidates
    if raw.get("candidates") is not None and len(raw["candidates"]) > 0:
        target.candidates = _sid_list(raw["candidates"], f"{where}: column 'candidates'")
        ct = raw.get("candidate_target")
        if ct is None or not 0 <= int(ct) < len(target.candidates):
            raise EvalInputError(f"{where}: column 'candidate_target' = {ct!r} is not a position in its "
                                 f"{len(target.candidates)} candidates")
        target.candidate_target = int(ct)
    return EvalRow(
        user_id=str(extra["user_id"]),
        cutoff_day=int(extra["cutoff_day"]),
        target=target,
        hist_neg=_sid_list(raw.get("hist_neg"), f"{where}: column 'hist_neg'"),
        hist_neg_recent=_sid_list(raw.get("hist_neg_recent"), f"{where}: column 'hist_neg_recent'"),
        hist_pos=_sid_list(raw.get("hist_pos"), f"{where}: column 'hist_pos'"),
        future_pos=_sid_list(gt.get("future_pos"), f"{col}.future_pos"),
        prompt=list(raw["prompt"]) if raw.get("prompt") is not None else None,
    )


def load_eval_data(data_dir: str | os.PathLike, split: str = "eval/test.parquet",
                   max_rows: int | None = None, unique_rows: bool = True) -> EvalData:
    """Load the evaluation split of a data folder and check it belongs to one SID build.

    ``unique_rows=False`` allows several rows of one (user, cutoff), as RL validation rows have
    (one per training fraction on a day); predictions files, keyed by (user, cutoff), then cannot
    be read against it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalInputError(f"{data_dir}: data folder not found")
    try:
        codebook = Codebook.load(data_dir / "codebook.npz")
    except CodebookError as exc:
        raise EvalInputError(str(exc)) from exc
    manifest_path = data_dir / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{manifest_path}: not JSON ({exc})") from exc
    sid_build = manifest.get("sid_build") or codebook.fingerprint
    if sid_build != codebook.fingerprint:
        raise EvalInputError(f"{manifest_path}: key 'sid_build' = {sid_build!r} but codebook.npz has fingerprint "
                             f"{codebook.fingerprint!r} (files from two SID builds)")
    item_sids, sid_items = load_sid_map(data_dir / "sid_map.parquet", codebook)
    split_path = data_dir / split
    table = _read_table(split_path, ("reward_model", "extra_info"), "evaluation split not found")
    if max_rows is not None and int(max_rows) < 1:
        raise EvalInputError(f"max_rows must be >= 1, got {max_rows}")
    raws = table.to_pylist()
    rows = [_row(split_path, i, raw, sid_build) for i, raw in enumerate(raws)]
    seen: dict[tuple[str, int], int] = {}
    for i, r in enumerate(rows):
        if r.key in seen and unique_rows:
            raise EvalInputError(f"{split_path}: row {i}: user {r.user_id} cutoff {r.cutoff_day} repeats row {seen[r.key]}")
        seen[r.key] = i
        for name, sids in (("future_neg", r.target.future_neg), ("candidates", r.target.candidates or [])):
            for s in sids:
                if s not in sid_items:
                    raise EvalInputError(f"{split_path}: row {i}: column {name!r}: SID {s} is not in sid_map.parquet")
    if not rows:
        raise EvalInputError(f"{split_path}: no evaluation rows")
    scored = rows[: int(max_rows)] if max_rows is not None else rows
    return EvalData(data_dir, split_path, sid_build, codebook, item_sids, sid_items, scored, manifest, all_rows=rows)
