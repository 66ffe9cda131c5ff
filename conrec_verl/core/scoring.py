"""Pure reward scoring for CoNRec (no verl import).

Shared by the ``conrec`` reward manager, the plain ``compute_score`` function and the evaluation
metrics, so training reward and evaluation cannot drift.

Which SID in a model output counts
----------------------------------
The output is scanned with :func:`conrec_verl.core.sid.scan_sid_spans`. In the default parse mode
``"first"`` the *first complete* SID (exactly ``codebook.num_levels`` consecutive level tokens)
whose codes are inside the codebook counts; surrounding text, whitespace between tokens, partial
SIDs and any later SIDs are ignored. In parse mode ``"strict"`` the whole output (stripped) must be
exactly one SID. Tokens must be canonical (``<b_7>``, not ``<b_07>``). Anything else -- no
complete SID, codes out of range, non-string input -- is *invalid* and gets the format penalty.
:meth:`Scorer.parse_sid_tokens` applies the same rule to an output read as SID tokens (the reward
manager's token form, :class:`conrec_verl.core.sid.SidTokenMap`).

Positive target set (``RewardConfig.targets``)
----------------------------------------------
``gts`` (default) scores against GTS = ``future_neg ∪ swing``, the paper's future-negative
reward. ``next_neg`` scores against the single next dislike only (the ground truth's
``next_neg``; an empty set when it is null): the classic next-item reward the paper starts from
before adding future negatives (Table 2, "+ progressive GRPO" row). FPS is ``future_pos`` either way.

The reward itself -- its options (:class:`RewardConfig`) and the variant registry -- is
:mod:`conrec_verl.core.reward`; SID prefix relations are in :mod:`conrec_verl.core.sid`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from conrec_verl.core.contract import GroundTruthError, ground_truth_sids, parse_ground_truth
from conrec_verl.core.reward import RewardConfig
from conrec_verl.core.sid import (Codebook, Codes, best_prefix_depth, canonical_sid_re, format_sid, parse_sid,
                                  scan_sid_spans, sid_runs)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """GTS / FPS of one row, as codes and unit-normalised reconstructed embeddings."""

    gts: tuple[Codes, ...]
    fps: tuple[Codes, ...]
    gts_unit: np.ndarray  # (len(gts), dim)
    fps_unit: np.ndarray  # (len(fps), dim)
    n_invalid: int = 0  # SID strings in the ground truth that did not parse / fit the codebook
    #: ``[gts_unit; fps_unit]`` stacked, so one product gives both similarity sets
    stacked: np.ndarray | None = None
    #: ``prefixes[d-1]`` = the set of every GTS item's first ``d`` codes (prefix depth by lookup)
    prefixes: tuple[frozenset, ...] = ()
    #: the row's future dislikes (``future_neg``; ``next_neg`` under ``targets=next_neg``): the items
    #: FHR@K counts, without GTS's Swing neighbours (``RewardConfig.hit_bonus``)
    hits: frozenset = frozenset()

    def best_prefix_depth(self, codes: Codes) -> int:
        for depth in range(len(self.prefixes), 0, -1):
            if codes[:depth] in self.prefixes[depth - 1]:
                return depth
        return 0


def _canonical(text: str, codes: Codes) -> bool:
    """Whether ``text`` spells ``codes`` with the tokens a model can emit (no ``<b_007>``)."""
    return "".join(text.split()) == format_sid(codes)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


# ---------------------------------------------------------------------------------------------
# result + scorer
# ---------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """One scored response; ``as_extra_info`` is what verl logs per sample."""

    reward: float
    valid: bool
    sid: str = ""
    exact_hit: bool = False
    prefix_depth: int = 0
    sim_gts: float = 0.0
    sim_fps: float = 0.0
    extra: dict = field(default_factory=dict)

    #: the output spelled an in-range SID that is no item of the build (scored as invalid when
    #: the scorer knows the items)
    non_item: bool = False
    #: the output is one of the row's future dislikes (what FHR@K counts; ``exact_hit`` also counts
    #: GTS's Swing neighbours)
    future_neg_hit: bool = False

    def as_extra_info(self) -> dict:
        """Flat scalars only (verl stacks them into numpy arrays): invalid rows report 0 similarities."""
        return {
            "valid_sid": float(self.valid),
            "non_item_sid": float(self.non_item),
            "exact_hit": float(self.exact_hit),
            "future_neg_hit": float(self.future_neg_hit),
            "prefix_depth": float(self.prefix_depth),
            "sim_gts": float(self.sim_gts),
            "sim_fps": float(self.sim_fps),
        }


class Scorer:
    """Scores model outputs against a row's ground truth with one codebook.

    Thread-safe for reading; caches parsed ground truths and SID embeddings (LRU), because the
    ``n`` rollouts of one prompt share the same ground truth string.
    """

    def __init__(self, codebook: Codebook, config: RewardConfig | None = None, cache_size: int = 4096,
                 items: "frozenset[Codes] | set[Codes] | None" = None):
        """``items``: the SIDs of the build's items (``sid_map.parquet``). When given, an output that
        spells an in-range SID which is no item gets the format penalty, as evaluation can never
        produce it; ``None`` scores any in-range code tuple (the codebook alone)."""
        self.items = frozenset(tuple(int(c) for c in s) for s in items) if items is not None else None
        self.codebook = codebook
        self.config = config or RewardConfig()
        self.num_levels = codebook.num_levels
        self._sizes = codebook.sizes
        self._penalty = self.config.effective_format_penalty()
        # the per-depth weights a variant may use (the configured ones are checked for ``hierarchical``)
        self._hier = (
            self.config.effective_hier_weights(self.num_levels) if self.config.variant == "hierarchical"
            else RewardConfig().effective_hier_weights(self.num_levels)
        )
        self._variant = self.config.variant_fn()
        self._cache_size = int(cache_size)
        #: ground truths without a usable target scored under ``empty_targets: zero``
        self.n_empty_targets = 0
        self._gt_cache: OrderedDict = OrderedDict()
        self._emb_cache: OrderedDict = OrderedDict()
        # fast path for canonical SID text (the usual model output and every data-file SID)
        self._exact_re = canonical_sid_re(self.num_levels)
        self._valid = codebook.is_valid

    # -- parsing --------------------------------------------------------------------------------
    def parse_output(self, text: Any) -> Codes | None:
        """The SID that counts in ``text`` (see module docstring), or ``None``. Never raises."""
        try:
            if not isinstance(text, str):
                return None
            m = self._exact_re.fullmatch(text)
            if m is not None:
                codes = tuple(int(g) for g in m.groups())
                return codes if self._valid(codes) else None
            if self.config.parse_mode == "strict":
                codes = parse_sid(text.strip())
                ok = codes is not None and self._valid(codes) and _canonical(text, codes)
                return codes if ok else None
            for span in scan_sid_spans(text):
                if (len(span.codes) == self.num_levels and self._valid(span.codes)
                        and _canonical(text[span.start:span.end], span.codes)):
                    return span.codes
            return None
        except Exception:  # noqa: BLE001 - the reward must never raise on model text
            return None

    def parse_sid_tokens(self, tokens: Sequence[tuple[int, int]]) -> Codes | None:
        """:meth:`parse_output` for an output read as SID tokens (``SidTokenMap.sid_tokens``): the same
        SID as parsing its decoded text."""
        if self.config.parse_mode == "strict":
            codes = tuple(code for _, code in tokens)
            ok = [level for level, _ in tokens] == list(range(self.num_levels)) and self._valid(codes)
            return codes if ok else None
        for codes in sid_runs(tokens):
            if len(codes) == self.num_levels and self._valid(codes):
                return codes
        return None

    # -- embeddings -----------------------------------------------------------------------------
    def unit_embedding(self, codes: Codes) -> np.ndarray:
        """Unit-normalised reconstructed embedding of valid ``codes`` (zero vector if the sum is 0)."""
        cached = self._emb_cache.get(codes)
        if cached is not None:
            return cached
        unit = self.codebook.unit_embed(codes)
        self._remember(self._emb_cache, codes, unit)
        return unit

    def _remember(self, cache: OrderedDict, key, value) -> None:
        cache[key] = value
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def targets(self, ground_truth: str | Mapping[str, Any]) -> Targets:
        """GTS = future_neg ∪ swing (or just next_neg with ``targets="next_neg"``), FPS = future_pos,
        parsed and embedded (cached per JSON string)."""
        key = ground_truth if isinstance(ground_truth, str) else None
        if key is not None:
            cached = self._gt_cache.get(key)
            if cached is not None:
                return cached
        gt = parse_ground_truth(ground_truth)
        build = gt.get("sid_build")
        if self.config.check_sid_build and build and build != self.codebook.fingerprint:
            raise GroundTruthError(
                f"ground truth was built with SID build {build!r} but the codebook has fingerprint "
                f"{self.codebook.fingerprint!r}: use the codebook.npz of the same data folder "
                "(or set check_sid_build: false)"
            )
        n_invalid = 0

        fullmatch = self._exact_re.fullmatch
        valid = self._valid

        def codes_of(names: Sequence[str]) -> tuple[Codes, ...]:
            nonlocal n_invalid
            out: dict[Codes, None] = {}  # ordered set
            for name in names:
                for s in ground_truth_sids(gt, name):
                    m = fullmatch(s)
                    if m is not None:
                        codes = tuple(map(int, m.groups()))
                    else:
                        codes = parse_sid(s)
                    if codes is None or not valid(codes):
                        n_invalid += 1
                        continue
                    out[codes] = None
            return tuple(out)

        keys = ("next_neg",) if self.config.targets == "next_neg" else ("future_neg", "swing")
        gts = codes_of(keys)
        fps = codes_of(("future_pos",))
        counted = n_invalid
        hits = frozenset(gts if self.config.targets == "next_neg" else codes_of(("future_neg",)))
        n_invalid = counted  # future_neg's bad strings are already counted in gts
        if not gts:
            if self.config.empty_targets == "error":
                raise GroundTruthError(
                    f"ground truth has no usable target SID under {'/'.join(keys)} ({n_invalid} unusable SID "
                    f"string(s)): every output would score alike; got {str(ground_truth)[:120]!r} (reward option "
                    "empty_targets: zero scores such rows with similarity 0 instead)")
            self.n_empty_targets += 1
            if self.n_empty_targets == 1:
                logger.warning("conrec reward: a ground truth with no usable target SID under %s scores with "
                               "similarity 0 (empty_targets: zero); further ones are only counted", "/".join(keys))
        dim = self.codebook.dim

        def unit(codes: tuple[Codes, ...]) -> np.ndarray:
            if not codes:
                return np.zeros((0, dim), dtype=np.float32)
            return _unit_rows(self.codebook.embed_many(np.asarray(codes, dtype=np.int64)))

        gts_unit, fps_unit = unit(gts), unit(fps)
        prefixes = tuple(frozenset(c[:d] for c in gts) for d in range(1, self.num_levels + 1))
        targets = Targets(gts, fps, gts_unit, fps_unit, n_invalid,
                          stacked=np.ascontiguousarray(np.vstack([gts_unit, fps_unit])), prefixes=prefixes,
                          hits=hits)
        if key is not None:
            self._remember(self._gt_cache, key, targets)
        return targets

    # -- scoring --------------------------------------------------------------------------------
    def score_codes(self, codes: Codes | None, targets: Targets) -> ScoreResult:
        if codes is None:
            return ScoreResult(reward=self._penalty, valid=False)
        u = self.unit_embedding(codes)
        n_g, n_f = len(targets.gts), len(targets.fps)
        if n_g or n_f:
            sims = (targets.stacked @ u).tolist() if targets.stacked is not None else \
                (targets.gts_unit @ u).tolist() + (targets.fps_unit @ u).tolist()
            s_g = max(sims[:n_g]) if n_g else 0.0
            s_f = max(sims[n_g:]) if n_f else 0.0
        else:
            s_g = s_f = 0.0
        depth = targets.best_prefix_depth(codes) if targets.prefixes else best_prefix_depth(codes, targets.gts)
        hit = depth == self.num_levels
        neg_hit = hit and codes in targets.hits
        reward = self._reward(s_g, s_f, depth)
        if neg_hit:
            reward += self.config.hit_bonus
        return ScoreResult(
            reward=reward, valid=True, sid=format_sid(codes), exact_hit=hit, prefix_depth=depth,
            sim_gts=s_g, sim_fps=s_f, future_neg_hit=neg_hit,
        )

    def _reward(self, s_g: float, s_f: float, depth: int) -> float:
        return self._variant(s_g, s_f, depth, self.config, self._hier)

    def score(self, text: Any, ground_truth: str | Mapping[str, Any]) -> ScoreResult:
        """Score one output. Never raises on ``text``; raises :class:`GroundTruthError` on a bad
        ground truth (that is a data bug, not a model output)."""
        return self.score_parsed(self.parse_output(text), ground_truth)

    def score_parsed(self, codes: Codes | None, ground_truth: str | Mapping[str, Any]) -> ScoreResult:
        """Score the SID an output spelled (``None``: none that counts), from :meth:`parse_output` or
        :meth:`parse_sid_tokens`; a SID that is no item of the build gets the format penalty."""
        targets = self.targets(ground_truth)
        if codes is not None and self.items is not None and codes not in self.items:
            return ScoreResult(reward=self._penalty, valid=False, non_item=True)
        return self.score_codes(codes, targets)

    def score_many(self, texts: Sequence[Any], ground_truths: Sequence[str | Mapping[str, Any]]) -> list[ScoreResult]:
        if len(texts) != len(ground_truths):
            raise ValueError(f"{len(texts)} texts but {len(ground_truths)} ground truths")
        return [self.score(t, g) for t, g in zip(texts, ground_truths)]
