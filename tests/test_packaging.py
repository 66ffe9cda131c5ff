"""The wheel: one import name (``conrec_verl``), the recipes and data_prep inside it, and the
README's entry points working from an install outside the checkout (the pipeline's CI profile runs
from the wheel in ``tests/test_pipeline.py``; ``.ci/run`` installs the wheel into a fresh venv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_of_the_tree_is_listed_for_the_wheel():
    tool = _pyproject()["tool"]["setuptools"]
    mapped = tool["package-dir"]  # {import name: folder}
    found = set()
    for name, folder in {"conrec_verl": "conrec_verl", **mapped}.items():
        base = ROOT / folder
        found |= {".".join((name, *init.parent.relative_to(base).parts)) for init in base.rglob("__init__.py")}
    assert set(tool["packages"]) == found, "pyproject.toml [tool.setuptools] packages is out of date"


def test_wheel_has_one_import_name_and_ships_recipes_and_data(wheel_install, tmp_path):
    if wheel_install.where.startswith("the venv"):
        site = wheel_install.run(["-c", "import conrec_verl, pathlib; print(pathlib.Path(conrec_verl.__file__).parents[1])"],
                                 cwd=tmp_path).stdout.strip()
        top = {p.name for p in Path(site).iterdir() if (p / "__init__.py").is_file() and p.name in ("data_prep", "recipes")}
        assert not top
    else:
        names = {p.name for p in Path(wheel_install.where).iterdir() if not p.name.endswith(".dist-info")}
        assert names <= {"conrec_verl", "bin"}, names
    probe = (
        "import json, conrec_verl, conrec_verl.data_prep as dp, importlib.util as u\n"
        "from conrec_verl.recipes import config_dir, profile_dir\n"
        "from conrec_verl.data_prep.readers import SAMPLE_PATH\n"
        "print(json.dumps({'pkg': conrec_verl.__file__, 'dp': dp.__file__, 'configs': sorted(p.name for p in config_dir().glob('*.yaml')),"
        " 'profiles': sorted(p.stem for p in profile_dir().glob('*.yaml')), 'sample': SAMPLE_PATH.is_file(),"
        " 'top_data_prep': u.find_spec('data_prep') is not None, 'top_recipes': u.find_spec('recipes') is not None}))"
    )
    proc = wheel_install.run(["-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["pkg"].startswith(str(ROOT)) and not got["dp"].startswith(str(ROOT)), got
    shipped = {p.name for p in (ROOT / "recipes" / "conrec" / "config").glob("*.yaml")}
    assert set(got["configs"]) == shipped and {"cpu_tiny", "ci_tiny", "gpu_qwen3"} <= set(got["profiles"])
    assert got["sample"] and not got["top_data_prep"] and not got["top_recipes"]


def test_wheel_entry_points_find_their_configs_outside_the_checkout(wheel_install, tmp_path):
    """data_prep's hydra configs, a verl config through ``pkg://`` with the cpu_runtime include,
    the pipeline's profile check: each from the installed files, in a folder with no checkout."""
    proc = wheel_install.run(["-m", "conrec_verl.data_prep", "out_dir=x", "sid.sizes=[9000,2]"], cwd=tmp_path)
    assert proc.returncode == 2 and "codebook too large" in proc.stderr, proc.stderr[-2000:]
    compose = (
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module('conrec_verl.recipes.conrec.config', version_base=None):\n"
        "    c = compose('conrec_cpu_tiny')\n"
        "print(c.data.dataloader_num_workers, c.trainer.device, c.algorithm.adv_estimator)"
    )
    proc = wheel_install.run(["-c", compose], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "cpu", "progressive_grpo"]
    proc = wheel_install.run(["-m", "conrec_verl.pipeline", "--run-dir", "r", "--profile", "ci_tiny", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "data.config" in proc.stdout
    proc = wheel_install.run(["-m", "conrec_verl.pipeline", "--run-dir", "r", "--profile", "ci_tiny", "sft.stagez=1"],
                             cwd=tmp_path)
    assert proc.returncode == 2 and "sft.stagez" in proc.stderr and not (tmp_path / "r" / "data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["r"])


def test_the_checkout_resolves_the_installed_names_without_any_install():
    """Run from the repository root (its conrec_verl/ first on sys.path, no site-packages at all),
    conrec_verl.data_prep and conrec_verl.recipes are the checkout's data_prep/ and recipes/."""
    probe = ("import conrec_verl.data_prep as d, conrec_verl.recipes as r; "
             "print(d.__file__); print(r.config_dir())")
    proc = subprocess.run([sys.executable, "-S", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dp, cfg = proc.stdout.split()
    assert dp == str(ROOT / "data_prep" / "__init__.py") and cfg == str(ROOT / "recipes" / "conrec" / "config")
