"""Write outputs atomically: a failed or interrupted step leaves nothing half-written behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_dirs(out_dir: str | os.PathLike, owner: str) -> list[Path]:
    """Remove the temporary folders of ``out_dir`` that :func:`atomic_dir` with ``owner`` left behind
    when its process was killed (the process id in ``owner`` no longer runs); a build still running,
    or a folder without the owner file, is left alone. Returns what was removed."""
    out = Path(out_dir)
    removed = []
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int((tmp / owner).read_text().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, merge: bool = False, owner: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` (``.<name>.tmp-*``) to build it in.

    On success the folder *replaces* ``out_dir`` (the old one is renamed aside, the new one renamed
    in, then the old one removed: ``out_dir`` is never half-written; should the second rename fail,
    the old one is put back) or, with ``merge=True``, each of its files is moved into ``out_dir``
    (files of the same name replaced, the others kept; each file is replaced atomically, the set of
    files is not: a move failing part-way leaves the files moved before it). On an exception while
    building, the temporary folder is removed and ``out_dir`` is left as it was.

    ``owner``: a file name; while the folder is built it holds this process's id, so that
    :func:`remove_stale_dirs` can clean up after a killed process. It is removed before the rename.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if owner:
            (tmp / owner).write_text(str(os.getpid()))
        yield tmp
        if owner:
            (tmp / owner).unlink()
        if merge:
            out.mkdir(parents=True, exist_ok=True)
            for src in sorted(tmp.rglob("*")):
                if src.is_file():
                    dst = out / src.relative_to(tmp)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
            shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / "old", out)
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success it replaces ``path``.

    For writers that want a path (``DataFrame.to_parquet``, ``np.savez``, ...). On any exception
    the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, errors="replace", newline="\n") as fh:
            fh.write(text)
    return Path(path)
