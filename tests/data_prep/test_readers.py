import gzip

import pandas as pd
import pytest

from conrec_verl.data_prep import DataPrepError
from conrec_verl.data_prep.readers import SAMPLE_PATH, read_input
from dp_helpers import ms


def generic_input(path, **kw):
    cfg = {"format": "generic", "path": str(path), "timestamp_unit": "auto", "timezone": "UTC",
           "columns": {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "label": "label"},
           "polarity": {"mode": "label", "negative_values": [0], "positive_values": [1]}, "items": {}}
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_bundled_sample_matches_its_readme():
    with gzip.open(SAMPLE_PATH, "rb") as fh:
        import hashlib

        assert hashlib.md5(fh.read()).hexdigest() == "bb785e5bebc2b3bb69ab6c2cc145a140"
    res = read_input({"format": "kuairand", "path": None, "sep": "\t", "timestamp_unit": "ms",
                      "columns": {"user": "user_id", "item": "video_id", "timestamp": "time_ms", "day": "date",
                                  "label": "label"},
                      "polarity": {"mode": "label", "negative_values": [0], "positive_values": [1]}})
    s = res.stats
    assert (s["events"], s["users"], s["items"], s["likes"], s["dislikes"]) == (41828, 664, 9359, 33745, 8083)
    df = res.interactions
    assert list(df.columns) == ["user_id", "item_id", "ts", "day", "polarity", "weight"]
    assert df["day"].min() == 20220408 and df["day"].max() == 20220421
    assert df["user_id"].map(type).eq(str).all()


def test_generic_csv_text_timestamps_weights_and_day(tmp_path):
    p = tmp_path / "log.csv"
    pd.DataFrame({"uid": [1, 1, 2], "iid": ["a", "b", "a"], "when": ["2024-01-02 23:30:00", "2024-01-03T01:00:00Z", "2024-01-01"],
                  "lab": ["bad", "good", "bad"], "w": [1.0, 2.5, 0.5]}).to_csv(p, index=False)
    res = read_input(generic_input(p, columns={"user": "uid", "item": "iid", "timestamp": "when", "label": "lab",
                                               "weight": "w"},
                                   polarity={"mode": "label", "negative_values": ["bad"], "positive_values": ["good"]}))
    df = res.interactions
    assert df["user_id"].tolist() == ["1", "1", "2"]
    assert df["day"].tolist() == [20240102, 20240103, 20240101]
    assert df["polarity"].tolist() == [-1, 1, -1]
    assert df["weight"].tolist() == [1.0, 2.5, 0.5]
    assert df["ts"].iloc[0] == pd.Timestamp("2024-01-02 23:30:00", tz="UTC").value // 10**6


@pytest.mark.parametrize("bad, row", [("inf", 2), ("1e39", 3), ("-1", 2), ("x", 3)])
def test_a_weight_that_is_not_a_finite_non_negative_number_names_its_row(tmp_path, bad, row):
    """Infinite weights (also float32 overflow, 1e39) would poison the embeddings' sums."""
    p = tmp_path / "log.csv"
    w = ["1.0", "2.0", "0.5"]
    w[row - 1] = bad
    pd.DataFrame({"uid": [1, 1, 2], "iid": ["a", "b", "a"], "when": ["2024-01-01"] * 3, "lab": [0, 1, 0],
                  "w": w}).to_csv(p, index=False)
    with pytest.raises(DataPrepError, match=rf"log\.csv, column 'w', row {row}: weight must be a finite non-negative number"):
        read_input(generic_input(p, columns={"user": "uid", "item": "iid", "timestamp": "when", "label": "lab",
                                             "weight": "w"}))


def test_generic_parquet_and_timezone_day(tmp_path):
    p = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": ["u"] * 2, "item_id": ["x", "y"], "timestamp": [ms(2, 20), ms(3, 1)],
                  "label": [0, 1]}).to_parquet(p)
    res = read_input(generic_input(p, timezone="Asia/Shanghai"))
    # 20:00 UTC on Jan 2 is Jan 3 in UTC+8
    assert res.interactions["day"].tolist() == [20240103, 20240103]


