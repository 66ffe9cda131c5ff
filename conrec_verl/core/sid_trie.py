"""A prefix trie over the SIDs of one build: which code may come next after a given prefix.

Constrained decoding must only ever emit SIDs that exist in ``sid_map.parquet``. Allowing, per
position, every code seen at that level is *not* enough: ``<a_1><b_2>`` and ``<a_3><b_4>`` existing
does not make ``<a_1><b_4>`` an item. This trie stores the real prefixes, so a walk that always
picks an allowed next code ends at an existing SID, and distinct walks end at distinct SIDs.

Pure Python (no torch, no verl). Codes are the integer tuples of :mod:`conrec_verl.core.sid`.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from conrec_verl.core.sid import Codes, parse_sid


class SidTrieError(ValueError):
    """SIDs handed to the trie are inconsistent (mixed lengths, unparsable strings)."""


class SidTrie:
    """Prefix trie over a set of SIDs that all have ``num_levels`` levels.

    ``allowed(prefix)`` -> the sorted next codes that extend ``prefix`` towards an existing SID
    (empty for a complete SID or a prefix that leads nowhere).
    """

    def __init__(self, sids: Iterable[Sequence[int]], num_levels: int | None = None):
        children: dict[Codes, set[int]] = {}
        leaves: set[Codes] = set()
        for raw in sids:
            codes = tuple(int(c) for c in raw)
            if num_levels is None:
                num_levels = len(codes)
            if len(codes) != num_levels or not codes:
                raise SidTrieError(
                    f"every SID must have {num_levels} levels; got {codes!r} with {len(codes)}"
                )
            if any(c < 0 for c in codes):
                raise SidTrieError(f"SID codes must be non-negative; got {codes!r}")
            leaves.add(codes)
            for depth in range(num_levels):
                children.setdefault(codes[:depth], set()).add(codes[depth])
        if not leaves:
            raise SidTrieError("a SID trie needs at least one SID")
        self.num_levels: int = int(num_levels)  # type: ignore[arg-type]
        self._children: dict[Codes, tuple[int, ...]] = {p: tuple(sorted(s)) for p, s in children.items()}
        self._leaves = frozenset(leaves)

    @classmethod
    def from_strings(cls, sids: Iterable[str]) -> "SidTrie":
        """Build from SID strings such as ``"<a_1><b_2><c_3>"``."""
        parsed = []
        for position, text in enumerate(sids):
            codes = parse_sid(text)
            if codes is None:
                raise SidTrieError(f"entry {position}: {text!r} is not a SID string")
            parsed.append(codes)
        return cls(parsed)

    def __len__(self) -> int:
        return len(self._leaves)

    def __contains__(self, codes: object) -> bool:
        try:
            return tuple(int(c) for c in codes) in self._leaves  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return False

    def allowed(self, prefix: Sequence[int]) -> tuple[int, ...]:
        """Codes that may follow ``prefix`` (empty when complete or not a prefix of any SID)."""
        return self._children.get(tuple(int(c) for c in prefix), ())

    def is_prefix(self, prefix: Sequence[int]) -> bool:
        """Whether some SID starts with ``prefix`` (the empty prefix always does)."""
        prefix = tuple(int(c) for c in prefix)
        return prefix in self._children or prefix in self._leaves

    def iter_sids(self) -> Iterator[Codes]:
        """Every SID by depth-first walk in code order (each exactly once)."""
        stack: list[Codes] = [()]
        while stack:
            prefix = stack.pop()
            if len(prefix) == self.num_levels:
                yield prefix
                continue
            for code in reversed(self.allowed(prefix)):
                stack.append(prefix + (code,))

    def without(self, excluded: Iterable[Sequence[int]]) -> "SidTrie":
        """A trie of the same SIDs less ``excluded`` (SIDs not in the trie are ignored).

        Used as a per-row mask: a search in the result can never reach an excluded SID, and every
        prefix left in it still leads to at least one SID (emptied prefixes are pruned up the
        path), so constrained decoding keeps returning valid, non-excluded items. Costs a shallow
        copy of the prefix table plus O(levels) per excluded SID.
        """
        gone = {tuple(int(c) for c in e) for e in excluded} & self._leaves
        if not gone:
            return self
        if len(gone) == len(self._leaves):
            raise SidTrieError("excluding every SID would leave an empty trie")
        children = dict(self._children)
        for codes in gone:
            for depth in range(self.num_levels - 1, -1, -1):
                parent = codes[:depth]
                kept = tuple(c for c in children[parent] if c != codes[depth])
                if kept:
                    children[parent] = kept
                    break
                del children[parent]  # the prefix led only to excluded SIDs: prune it from its parent too
        out = object.__new__(SidTrie)
        out.num_levels = self.num_levels
        out._children = children
        out._leaves = self._leaves - gone
        return out

    def level_sizes(self) -> tuple[int, ...]:
        """Largest code + 1 used at each level (the token vocabulary the trie needs)."""
        sizes = [0] * self.num_levels
        for codes in self._leaves:
            for level, c in enumerate(codes):
                sizes[level] = max(sizes[level], c + 1)
        return tuple(sizes)
