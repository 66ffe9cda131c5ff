"""The one module that adapts verl at run time (``conrec_verl.runtime.verl_compat``): every
adaptation is still needed on the installed verl (so this test fails on the verl release that adds
the hook, and the adaptation can go), ``docs/upstream.md`` lists exactly these adaptations, no other
module touches the verl internals they patch, and the version guard."""

from __future__ import annotations

import logging
import re
import tokenize
from pathlib import Path

import pytest

from conrec_verl.runtime import verl_compat
from conrec_verl.runtime.verl_compat import ADAPTATIONS, PINNED_VERL

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_verl_is_the_pinned_one():
    assert verl_compat.verl_version() == PINNED_VERL


@pytest.mark.parametrize("name", list(ADAPTATIONS))
def test_every_adaptation_is_still_needed_on_the_installed_verl(name):
    assert ADAPTATIONS[name].still_needed(), (
        f"verl {verl_compat.verl_version()} has the hook adaptation {name!r} works around "
        f"({ADAPTATIONS[name].what}): use it and drop the adaptation (docs/upstream.md)")


def test_upstream_doc_lists_exactly_these_adaptations_in_order():
    doc = (ROOT / "docs" / "upstream.md").read_text()
    listed = re.findall(r"^\| \d+ \| `([a-z_]+)` \|", doc, flags=re.M)
    assert listed == list(ADAPTATIONS)


def _code(path: Path) -> str:
    """The code of a module without comments and strings (docstrings may name verl internals)."""
    with path.open() as fh:
        return " ".join(tok.string for tok in tokenize.generate_tokens(fh.readline)
                        if tok.type not in (tokenize.COMMENT, tokenize.STRING))


PATCHED = [r"_ROLLOUT_REGISTRY", r"auto_set_device\s*=(?!=)", r"SkipManager", r"CPUOffloadPolicy",
           r"init_process_group\s*=(?!=)", r"\.\s*poll_interval\s*=(?!=)"]


def test_no_other_module_touches_the_patched_verl_internals():
    compat = _code(ROOT / "conrec_verl" / "runtime" / "verl_compat.py")
    assert all(re.search(p, compat) for p in PATCHED)  # the scanner finds each where it is
    offenders = [f"{path.relative_to(ROOT)}: {p}" for path in (ROOT / "conrec_verl").rglob("*.py")
                 if path.name != "verl_compat.py" for p in PATCHED if re.search(p, _code(path))]
    assert not offenders


def test_guard_applies_on_the_pinned_verl_and_skips_what_a_newer_verl_fixed(monkeypatch, caplog):
    verl_compat.guard.cache_clear()
    try:
        assert verl_compat.guard("backend_string")
        verl_compat.guard.cache_clear()
        monkeypatch.setattr(verl_compat, "verl_version", lambda: "9.9.9")
        fixed = verl_compat.Adaptation("backend_string", "x", "y", lambda: False)
        monkeypatch.setitem(ADAPTATIONS, "backend_string", fixed)
        assert not verl_compat.guard("backend_string")
        verl_compat.guard.cache_clear()
        monkeypatch.setitem(ADAPTATIONS, "backend_string", verl_compat.Adaptation("backend_string", "x", "y", lambda: True))
        with caplog.at_level(logging.WARNING, logger=verl_compat.__name__):
            assert verl_compat.guard("backend_string")
        assert "written for verl 0.9.1, found 9.9.9" in caplog.text
    finally:
        verl_compat.guard.cache_clear()


def test_a_skipped_patch_leaves_verl_alone(monkeypatch):
    import torch.distributed as dist

    verl_compat.guard.cache_clear()
    monkeypatch.setattr(verl_compat, "verl_version", lambda: "9.9.9")
    monkeypatch.setitem(ADAPTATIONS, "backend_string", verl_compat.Adaptation("backend_string", "x", "y", lambda: False))
    original = dist.init_process_group
    unwrapped = getattr(original, "__wrapped__", original)
    monkeypatch.setattr(dist, "init_process_group", unwrapped)
    try:
        verl_compat.install_backend_normaliser()
        assert dist.init_process_group is unwrapped
    finally:
        verl_compat.guard.cache_clear()