def _write_ml100k(folder, rows, items):
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    lines = []
    for iid, title, genres in items:
        flags = ["1" if g in genres else "0" for g in range(19)]
        lines.append("|".join([str(iid), title, "01-Jan-1995", "", "http://x"] + flags))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")


def test_movielens_100k_and_1m_formats(tmp_path):
    rows = [(1, 10, 1, 880000000), (1, 11, 5, 880000100), (2, 10, 3, 880000200), (2, 12, 4, 880000300)]
    _write_ml100k(tmp_path / "ml100k", rows, [(10, "Toy Story (1995)", {3, 4}), (11, "Heat (1995)", {1}),
                                              (12, "Café (1996)", {8}), (13, "Unrated (1990)", {8})])
    cfg = {"format": "movielens", "path": str(tmp_path / "ml100k"), "timezone": "UTC",
           "polarity": {"dislike_max": 2, "like_min": 4}, "items": {"unknown_ids": "drop"}}
    res = read_input(cfg)
    df = res.interactions
    assert len(df) == 3 and res.stats["neutral_dropped"] == 1
    assert df.set_index("item_id").loc["10", "polarity"] == -1
    items = res.items.set_index("item_id")
    assert items.loc["10", "category"] == "Animation|Children's"
    assert items.loc["12", "title"] == "Café (1996)"
    assert "13" not in items.index and res.stats["unknown_item_rows_dropped"] == 1

    d = tmp_path / "ml1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::2::978300760\n1::11::5::978302109\n2::11::1::978301968\n")
    (d / "movies.dat").write_text("10::Heat (1995)::Action|Crime\n11::Toy Story (1995)::Animation\n", encoding="latin-1")
    res = read_input(dict(cfg, path=str(d / "ratings.dat")))
    assert res.stats["dislikes"] == 2 and res.stats["likes"] == 1
    assert res.items.set_index("item_id").loc["10", "category"] == "Action|Crime"


