"""Semantic-ID (SID) codec and codebook.

A semantic ID is a tuple of codes, one per residual-quantisation level. In text it is written as
one added token per level, levels named ``a``, ``b``, ``c``, ...::

    (12, 200, 7)  <->  "<a_12><b_200><c_7>"

An item's *reconstructed embedding* is the sum of the codewords its SID selects; the reward,
the evaluation metrics and the deployment filter all compare items through it.

Nothing here imports verl or torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from conrec_verl.io_utils import atomic_path

LEVEL_LETTERS = "abcdefgh"
SID_TOKEN_RE = re.compile(r"<([a-h])_(\d{1,7})>")

Codes = tuple[int, ...]


def sid_token(level: int, code: int) -> str:
    """The text token for ``code`` at ``level`` (0-based), e.g. ``sid_token(1, 5) == "<b_5>"``."""
    if not 0 <= level < len(LEVEL_LETTERS):
        raise ValueError(f"SID level {level} out of range 0..{len(LEVEL_LETTERS) - 1}")
    if code < 0:
        raise ValueError(f"SID code must be non-negative, got {code}")
    return f"<{LEVEL_LETTERS[level]}_{int(code)}>"


def format_sid(codes: Sequence[int]) -> str:
    """``(12, 200, 7) -> "<a_12><b_200><c_7>"``."""
    return "".join(sid_token(level, int(c)) for level, c in enumerate(codes))


@functools.lru_cache(maxsize=16)
def canonical_sid_re(num_levels: int) -> "re.Pattern[str]":
    """A compiled pattern that matches exactly one canonical SID of ``num_levels`` levels
    (``<a_12><b_0><c_7>``: no leading zeros, no spaces) and captures its codes: the fast path of
    parsing model outputs and data-file SIDs."""
    return re.compile("".join(f"<{LEVEL_LETTERS[lv]}_(0|[1-9][0-9]{{0,6}})>" for lv in range(int(num_levels))))


def all_sid_tokens(sizes: Sequence[int]) -> list[str]:
    """Every SID token of a codebook with ``sizes[l]`` codes at level ``l``."""
    return [sid_token(level, code) for level, size in enumerate(sizes) for code in range(int(size))]


def parse_sid(text: str) -> Codes | None:
    """Parse a string that is exactly one SID (whitespace between tokens allowed).

    Returns ``None`` for anything else. Use :func:`extract_sids` for free-form model output.
    """
    if not isinstance(text, str):
        return None
    stripped = re.sub(r"\s+", "", text)
    tokens = SID_TOKEN_RE.findall(stripped)
    if not tokens or "".join(f"<{lv}_{c}>" for lv, c in tokens) != stripped:
        return None
    codes = []
    for position, (letter, code) in enumerate(tokens):
        if LEVEL_LETTERS.index(letter) != position:
            return None
        codes.append(int(code))
    return tuple(codes)


@dataclass(frozen=True)
class SidSpan:
    """A run of consecutive level tokens found in text (may be a partial SID)."""

    codes: Codes
    start: int
    end: int


def _runs(tokens: Iterable[tuple[int, int, bool]]) -> list[tuple[Codes, int, int]]:
    """The SID runs of a sequence of level tokens ``(level, code, joins_previous)``: a run starts at a
    level-0 token and continues while the next token is the next level and ``joins_previous`` (only
    whitespace, or nothing, since the previous token). Tokens that neither start nor continue a run
    are skipped. Returns ``(codes, first, last)`` per run, ``first``/``last`` the token positions.
    The one scanning rule of :func:`scan_sid_spans` (text) and :func:`sid_runs` (token ids)."""
    runs: list[tuple[Codes, int, int]] = []
    current: list[int] = []
    first = last = 0
    for position, (level, code, joins_previous) in enumerate(tokens):
        if current and level == len(current) and joins_previous:
            current.append(code)
            last = position
            continue
        if current:
            runs.append((tuple(current), first, last))
            current = []
        if level == 0:
            current = [code]
            first = last = position
    if current:
        runs.append((tuple(current), first, last))
    return runs


def scan_sid_spans(text: str) -> list[SidSpan]:
    """Find runs ``<a_..><b_..>...`` in arbitrary text.

    A run starts at an ``a`` token and continues while the next token is the next level and only
    whitespace separates them. Tokens that do not start or continue a run are ignored.
    Never raises on a ``str``; anything else yields ``[]``.
    """
    if not isinstance(text, str):
        return []
    matches = list(SID_TOKEN_RE.finditer(text))
    tokens = ((LEVEL_LETTERS.index(m.group(1)), int(m.group(2)),
               i > 0 and not text[matches[i - 1].end():m.start()].strip()) for i, m in enumerate(matches))
    return [SidSpan(codes, matches[first].start(), matches[last].end()) for codes, first, last in _runs(tokens)]


def extract_sids(text: str, num_levels: int) -> list[Codes]:
    """All complete SIDs (exactly ``num_levels`` levels) in ``text``, in order of appearance."""
    return [span.codes for span in scan_sid_spans(text) if len(span.codes) == num_levels]


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


class CodebookError(ValueError):
    """A codebook file is missing, malformed or does not match what uses it."""


class SidTokenError(CodebookError):
    """A tokenizer lacks SID tokens of the build that uses it."""


class SidTokenMap:
    """Token ids of a tokenizer's SID tokens ``<a_0>`` ..., both directions: the token form of a SID.

    ``vocab`` is the tokenizer's ``token -> id`` mapping (``tokenizer.get_vocab()``; a tokenizer
    itself is accepted). Every token of ``level_sizes`` must be in it (:class:`SidTokenError`).
    """

    def __init__(self, vocab, level_sizes: Sequence[int]):
        if hasattr(vocab, "get_vocab"):
            vocab = vocab.get_vocab()
        self.num_levels = len(level_sizes)
        self.ids: list[list[int]] = []
        missing = []
        for level, size in enumerate(level_sizes):
            row = []
            for code in range(int(size)):
                tok = sid_token(level, code)
                if tok not in vocab:
                    missing.append(tok)
                    row.append(-1)
                else:
                    row.append(int(vocab[tok]))
            self.ids.append(row)
        if missing:
            raise SidTokenError(
                f"the tokenizer lacks {len(missing)} SID tokens (first: {missing[:5]}); build it with "
                "conrec_verl.model_builder (build_tokenizer / extend_model_with_sid_tokens) for this SID build"
            )
        self.reverse: dict[int, tuple[int, int]] = {
            tid: (level, code) for level, row in enumerate(self.ids) for code, tid in enumerate(row)
        }

    def token_id(self, level: int, code: int) -> int:
        return self.ids[level][code]

    def decode(self, token_ids: Sequence[int]) -> Codes | None:
        """Codes spelled by ``token_ids`` (level 0, 1, ... in order), or None if they are not a SID path."""
        codes = []
        for depth, tid in enumerate(token_ids):
            hit = self.reverse.get(int(tid))
            if hit is None or hit[0] != depth:
                return None
            codes.append(hit[1])
        return tuple(codes)

    def sid_tokens(self, token_ids: Iterable[int],
                   skip_ids: "frozenset[int] | set[int]" = frozenset()) -> list[tuple[int, int]] | None:
        """The ``(level, code)`` of every SID token of a generated sequence, read from its ids, when
        every other id is in ``skip_ids`` (tokens the decoded output drops, or only whitespace): then
        :func:`sid_runs` of them equals :func:`scan_sid_spans` of the decoded text. ``None`` when another
        token is present: its text might spell SID characters, so the text must be scanned."""
        reverse = self.reverse
        tokens = []
        for tid in token_ids:
            hit = reverse.get(int(tid))
            if hit is None:
                if int(tid) in skip_ids:
                    continue
                return None
            tokens.append(hit)
        return tokens


def sid_runs(tokens: Sequence[tuple[int, int]]) -> list[Codes]:
    """The SID runs of a sequence of SID tokens ``(level, code)`` with nothing but whitespace between
    them (what :meth:`SidTokenMap.sid_tokens` returns), by the rule of :func:`scan_sid_spans`."""
    return [codes for codes, _, _ in _runs((level, code, True) for level, code in tokens)]


class Codebook:
    """Residual codebooks: ``codewords[l]`` has shape ``(sizes[l], dim)``."""

    FORMAT_VERSION = 1

    def __init__(self, codewords: Sequence[np.ndarray], meta: dict | None = None):
        if not codewords:
            raise CodebookError("a codebook needs at least one level")
        arrays = [np.ascontiguousarray(np.asarray(c, dtype=np.float32)) for c in codewords]
        dims = {a.shape[1] if a.ndim == 2 else -1 for a in arrays}
        if len(dims) != 1 or -1 in dims:
            raise CodebookError(
                f"every level must be a 2-D array with the same width; got shapes {[a.shape for a in arrays]}"
            )
        if len(arrays) > len(LEVEL_LETTERS):
            raise CodebookError(f"at most {len(LEVEL_LETTERS)} levels are supported, got {len(arrays)}")
        self.codewords = arrays
        self.meta = dict(meta or {})
        self._fingerprint: str | None = None
        self._sizes = tuple(int(a.shape[0]) for a in arrays)

    @property
    def num_levels(self) -> int:
        return len(self.codewords)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def dim(self) -> int:
        return int(self.codewords[0].shape[1])

    @property
    def fingerprint(self) -> str:
        """A short hash of the codewords: identifies one SID build."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for a in self.codewords:
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def tokens(self) -> list[str]:
        return all_sid_tokens(self.sizes)

    def is_valid(self, codes: Sequence[int]) -> bool:
        """Whether ``codes`` is one in-range code per level (the scorer's hot path: keep it plain)."""
        sizes = self._sizes
        if len(codes) != len(sizes):
            return False
        for c, size in zip(codes, sizes):
            if not 0 <= c < size:
                return False
        return True

    def unit_embed(self, codes: Sequence[int]) -> np.ndarray:
        """:meth:`embed` divided by its norm (a zero vector stays zero): what cosines compare."""
        emb = self.embed(codes)
        norm = float(np.sqrt(emb @ emb))
        return emb / norm if norm > 0 else emb * 0.0

    def embed(self, codes: Sequence[int]) -> np.ndarray:
        """Reconstructed embedding of one SID: the sum of its codewords."""
        if not self.is_valid(codes):
            raise CodebookError(f"SID {tuple(codes)} is not valid for codebook sizes {self.sizes}")
        out = np.zeros(self.dim, dtype=np.float32)
        for level, c in enumerate(codes):
            out += self.codewords[level][int(c)]
        return out

    def embed_many(self, codes: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`embed` for an ``(N, num_levels)`` integer array."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.num_levels)
        for level, size in enumerate(self.sizes):
            col = codes[:, level]
            if col.size and (col.min() < 0 or col.max() >= size):
                raise CodebookError(f"level {level} code out of range 0..{size - 1}")
        out = np.zeros((codes.shape[0], self.dim), dtype=np.float32)
        for level in range(self.num_levels):
            out += self.codewords[level][codes[:, level]]
        return out

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (temp file + rename)."""
        path = os.fspath(path)
        meta = dict(self.meta, format_version=self.FORMAT_VERSION, sizes=list(self.sizes),
                    dim=self.dim, fingerprint=self.fingerprint)
        arrays = {f"level_{i}": a for i, a in enumerate(self.codewords)}
        arrays["meta_json"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Codebook":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CodebookError(f"codebook file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta_json"]).decode()) if "meta_json" in data else {}
                levels = sorted((k for k in data.files if k.startswith("level_")),
                                key=lambda k: int(k.split("_")[1]))
                codewords = [data[k] for k in levels]
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise CodebookError(f"{path}: not a conrec codebook file ({exc})") from exc
        book = cls(codewords, meta)
        expected = meta.get("fingerprint")
        if expected and expected != book.fingerprint:
            raise CodebookError(f"{path}: codewords do not match the stored fingerprint (file corrupted?)")
        return book


def as_codes_array(sids: Iterable[Sequence[int]], num_levels: int) -> np.ndarray:
    arr = np.asarray(list(sids), dtype=np.int64)
    return arr.reshape(-1, num_levels)
