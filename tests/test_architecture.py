"""The package's import rules, read from the code (every import, also inside functions): ``core/``
is pure (no verl, no other part of the package), the baselines do not depend on the evaluation
that runs them, and ``data_prep`` reaches the package only through ``core`` and small helpers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(folder: Path) -> dict[str, set[str]]:
    out = {}
    for path in sorted(folder.rglob("*.py")) if folder.is_dir() else [folder]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(folder: str, bad) -> list[str]:
    return [f"{path}: {name}" for path, names in imports_of(ROOT / folder).items() for name in sorted(names) if bad(name)]


def test_core_is_pure():
    """``core`` may use ``io_utils`` (atomic writes, standard library only) and nothing else of ours."""
    allowed = ("conrec_verl.core", "conrec_verl.io_utils")
    assert offenders("conrec_verl/core", lambda n: n == "verl" or n.startswith("verl.") or n == "torch"
                     or (n.startswith("conrec_verl") and not n.startswith(allowed))) == []
    assert offenders("conrec_verl/io_utils.py", lambda n: n.startswith(("conrec_verl", "verl", "torch"))) == []


def test_baselines_do_not_import_the_evaluation():
    assert offenders("conrec_verl/baselines", lambda n: n.startswith("conrec_verl.evaluation")) == []


def test_data_prep_uses_only_the_pure_parts_of_the_package():
    allowed = ("conrec_verl.core", "conrec_verl.data_prep", "conrec_verl.io_utils", "conrec_verl.runtime.loopback")
    assert offenders("data_prep", lambda n: n.startswith("conrec_verl") and not n.startswith(allowed)) == []
    assert offenders("data_prep", lambda n: n == "verl" or n.startswith("verl.")) == []


def test_the_rules_see_imports_inside_functions():
    found = imports_of(ROOT / "conrec_verl" / "runtime")["conrec_verl/runtime/verl_compat.py"]
    assert "verl.workers.rollout" in found  # imported inside register_rollout only


def test_verl_registrations_live_in_plugins_or_runtime():
    """A module that imports one of verl's ``register*`` functions is a verl adapter: it belongs in
    ``plugins/`` (the extension points) or ``runtime/`` (running verl on a CPU)."""
    found = []
    for path in sorted((ROOT / "conrec_verl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "verl"
                    and any(a.name.startswith("register") for a in node.names)):
                found.append(str(path.relative_to(ROOT / "conrec_verl")))
    assert found, "no verl registration found: the check reads nothing"
    assert [p for p in found if not p.startswith(("plugins/", "runtime/"))] == []


def test_the_test_tree_mirrors_the_package():
    """Every subpackage (and data_prep) has a test folder of the same name whose tests use it (import it
    or name its modules in a config they run), and every test folder is named after a subpackage."""
    packages = {p.parent.name for p in (ROOT / "conrec_verl").glob("*/__init__.py")} | {"data_prep"}
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == packages
    for name in sorted(folders):
        target = "conrec_verl.data_prep" if name == "data_prep" else f"conrec_verl.{name}"
        for path in sorted((ROOT / "tests" / name).glob("test_*.py")):
            assert target in path.read_text(), f"{path.relative_to(ROOT)} does not use {target}"
