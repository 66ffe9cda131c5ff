"""The CoNRec reward as a plain verl ``compute_score`` function.

For an existing verl setup that keeps verl's ``naive`` reward manager::

    reward.custom_reward_function.path=pkg://conrec_verl.plugins.compute_score
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.codebook_path=<data_dir>/codebook.npz
    +reward.custom_reward_function.reward_kwargs.variant=collab      # optional, see RewardConfig

verl merges ``reward_kwargs`` into every call. Rows whose ``data_source`` is not one of
``reward_kwargs.data_sources`` (default ``["conrec"]``) go to verl's ``default_compute_score``, so
CoNRec data can be mixed with other tasks. The scoring is
:class:`conrec_verl.core.scoring.Scorer`, the same object the ``conrec`` reward manager uses; the
codebook is loaded once per process (cached by path, modification time and options).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping

from conrec_verl.core.reward import RewardConfig, ScoringConfigError
from conrec_verl.core.scoring import Scorer
from conrec_verl.core.sid import Codebook

#: keys of ``reward_kwargs`` that locate the codebook rather than configure the reward
LOCATION_KEYS = ("codebook_path", "data_dir", "item_map")
#: keyword arguments verl's naive manager may add to every call; not reward options
VERL_CALL_KWARGS = ("reward_router_address", "reward_model_tokenizer")
#: ``data_source`` values that get the CoNRec reward (``reward_kwargs.data_sources``); what
#: data_prep and the smoke data write. Rows of other sources are scored by verl's default scorer.
DEFAULT_DATA_SOURCES = ("conrec",)


def split_data_sources(options: Mapping[str, Any], where: str = "reward_kwargs") -> tuple[dict, tuple[str, ...]]:
    """``(reward options without data_sources, the data sources the CoNRec reward scores)``."""
    options = dict(options or {})
    sources = options.pop("data_sources", None)
    if sources is None:
        return options, DEFAULT_DATA_SOURCES
    if isinstance(sources, str):
        sources = [sources]
    try:
        sources = tuple(str(s) for s in sources)
    except TypeError:
        raise ScoringConfigError(f"{where}.data_sources must be a list of data_source names, got {sources!r}") from None
    if not sources:
        raise ScoringConfigError(f"{where}.data_sources is empty: no row would get the CoNRec reward")
    return options, sources

_CACHE: dict[tuple, Scorer] = {}
_FAST: dict[tuple, Scorer] = {}  # raw reward_kwargs -> scorer (skips validation on every call)
_LOCK = threading.Lock()


def resolve_codebook_path(options: Mapping[str, Any], where: str = "reward_kwargs") -> str:
    """``codebook_path``, or ``<data_dir>/codebook.npz``; a clear error when neither is set."""
    path = options.get("codebook_path")
    if not path and options.get("data_dir"):
        path = os.path.join(str(options["data_dir"]), "codebook.npz")
    if not path:
        raise ScoringConfigError(
            f"{where}.codebook_path is required (the codebook.npz of the data folder), "
            f"or {where}.data_dir (then <data_dir>/codebook.npz is used)"
        )
    return os.path.abspath(os.path.expanduser(str(path)))


def resolve_item_map(options: Mapping[str, Any], codebook_path: str, where: str = "reward_kwargs") -> str | None:
    """The ``sid_map.parquet`` whose items are the only SIDs that score (``item_map``): ``auto``
    (default) = the one beside the codebook when it exists; ``none`` = any in-range code tuple
    scores; or a path, which must exist."""
    value = options.get("item_map", "auto")
    value = "auto" if value is None else str(value)
    if value == "none":
        return None
    if value == "auto":
        path = os.path.join(os.path.dirname(codebook_path), "sid_map.parquet")
        return path if os.path.isfile(path) else None
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ScoringConfigError(f"{where}.item_map: {path} not found (a data folder's sid_map.parquet, 'auto' or 'none')")
    return path


def load_item_sids(path: str) -> frozenset:
    """Every item SID of a ``sid_map.parquet`` (column ``sid``), as code tuples."""
    import pyarrow.parquet as pq

    from conrec_verl.core.sid import parse_sid

    out = set()
    for row, text in enumerate(pq.read_table(path, columns=["sid"]).column("sid").to_pylist()):
        codes = parse_sid(text) if isinstance(text, str) else None
        if codes is None:
            raise ScoringConfigError(f"{path}: column 'sid', row {row}: {text!r} is not a SID string")
        out.add(codes)
    return frozenset(out)


def get_scorer(options: Mapping[str, Any] | None, where: str = "reward_kwargs") -> Scorer:
    """The process-wide :class:`Scorer` for these options (codebook and item map loaded once).

    Outputs are scored only when they are items of the build (``item_map``, default: the
    ``sid_map.parquet`` beside the codebook), because evaluation decodes only items."""
    options = dict(options or {})
    path = resolve_codebook_path(options, where)
    config = RewardConfig.from_mapping(options, ignore=LOCATION_KEYS)
    item_map = resolve_item_map(options, path, where)
    stamps = []
    for p in (path, item_map):
        try:
            stamps.append(os.stat(p).st_mtime_ns if p else None)
        except OSError:
            stamps.append(None)  # Codebook.load raises the clear error
    key = (path, item_map, tuple(stamps), config)
    scorer = _CACHE.get(key)
    if scorer is None:
        with _LOCK:
            scorer = _CACHE.get(key)
            if scorer is None:
                scorer = Scorer(Codebook.load(path), config, items=load_item_sids(item_map) if item_map else None)
                _CACHE[key] = scorer
    return scorer


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict:
    """verl's custom reward signature. Returns ``{"score": reward, <extra info>...}``; verl's naive
    manager logs every key. Never raises on ``solution_str``."""
    for name in VERL_CALL_KWARGS:
        kwargs.pop(name, None)
    sources = kwargs.get("data_sources")
    if data_source not in (DEFAULT_DATA_SOURCES if sources is None else
                           ([sources] if isinstance(sources, str) else sources)):
        # another task's row in mixed data: verl's own scorer for its data_source
        from verl.utils.reward_score import default_compute_score

        return default_compute_score(data_source, solution_str, ground_truth, extra_info)
    try:
        fast_key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        scorer = _FAST.get(fast_key)
    except TypeError:  # unhashable option value: take the validated path
        fast_key, scorer = None, None
    if scorer is None:
        where = "reward.custom_reward_function.reward_kwargs"
        scorer = get_scorer(split_data_sources(kwargs, where)[0], where=where)
        if fast_key is not None:
            _FAST[fast_key] = scorer
    result = scorer.score(solution_str, ground_truth)
    info = result.as_extra_info()
    return {"score": float(result.reward), "acc": info["exact_hit"], **info}
