"""Pure reward scoring for CoNRec (no verl import).

Shared by the ``conrec`` reward manager, the plain ``compute_score`` function and the evaluation
metrics, so training reward and evaluation cannot drift.

Which SID in a model output counts
----------------------------------
The output is scanned with :func:`conrec_verl.core.sid.scan_sid_spans`. In the default parse mode
``"first"`` the *first complete* SID (exactly ``codebook.num_levels`` consecutive level tokens)
whose codes are inside the codebook counts; surrounding text, whitespace between tokens, partial
SIDs and any later SIDs are ignored. In parse mode ``"strict"`` the whole output (stripped) must be
exactly one SID. Tokens must be canonical (``<b_7>``, not ``<b_07>``). Anything else -- no complete SID, codes out of range, non-string input -- is
*invalid* and gets the format penalty.

Reward variants (``RewardConfig.variant``)
------------------------------------------
Each variant is one function registered with :func:`register_reward_variant` (its docstring is its
formula, its ``lower_bound`` sets the default format penalty), as verl registers advantage
estimators; :data:`REWARD_VARIANTS` is the registry. The built-in ones, with
``s_g = max cos(out, GTS)`` and ``s_f = max cos(out, FPS)`` over codebook-reconstructed
embeddings (an empty set contributes 0) and ``t = sim_threshold``:

============== ==================================================  ==============
variant         reward                                              paper
============== ==================================================  ==============
collab          ``s_g - gamma * s_f``   (default, the final choice)  (c)
neg_only        ``s_g``                                              (a)
neg_truncated   ``s_g if s_g >= t else 0``                           (b)
double_truncated ``[s_g]_t - gamma * [s_f]_t``, ``[x]_t = x if x >= t else 0``  (d)
hierarchical    ``hier_weights[d-1]`` for the deepest prefix ``d`` shared with a GTS item,
                0 if none (default weights 0.01 / 0.1 / 1 for 3 levels)  (e)
============== ==================================================  ==============

Positive target set (``RewardConfig.targets``)
----------------------------------------------
``gts`` (default) scores against GTS = ``future_neg ∪ swing``, the paper's future-negative
reward. ``next_neg`` scores against the single next dislike only (the ground truth's
``next_neg``; an empty set when it is null): the classic next-item reward the paper starts from
before adding future negatives (Table 2, "+ progressive GRPO" row). FPS is ``future_pos`` either way.

The format penalty defaults to ``lower_bound(variant) - 0.5`` (``-2.0`` for ``collab`` with
``gamma=0.5``) so that any valid SID always scores above garbage; set it explicitly to override.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from conrec_verl.core.contract import GroundTruthError, ground_truth_sids, parse_ground_truth  # noqa: F401 - re-exported
from conrec_verl.core.sid import Codebook, Codes, canonical_sid_re, format_sid, parse_sid, scan_sid_spans, sid_runs

PARSE_MODES = ("first", "strict")
logger = logging.getLogger(__name__)
TARGET_SETS = ("gts", "next_neg")
EMPTY_TARGETS = ("error", "zero")


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


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


class ScoringConfigError(ValueError):
    """A reward/scoring option has an invalid value."""


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float, or a :class:`ScoringConfigError` naming the option."""
    if isinstance(value, bool):
        raise ScoringConfigError(f"{name} must be a finite number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ScoringConfigError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(out):
        raise ScoringConfigError(f"{name} must be a finite number, got {value!r}")
    return out


# ---------------------------------------------------------------------------------------------
# reward variants: a registry, like verl's advantage estimators (core_algos.register_adv_est)
# ---------------------------------------------------------------------------------------------

#: ``fn(s_g, s_f, depth, config, hier_weights) -> reward`` of a valid output: ``s_g``/``s_f`` its
#: max cosine to GTS / FPS, ``depth`` the deepest SID prefix it shares with a GTS item, ``config`` the
#: :class:`RewardConfig`, ``hier_weights`` the per-depth weights (``RewardConfig.effective_hier_weights``)
VariantFn = Callable[[float, float, int, "RewardConfig", Sequence[float]], float]


@dataclass(frozen=True)
class RewardVariant:
    name: str
    fn: VariantFn
    #: the lowest reward a valid output can get (the default format penalty is 0.5 below it)
    lower_bound: Callable[["RewardConfig"], float]
    #: which of the paper's reward designs it is
    paper: str = ""


REWARD_VARIANTS: dict[str, RewardVariant] = {}


def register_reward_variant(name: str, lower_bound: Callable[["RewardConfig"], float], paper: str = ""):
    """Register a reward variant (``reward.reward_kwargs.variant=<name>``); the decorated function's
    docstring is its formula. ``lower_bound(config)`` must bound every reward of a valid output from
    below (tests check it for every registered variant). As with verl's registries, the module that
    registers it must be imported in every process that scores (verl's reward workers too): put it
    in a module loaded through a ``verl.plugins`` entry point."""

    def decorate(fn: VariantFn) -> VariantFn:
        if name in REWARD_VARIANTS and REWARD_VARIANTS[name].fn is not fn:
            raise ValueError(f"reward variant {name!r} is already registered")
        REWARD_VARIANTS[name] = RewardVariant(name, fn, lower_bound, paper)
        return fn

    return decorate


def _truncate(x: float, t: float) -> float:
    return x if x >= t else 0.0


def _truncated_floor(config) -> float:
    """The lowest ``[s]_t`` for a cosine ``s``: 0, or ``t`` itself when the threshold is negative."""
    return min(0.0, max(-1.0, config.sim_threshold))


@register_reward_variant("collab", lower_bound=lambda c: -1.0 - c.gamma, paper="(c), the final choice")
def collab_reward(s_g, s_f, depth, config, hier_weights):
    """``s_g - gamma * s_f``: close to what the user will dislike, away from what they will like."""
    return s_g - config.gamma * s_f


@register_reward_variant("neg_only", lower_bound=lambda c: -1.0, paper="(a)")
def neg_only_reward(s_g, s_f, depth, config, hier_weights):
    """``s_g``."""
    return s_g


@register_reward_variant("neg_truncated", lower_bound=_truncated_floor, paper="(b)")
def neg_truncated_reward(s_g, s_f, depth, config, hier_weights):
    """``s_g`` if ``s_g >= sim_threshold`` else 0."""
    return _truncate(s_g, config.sim_threshold)


@register_reward_variant("double_truncated", lower_bound=lambda c: _truncated_floor(c) - c.gamma, paper="(d)")
def double_truncated_reward(s_g, s_f, depth, config, hier_weights):
    """``[s_g]_t - gamma * [s_f]_t`` with ``[x]_t = x if x >= sim_threshold else 0``."""
    return _truncate(s_g, config.sim_threshold) - config.gamma * _truncate(s_f, config.sim_threshold)


@register_reward_variant("hierarchical", lower_bound=lambda c: 0.0, paper="(e)")
def hierarchical_reward(s_g, s_f, depth, config, hier_weights):
    """``hier_weights[d-1]`` for the deepest prefix ``d`` shared with a GTS item, 0 if none."""
    return hier_weights[depth - 1] if depth > 0 else 0.0


#: the built-in variants (the registry may hold more)
VARIANTS = tuple(REWARD_VARIANTS)


@dataclass(frozen=True)
class RewardConfig:
    """Options of the CoNRec reward; the keys of ``reward.reward_kwargs`` (minus ``codebook_path``)."""

    variant: str = "collab"
    #: weight of the future-positive penalty (paper: [gap]; 0.5 keeps the negative term dominant)
    gamma: float = 0.5
    #: similarity truncation threshold of the truncated variants (paper: 0.6)
    sim_threshold: float = 0.6
    #: reward of an invalid output; ``None`` = ``lower_bound(variant) - 0.5``
    format_penalty: float | None = None
    #: reward per prefix depth 1..L for ``hierarchical``; ``None`` = ``10 ** -(L - d)``
    hier_weights: tuple[float, ...] | None = None
    #: ``first`` (first complete in-range SID counts) or ``strict`` (output must be one SID)
    parse_mode: str = "first"
    #: refuse ground truths whose ``sid_build`` differs from the codebook's fingerprint
    check_sid_build: bool = True
    #: positive target set: ``gts`` (future_neg ∪ swing) or ``next_neg`` (the single next dislike)
    targets: str = "gts"
    #: a ground truth with no usable target SID (``{}``, empty lists, only out-of-range SIDs):
    #: ``error`` (a :class:`GroundTruthError`: every output would score the same, no signal) or
    #: ``zero`` (score it with similarity 0, counted in ``Scorer.n_empty_targets``, warned once)
    empty_targets: str = "error"

    def __post_init__(self):
        if self.variant not in REWARD_VARIANTS:
            raise ScoringConfigError(f"reward variant {self.variant!r} unknown; choose one of {tuple(REWARD_VARIANTS)}")
        if self.parse_mode not in PARSE_MODES:
            raise ScoringConfigError(f"parse_mode {self.parse_mode!r} unknown; choose one of {PARSE_MODES}")
        if self.targets not in TARGET_SETS:
            raise ScoringConfigError(f"targets {self.targets!r} unknown; choose one of {TARGET_SETS}")
        if self.empty_targets not in EMPTY_TARGETS:
            raise ScoringConfigError(f"empty_targets {self.empty_targets!r} unknown; choose one of {EMPTY_TARGETS}")
        for name in ("gamma", "sim_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScoringConfigError(f"{name} must be a finite number, got {value!r}")
        if self.gamma < 0:
            raise ScoringConfigError(f"gamma must be >= 0, got {self.gamma}")
        if self.format_penalty is not None and not math.isfinite(float(self.format_penalty)):
            raise ScoringConfigError(f"format_penalty must be finite, got {self.format_penalty!r}")
        if self.hier_weights is not None:
            object.__setattr__(self, "hier_weights", tuple(_number("hier_weights", w) for w in self.hier_weights))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None, ignore: Sequence[str] = ()) -> "RewardConfig":
        """Build from a dict / DictConfig; unknown keys (other than ``ignore``) are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in options if k not in known and k not in ignore)
        if unknown:
            raise ScoringConfigError(f"unknown reward option(s) {unknown}; known: {sorted(known | set(ignore))}")
        kwargs = {k: v for k, v in options.items() if k in known}
        if kwargs.get("hier_weights") is not None:
            weights = kwargs["hier_weights"]
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
                raise ScoringConfigError(f"hier_weights must be a list of numbers (one per SID level), got {weights!r}")
            kwargs["hier_weights"] = tuple(_number("hier_weights", w) for w in weights)
        for key in ("gamma", "sim_threshold", "format_penalty"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = _number(key, kwargs[key])
        for key in ("check_sid_build",):
            if key in kwargs and not isinstance(kwargs[key], bool):
                raise ScoringConfigError(f"{key} must be true or false, got {kwargs[key]!r}")
        return cls(**kwargs)

    def lower_bound(self) -> float:
        """The lowest reward a valid SID can get under this variant."""
        return float(REWARD_VARIANTS[self.variant].lower_bound(self))

    def effective_format_penalty(self) -> float:
        if self.format_penalty is not None:
            return float(self.format_penalty)
        return self.lower_bound() - 0.5

    def effective_hier_weights(self, num_levels: int) -> tuple[float, ...]:
        if self.hier_weights is None:
            return tuple(10.0 ** -(num_levels - d) for d in range(1, num_levels + 1))
        if len(self.hier_weights) != num_levels:
            raise ScoringConfigError(
                f"hier_weights has {len(self.hier_weights)} entries but the codebook has {num_levels} levels"
            )
        return self.hier_weights


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

    def as_extra_info(self) -> dict:
        """Flat scalars only (verl stacks them into numpy arrays): invalid rows report 0 similarities."""
        return {
            "valid_sid": float(self.valid),
            "non_item_sid": float(self.non_item),
            "exact_hit": float(self.exact_hit),
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
        self._variant = REWARD_VARIANTS[self.config.variant].fn
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
                          stacked=np.ascontiguousarray(np.vstack([gts_unit, fps_unit])), prefixes=prefixes)
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
        reward = self._reward(s_g, s_f, depth)
        return ScoreResult(
            reward=reward, valid=True, sid=format_sid(codes), exact_hit=hit, prefix_depth=depth,
            sim_gts=s_g, sim_fps=s_f,
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
