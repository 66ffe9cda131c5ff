"""The one atomic-write helper every writer uses (data_prep, evaluation reports, model builder,
pipeline, smoke data): replace or merge on success, nothing changed on failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conrec_verl.io_utils import atomic_dir, atomic_path, atomic_write_text, remove_stale_dirs


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_replace_swaps_the_whole_folder_and_leaves_no_temporary_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert out.joinpath("old.txt").read_text() == "old"  # untouched while building
    assert listing(out) == ["sub", "sub/new.txt"]
    assert listing(tmp_path) == ["out", "out/sub", "out/sub/new.txt"]


@pytest.mark.parametrize("merge", [False, True])
def test_a_failure_changes_nothing(tmp_path, merge):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, merge=merge) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["out", "out/keep.txt"]


def test_merge_moves_files_in_and_keeps_the_others(tmp_path):
    out = tmp_path / "report"
    (out / "predictions").mkdir(parents=True)
    (out / "mine.txt").write_text("mine")
    (out / "metrics.json").write_text("old")
    with atomic_dir(out, merge=True) as tmp:
        (tmp / "metrics.json").write_text("new")
        (tmp / "predictions").mkdir()
        (tmp / "predictions" / "a.jsonl").write_text("a")
    assert listing(out) == ["metrics.json", "mine.txt", "predictions", "predictions/a.jsonl"]
    assert (out / "metrics.json").read_text() == "new"
    assert listing(tmp_path) == ["report", *[f"report/{p}" for p in listing(out)]]


def test_owner_file_marks_a_build_and_only_dead_builds_are_swept(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out, owner=".pid") as tmp:
        assert (tmp / ".pid").read_text() == str(os.getpid())
        assert remove_stale_dirs(out, ".pid") == []  # this build runs
    assert not (out / ".pid").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, foreign = tmp_path / ".d.tmp-stale", tmp_path / ".d.tmp-foreign"
    stale.mkdir()
    foreign.mkdir()
    (stale / ".pid").write_text(str(dead.pid))
    assert remove_stale_dirs(out, ".pid") == [stale]
    assert not stale.exists() and foreign.exists()


def test_file_helpers_replace_or_keep(tmp_path):
    path = tmp_path / "a" / "f.txt"
    atomic_write_text(path, "one")
    with pytest.raises(ValueError):
        with atomic_path(path) as tmp:
            tmp.write_text("two")
            raise ValueError
    assert path.read_text() == "one" and listing(tmp_path) == ["a", "a/f.txt"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert listing(tmp_path) == ["out", "out/old.txt"]