@pytest.mark.parametrize(
    "frame, kw, expect",
    [
        (dict(user_id=["a"], item=["x"], timestamp=[1700000001], label=[0]), {}, ["log.csv", "'item_id'", "item"]),
        (dict(user_id=["a", "b"], item_id=["x", "y"], timestamp=[1700000001, "yesterday-ish"], label=[0, 1]), {},
         ["log.csv", "'timestamp'", "row 2", "yesterday-ish"]),
        (dict(user_id=["a", "b", "c"], item_id=["x", "y", "z"], timestamp=[1700000001, 1700000002, 1700000003], label=[0, 1, 7]), {},
         ["'label'", "row 3", "7"]),
        (dict(user_id=["a", None], item_id=["x", "y"], timestamp=[1700000001, 1700000002], label=[0, 1]), {}, ["'user_id'", "row 2"]),
        (dict(user_id=["a", "b"], item_id=["x", "y"], timestamp=[1700000001, 1700000002], label=[1, 1]), {}, ["no negative"]),
        (dict(user_id=["a", "b"], item_id=["x", "y"], timestamp=[1700000001, 1700000002], rating=[1, "five"]),
         {"polarity": {"mode": "rating", "dislike_max": 2, "like_min": 4},
          "columns": {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"}},
         ["'rating'", "row 2", "five"]),
        (dict(user_id=["a", "b"], item_id=["x", "y"], timestamp=[1700000001, 1700000002], label=[0, 1], w=[1, -2]),
         {"columns": {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "label": "label", "weight": "w"}},
         ["'w'", "row 2"]),
    ],
)
def test_bad_input_names_file_column_row(tmp_path, frame, kw, expect):
    p = tmp_path / "log.csv"
    pd.DataFrame(frame).to_csv(p, index=False)
    with pytest.raises(DataPrepError) as err:
        read_input(generic_input(p, **kw))
    for text in expect:
        assert text in str(err.value)


def test_metadata_unknown_item_and_duplicates(tmp_path):
    p = tmp_path / "log.csv"
    pd.DataFrame(dict(user_id=["a", "b"], item_id=["x", "y"], timestamp=[1700000001, 1700000002], label=[0, 1])).to_csv(p, index=False)
    meta = tmp_path / "items.csv"
    pd.DataFrame({"item_id": ["x", "y", "ghost"], "name": ["X", "Y", "G"]}).to_csv(meta, index=False)
    items = {"path": str(meta), "unknown_ids": "error", "columns": {"item": "item_id", "title": "name"}}
    with pytest.raises(DataPrepError, match=r"items\.csv, column 'item_id', row 3: item id 'ghost'"):
        read_input(generic_input(p, items=items))
    res = read_input(generic_input(p, items=dict(items, unknown_ids="drop")))
    assert res.items["item_id"].tolist() == ["x", "y"]
    pd.DataFrame({"item_id": ["x", "x"], "name": ["X", "Y"]}).to_csv(meta, index=False)
    with pytest.raises(DataPrepError, match="row 2: duplicate item id 'x'"):
        read_input(generic_input(p, items=items))
    with pytest.raises(DataPrepError, match="column 'title_typo'"):
        read_input(generic_input(p, items=dict(items, columns={"item": "item_id", "title": "title_typo"})))


def test_missing_file():
    with pytest.raises(DataPrepError, match="file not found"):
        read_input(generic_input("/nonexistent/log.csv"))


def test_days_in_half_hour_timezone(tmp_path):
    from conrec_verl.data_prep.readers import days_from_ts

    # 18:29 and 18:31 UTC on Jan 1 are 23:59 on Jan 1 and 00:01 on Jan 2 in Asia/Kolkata (UTC+5:30)
    t = [ms(1, 0) + (18 * 60 + 29) * 60_000, ms(1, 0) + (18 * 60 + 31) * 60_000]
    assert days_from_ts(t, "Asia/Kolkata").tolist() == [20240101, 20240102]
    assert days_from_ts(t, "UTC").tolist() == [20240101, 20240101]


def test_bad_day_column_names_row(tmp_path):
    p = tmp_path / "log.csv"
    pd.DataFrame(dict(user_id=["a", "b", "c"], item_id=["x", "y", "z"], timestamp=[1700000001, 1700000002, 1700000003], label=[0, 1, 0],
                      date=[20240101, 20240101, 20241341])).to_csv(p, index=False)
    cols = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "label": "label", "day": "date"}
    with pytest.raises(DataPrepError, match=r"column 'date', row 3: day must be YYYYMMDD, got 20241341"):
        read_input(generic_input(p, columns=cols))


# -- nothing silently wrong: units, nested cells, ids, duplicates, encodings, truncated files -----

def _log(tmp_path, name="log.csv", **cols):
    base = dict(user_id=["a", "b", "c"], item_id=["x", "y", "z"], timestamp=[1700000001, 1700000002, 1700000003],
                label=[0, 1, 0])
    base.update(cols)
    p = tmp_path / name
    df = pd.DataFrame(base)
    df.to_parquet(p) if name.endswith(".parquet") else df.to_csv(p, index=False)
    return p


@pytest.mark.parametrize("stamps, unit, match", [
    ([1700000001, 1700000002000, 1700000003], "auto", r"row 1: timestamp 1700000001 read as milliseconds is "
                                                      r"1970-01-20.*mixes units"),
    ([1700000001000, 1700000002000, 1700000003000], "s", r"row 1: .*read as seconds is out of range|row 1: .*read as "
                                                          r"seconds is 5[0-9]{4}"),
    ([1700000001000000, 1700000002000000, 1700000003000000], "auto", r"row 1: .*read as milliseconds.*microseconds"),
])
def test_implausible_or_mixed_timestamp_units_are_errors(tmp_path, stamps, unit, match):
    p = _log(tmp_path, timestamp=stamps)
    with pytest.raises(DataPrepError, match=match):
        read_input(generic_input(p, timestamp_unit=unit))


def test_nested_cells_are_refused_not_stringified(tmp_path):
    p = _log(tmp_path, "log.parquet", item_id=[{"id": "1", "src": "a"}, {"id": "2", "src": "a"}, {"id": "3", "src": "b"}])
    with pytest.raises(DataPrepError, match=r"log.parquet, column 'item_id', row 1: expected one value per cell"):
        read_input(generic_input(p))


def test_ids_with_leading_zeros_stay_distinct(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp,label\nu1,03381812,1700000001,0\nu1,3381812,1700000002,1\n"
                 "u2,007,1700000003,0\n")
    df = read_input(generic_input(p)).interactions
    assert set(df["item_id"]) == {"03381812", "3381812", "007"}


def test_duplicate_events_are_counted_and_dropped_on_request(tmp_path):
    p = _log(tmp_path, user_id=["a", "a", "c"], item_id=["x", "x", "z"], timestamp=[1700000001, 1700000001, 1700000003],
             label=[0, 0, 1])
    kept = read_input(generic_input(p))
    assert kept.stats["duplicate_events"] == 1 and len(kept.interactions) == 3
    dropped = read_input(generic_input(p, duplicates="drop"))
    assert dropped.stats["duplicate_events"] == 1 and len(dropped.interactions) == 2
    with pytest.raises(DataPrepError, match="input.duplicates must be 'keep' or 'drop'"):
        read_input(generic_input(p, duplicates="dedupe"))


def test_wrong_encoding_names_the_row_and_the_option(tmp_path):
    p = tmp_path / "log.csv"
    p.write_bytes("user_id,item_id,timestamp,label\nu1,x,1700000001,0\nu2,caf\u00e9,1700000002,1\n".encode("latin-1"))
    with pytest.raises(DataPrepError, match=r"log.csv, row 2: not valid utf-8 text.*input.encoding=latin-1"):
        read_input(generic_input(p))
    assert set(read_input(generic_input(p, encoding="latin-1")).interactions["item_id"]) == {"x", "caf\u00e9"}


def test_a_truncated_gzip_is_one_clear_error(tmp_path):
    full = gzip.compress(("user_id,item_id,timestamp,label\n" + "".join(
        f"u{i},i{i},{1700000000 + i},{i % 2}\n" for i in range(5000))).encode())
    p = tmp_path / "log.csv.gz"
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataPrepError, match=r"log.csv.gz: the compressed file is truncated or corrupt"):
        read_input(generic_input(p))


