"""The CoNRec reward as a plain verl ``compute_score`` function.

For an existing verl setup that keeps verl's ``naive`` reward manager::

    reward.custom_reward_function.path=pkg://conrec_verl.compute_score
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.codebook_path=<data_dir>/codebook.npz
    +reward.custom_reward_function.reward_kwargs.variant=collab      # optional, see RewardConfig

verl merges ``reward_kwargs`` into every call. The scoring is
:class:`conrec_verl.core.scoring.Scorer`, the same object the ``conrec`` reward manager uses; the
codebook is loaded once per process (cached by path, modification time and options).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping

from conrec_verl.core.scoring import RewardConfig, Scorer, ScoringConfigError
from conrec_verl.core.sid import Codebook

#: keys of ``reward_kwargs`` that locate the codebook rather than configure the reward
LOCATION_KEYS = ("codebook_path", "data_dir")
#: keyword arguments verl's naive manager may add to every call; not reward options
VERL_CALL_KWARGS = ("reward_router_address", "reward_model_tokenizer")

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


def get_scorer(options: Mapping[str, Any] | None, where: str = "reward_kwargs") -> Scorer:
    """The process-wide :class:`Scorer` for these options (codebook loaded once)."""
    options = dict(options or {})
    path = resolve_codebook_path(options, where)
    config = RewardConfig.from_mapping(options, ignore=LOCATION_KEYS)
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = None  # Codebook.load raises the clear error
    key = (path, mtime, config)
    scorer = _CACHE.get(key)
    if scorer is None:
        with _LOCK:
            scorer = _CACHE.get(key)
            if scorer is None:
                scorer = Scorer(Codebook.load(path), config)
                _CACHE[key] = scorer
    return scorer


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict:
    """verl's custom reward signature. Returns ``{"score": reward, <extra info>...}``; verl's naive
    manager logs every key. Never raises on ``solution_str``."""
    for name in VERL_CALL_KWARGS:
        kwargs.pop(name, None)
    try:
        fast_key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        scorer = _FAST.get(fast_key)
    except TypeError:  # unhashable option value: take the validated path
        fast_key, scorer = None, None
    if scorer is None:
        scorer = get_scorer(kwargs, where="reward.custom_reward_function.reward_kwargs")
        if fast_key is not None:
            _FAST[fast_key] = scorer
    result = scorer.score(solution_str, ground_truth)
    info = result.as_extra_info()
    return {"score": float(result.reward), "acc": info["exact_hit"], **info}