# -- a log in several files (a folder or a glob of shards) -------------------------------------------

def write_shards(folder, log: pd.DataFrame, cuts=(0.3, 0.7)):
    """``log`` in three shards of mixed formats, one in a sub-folder, beside files a reader skips."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(log)
    a, b = int(cuts[0] * n), int(cuts[1] * n)
    log.iloc[:a].to_parquet(folder / "part-0.parquet", index=False)
    log.iloc[a:b].to_csv(folder / "part-1.csv", index=False)
    (folder / "day=2").mkdir(exist_ok=True)
    log.iloc[b:].to_parquet(folder / "day=2" / "part-2.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0.parquet.crc").write_text("not data")
    return folder


def sharded_log() -> pd.DataFrame:
    """Events with a neutral label, and identical events in different shards whose weights tell
    which copy a reader kept."""
    rows = [("u1", "a", ms(1), 0, 1.0), ("u1", "b", ms(2), 1, 1.0), ("u2", "a", ms(1), 2, 1.0),
            ("u2", "c", ms(3), 0, 1.0), ("u3", "a", ms(2), 1, 1.0), ("u1", "a", ms(1), 0, 7.0),
            ("u2", "c", ms(3), 0, 9.0), ("u3", "b", ms(4), 0, 1.0), ("u1", "c", ms(2), 1, 1.0),
            ("u3", "a", ms(2), 1, 3.0)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label", "w"])


SHARD_COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "label": "label", "weight": "w"}
SHARD_POLARITY = {"mode": "label", "negative_values": [0], "positive_values": [1], "other_labels": "drop"}


@pytest.mark.parametrize("duplicates", ["keep", "drop"])
def test_a_folder_or_glob_of_shards_reads_as_the_same_log_as_one_file(tmp_path, duplicates):
    from conrec_verl.data_prep.readers import input_files

    log = sharded_log()
    log.to_csv(tmp_path / "log.csv", index=False)
    folder = write_shards(tmp_path / "shards", log)
    kw = dict(columns=SHARD_COLUMNS, polarity=SHARD_POLARITY, duplicates=duplicates)
    one = read_input(generic_input(tmp_path / "log.csv", **kw))
    assert input_files(folder) == [str(folder / "day=2" / "part-2.parquet"), str(folder / "part-0.parquet"),
                                   str(folder / "part-1.csv")]
    for path in (folder, tmp_path / "shards" / "**" / "part-*"):
        many = read_input(generic_input(path, **kw))
        assert sorted(many.files) == sorted(input_files(folder))
        # file order differs from the single file's row order here, so compare as sets of events,
        # then check which copy of each identical event survived
        cols = ["user_id", "item_id", "ts", "polarity"]
        pd.testing.assert_frame_equal(many.interactions[cols].reset_index(drop=True),
                                      one.interactions[cols].reset_index(drop=True))
        assert many.stats["input_files"] == 3
        for key in ("raw_rows", "neutral_dropped", "duplicate_events", "events", "likes", "dislikes"):
            assert many.stats[key] == one.stats[key], key
    assert one.stats["neutral_dropped"] == 1 and one.stats["duplicate_events"] == 3
    if duplicates == "drop":
        # the first copy in file order stays: shard day=2/part-2 comes first, so (u3, a) keeps weight 3.0
        kept = read_input(generic_input(folder, **kw)).interactions
        w = kept.set_index(["user_id", "item_id"])["weight"]
        assert (w[("u1", "a")], w[("u2", "c")], w[("u3", "a")]) == (1.0, 1.0, 3.0)


def test_a_bad_row_in_one_shard_names_that_file_and_its_row(tmp_path):
    log = sharded_log()
    folder = write_shards(tmp_path / "shards", log)
    bad = pd.read_csv(folder / "part-1.csv").astype({"timestamp": object})
    bad.loc[2, "timestamp"] = "yesterday-ish"
    bad.to_csv(folder / "part-1.csv", index=False)
    with pytest.raises(DataPrepError) as err:
        read_input(generic_input(folder, columns=SHARD_COLUMNS, polarity=SHARD_POLARITY))
    assert err.value.file == str(folder / "part-1.csv") and err.value.row == 3 and err.value.column == "timestamp"


def test_folders_read_data_files_and_globs_skip_hidden_and_underscore_parts(tmp_path, monkeypatch):
    from conrec_verl.data_prep.readers import input_files

    root = tmp_path / "_exports" / "log"  # an underscore above the pattern does not count
    for rel in ("part-0.csv", "d=1/part-1.parquet", "_temporary/part-9.csv", ".hidden/part-8.csv", "_SUCCESS",
                "README.md", "schema.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    assert input_files(root) == [str(root / "d=1" / "part-1.parquet"), str(root / "part-0.csv")]
    assert input_files(root / "**" / "part-*") == [str(root / "d=1" / "part-1.parquet"), str(root / "part-0.csv")]
    monkeypatch.chdir(root)
    assert input_files("part-*.csv") == [str(root / "part-0.csv")]  # absolute, for Ray workers


def test_shard_sources_that_hold_no_log_are_one_error_each(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(DataPrepError, match="holds no data file"):
        read_input(generic_input(tmp_path / "empty"))
    with pytest.raises(DataPrepError, match="no file matches"):
        read_input(generic_input(tmp_path / "nothing-*.csv"))
    folder = tmp_path / "headers"
    folder.mkdir()
    for k in range(2):
        pd.DataFrame(columns=["user_id", "item_id", "timestamp", "label"]).to_csv(folder / f"p{k}.csv", index=False)
    with pytest.raises(DataPrepError, match="empty") as err:
        read_input(generic_input(folder))
    assert err.value.file == str(folder)
    # one empty shard among others is fine; a log without any dislike names the whole source
    pd.DataFrame({"user_id": ["u1"], "item_id": ["a"], "timestamp": [ms(1)], "label": [1]}).to_csv(folder / "p2.csv",
                                                                                                  index=False)
    with pytest.raises(DataPrepError, match="no negative") as err:
        read_input(generic_input(folder))
    assert err.value.file == str(folder)
