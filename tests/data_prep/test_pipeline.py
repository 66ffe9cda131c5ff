"""End-to-end properties of ``data_prep.build`` on small synthetic logs."""

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conrec_verl.core.sid import Codebook, format_sid, parse_sid
from conrec_verl.data_prep import DataPrepError, build
from conrec_verl.data_prep.samples import day_number
from dp_helpers import generic_cfg, ms, synth_log


def read(out, rel):
    return pd.read_parquet(out / rel)


def gt(row):
    return json.loads(row["reward_model"]["ground_truth"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("built")
    log = synth_log()
    log.to_csv(d / "log.csv", index=False)
    out = build(generic_cfg(d / "log.csv", d / "out"))
    return d, log, out


def test_layout_schema_and_manifest(built):
    d, log, out = built
    for rel in ["manifest.json", "codebook.npz", "sid_map.parquet", "swing.parquet", "sid_report.json",
                "sft/alignment.parquet", "sft/warmup.parquet", "rl/train.parquet", "rl/val.parquet",
                "eval/test.parquet"]:
        assert (out / rel).is_file(), rel
    assert not (out / "sft/translation.parquet").exists()  # no item text in this log
    m = json.loads((out / "manifest.json").read_text())
    book = Codebook.load(out / "codebook.npz")
    assert m["sid_build"] == book.fingerprint
    assert m["counts"]["events"] == len(log)
    assert m["inputs"]["log.csv"]["sha256"]
    train = read(out, "rl/train.parquet")
    assert len(train) == m["counts"]["rl/train"] > 0
    row = train.iloc[0]
    assert row["data_source"] == "conrec" and row["ability"] == "negative_recommendation"
    assert row["prompt"][0]["role"] == "user"
    assert row["extra_info"]["sid_build"] == book.fingerprint == gt(row)["sid_build"]
    assert set(train["extra_info"].map(lambda e: e["context"])) == {1, 2, 3}
    # stage-1 rows always have recent negatives, and the prompt is rendered for the row's stage
    for _, r in train.iterrows():
        stage = r["extra_info"]["context"]
        if stage == 1:
            assert len(r["hist_neg_recent"]) > 0 and "last 3 days" in r["prompt"][0]["content"]
        if stage == 3:
            assert "liked" in r["prompt"][0]["content"]
    # val users and train users are disjoint
    val = read(out, "rl/val.parquet")
    assert len(val) > 0
    assert not set(val["extra_info"].map(lambda e: e["user_id"])) & set(train["extra_info"].map(lambda e: e["user_id"]))


def test_sids_one_to_one_roundtrip_and_reproducible(built, tmp_path):
    d, log, out = built
    sm = read(out, "sid_map.parquet")
    book = Codebook.load(out / "codebook.npz")
    assert sm["sid"].is_unique and sm["item_id"].is_unique
    codes = sm[[f"code_{i}" for i in range(book.num_levels)]].to_numpy()
    for sid, c in zip(sm["sid"], codes):
        assert parse_sid(sid) == tuple(int(x) for x in c)
        assert format_sid(c) == sid
    # item -> SID -> codebook embedding: the sum of the chosen codewords
    recon = book.embed_many(codes)
    manual = sum(book.codewords[l][codes[:, l]] for l in range(book.num_levels))
    np.testing.assert_allclose(recon, manual, rtol=1e-6)
    np.testing.assert_allclose(book.embed(parse_sid(sm["sid"].iloc[3])), recon[3], rtol=1e-6)
    report = json.loads((out / "sid_report.json").read_text())
    assert report["after"]["collision_rate"] == 0.0 and report["after"]["max_items_per_sid"] == 1
    assert report["before"]["unique_sids"] <= len(sm)
    assert report["relative_reconstruction_error"]["before"] < 1.0
    # same config, same seed -> identical build; other seed -> other codebook
    again = build(generic_cfg(d / "log.csv", tmp_path / "again"))
    pd.testing.assert_frame_equal(read(again, "sid_map.parquet"), sm)
    assert Codebook.load(again / "codebook.npz").fingerprint == book.fingerprint
    pd.testing.assert_frame_equal(read(again, "rl/train.parquet").drop(columns=["prompt"]).astype(str),
                                  read(out, "rl/train.parquet").drop(columns=["prompt"]).astype(str))
    other = build(generic_cfg(d / "log.csv", tmp_path / "other", "seed=7"))
    assert Codebook.load(other / "codebook.npz").fingerprint != book.fingerprint


def test_no_future_event_reaches_history_embedding_sid_or_swing(built, tmp_path):
    """Rewrite every event after the evaluation cutoff (new items, flipped labels, other users'
    co-dislikes): codebook, SIDs of warm items, Swing and every history must not change."""
    d, log, out = built
    cut = ms(11, 0)  # 2024-01-11 00:00 UTC: days <= 20240110 are history
    rng = np.random.default_rng(1)
    fut = log["timestamp"] >= cut
    changed = log.copy()
    changed.loc[fut, "label"] = 1 - changed.loc[fut, "label"]
    changed.loc[fut, "item_id"] = [f"i{x}" if rng.random() < 0.5 else f"new{x}" for x in rng.integers(0, 60, fut.sum())]
    extra = pd.DataFrame({"user_id": ["u1", "u2", "u3"] * 4, "item_id": ["i0", "i1", "i2"] * 4,
                          "timestamp": [cut + 1000 * k for k in range(12)], "label": [0] * 12})
    changed = pd.concat([changed, extra], ignore_index=True)
    changed.to_csv(tmp_path / "changed.csv", index=False)
    out2 = build(generic_cfg(tmp_path / "changed.csv", tmp_path / "out2"))
    assert Codebook.load(out2 / "codebook.npz").fingerprint == Codebook.load(out / "codebook.npz").fingerprint
    a, b = read(out, "sid_map.parquet"), read(out2, "sid_map.parquet")
    pd.testing.assert_frame_equal(a[~a.cold].reset_index(drop=True), b[~b.cold].reset_index(drop=True))
    pd.testing.assert_frame_equal(read(out, "swing.parquet"), read(out2, "swing.parquet"))
    for rel in ("rl/train.parquet", "rl/val.parquet", "eval/test.parquet"):
        cols = ["hist_neg_recent", "hist_neg", "hist_pos"]
        key = lambda df: df.assign(u=df["extra_info"].map(lambda e: (e["user_id"], e["cutoff_day"]))).set_index("u")
        x, y = key(read(out, rel)), key(read(out2, rel))
        common = x.index.intersection(y.index)
        assert len(common) > 0
        for c in cols:
            assert x.loc[common, c].map(list).tolist() == y.loc[common, c].map(list).tolist()
        if rel != "eval/test.parquet":  # training windows end at the evaluation cutoff: targets identical too
            assert sorted(x.index) == sorted(y.index)
            assert x.loc[common, "reward_model"].tolist() == y.loc[common, "reward_model"].tolist()
    # and every history SID belongs to an item the user touched on/before the row's cutoff day
    sid_item = dict(zip(a["sid"], a["item_id"]))
    test = read(out, "eval/test.parquet")
    logd = log.assign(day=pd.to_datetime(log["timestamp"], unit="ms").dt.strftime("%Y%m%d").astype(int))
    for _, r in test.iterrows():
        u = r["extra_info"]["user_id"]
        past = logd[(logd.user_id == u) & (logd.day <= r["extra_info"]["cutoff_day"])]
        assert {sid_item[s] for s in r["hist_neg"]} <= set(past[past.label == 0].item_id)
        assert {sid_item[s] for s in r["hist_pos"]} <= set(past[past.label == 1].item_id)


def test_windows_exact_at_day_boundaries(tmp_path):
    """Eval cutoff 2024-01-10; window days 11..17 inclusive, day 10 is history, day 18 is out."""
    base = synth_log(n_users=30, n_days=10)  # days 1..10: gives every item a SID
    items = sorted(base["item_id"].unique())
    a, b, c, d_, e, f, g7 = items[:7]
    probe = pd.DataFrame([
        ("probe", a, ms(10, 23), 0),     # last second-ish of the cutoff day -> history
        ("probe", b, ms(11, 0) + 1, 0),  # first moment of day 11 -> future_neg
        ("probe", c, ms(17, 23), 0),     # last day of the window -> future_neg
        ("probe", d_, ms(18, 0) + 1, 0), # day 18 -> outside
        ("probe", e, ms(12), 1),         # like in the window -> future_pos
        ("probe", f, ms(18, 1), 1),      # like after the window -> not in FPS
        ("probe", a, ms(7), 0),          # day 7: older than the 3-day recent list (days 8, 9, 10)
        ("probe", g7, ms(8, 0) + 1, 0),  # day 8: first day of the recent list
        ("probe", b, ms(5), 1),
    ], columns=base.columns)
    log = pd.concat([base, probe], ignore_index=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    out = build(generic_cfg(tmp_path / "log.csv", tmp_path / "out", "samples.val_user_fraction=0"))
    sid = dict(zip(*read(out, "sid_map.parquet")[["item_id", "sid"]].T.to_numpy()))
    test = read(out, "eval/test.parquet")
    row = test[test["extra_info"].map(lambda x: x["user_id"]) == "probe"].iloc[0]
    g = gt(row)
    assert row["extra_info"]["cutoff_day"] == 20240110 and row["extra_info"]["window_days"] == 7
    assert g["future_neg"] == [sid[b], sid[c]]
    assert g["next_neg"] == sid[b]
    assert g["future_pos"] == [sid[e]]
    assert list(row["hist_neg"]) == [sid[a], sid[g7], sid[a]]   # days 7, 8, 10, oldest first
    assert list(row["hist_neg_recent"]) == [sid[g7], sid[a]]    # days 8..10
    assert list(row["hist_pos"]) == [sid[b]]
    assert g["n_future_neg_cold"] == 0 and g["n_future_neg"] == 2
    # candidates: 20 distinct SIDs, the target is the first future dislike, no other future dislike
    cands = list(row["candidates"])
    assert len(cands) == 20 == len(set(cands))
    assert cands[row["candidate_target"]] == sid[b]
    assert sid[c] not in cands
    # training rows: windows truncated at the evaluation cutoff
    train = pd.concat([read(out, "rl/train.parquet"), read(out, "rl/val.parquet")])
    for _, r in train.iterrows():
        ei = r["extra_info"]
        assert ei["cutoff_day"] < 20240110
        assert ei["window_days"] == min(7, int(day_number(20240110)[0] - day_number(ei["cutoff_day"])[0]))


def test_cold_items_counted_and_swing_in_gts(tmp_path):
    base = synth_log(n_users=30, n_days=10)
    extra = pd.DataFrame([("u0", "brand_new", ms(12), 0), ("u0", "i0", ms(13), 0)], columns=base.columns)
    log = pd.concat([base, extra], ignore_index=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    out = build(generic_cfg(tmp_path / "log.csv", tmp_path / "out", "swing.min_co_dislikers=2",
                            "swing.gts_neighbors=2"))
    sm = read(out, "sid_map.parquet")
    assert "brand_new" not in set(sm.item_id)  # cold, no content -> no SID
    test = read(out, "eval/test.parquet")
    r = test[test["extra_info"].map(lambda x: x["user_id"]) == "u0"].iloc[0]
    g = gt(r)
    assert g["n_future_neg_cold"] >= 1
    assert g["next_neg"] is None or g["next_neg"] != ""
    sw = read(out, "swing.parquet")
    nb = sw[sw.item_id.isin([sm.set_index("sid").item_id[s] for s in g["future_neg"]])]
    if len(nb):  # every admitted Swing item is a top neighbour of a future dislike, not a future dislike
        sid_of = dict(zip(sm.item_id, sm.sid))
        allowed = {sid_of[i] for i in nb.groupby("item_id").head(2).neighbor_id}
        assert set(g["swing"]) <= allowed and not set(g["swing"]) & set(g["future_neg"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["samples"]["test"]["future_neg_cold"] >= 1
    assert m["split"]["cold_items"] >= 1


def test_per_user_split(tmp_path):
    rows = []
    for u in range(12):
        for k in range(10):  # 10 events per user, one per day, days 1..10 (+u offset)
            rows.append((f"u{u}", f"i{(u + k) % 15}", ms(1 + k + u % 3), 0 if k % 3 == 0 else 1))
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"])
    log.to_csv(tmp_path / "log.csv", index=False)
    out = build(generic_cfg(tmp_path / "log.csv", tmp_path / "out", "split.mode=per_user", "sid.sizes=[4,4]",
                            "split.train_fractions=[0.4]", "samples.val_user_fraction=0"))
    test = read(out, "eval/test.parquet")
    sm = read(out, "sid_map.parquet")
    item_of = dict(zip(sm.sid, sm.item_id))
    assert len(test) > 0
    for _, r in test.iterrows():
        u = r["extra_info"]["user_id"]
        ev = log[log.user_id == u].sort_values("timestamp")
        hist = ev.iloc[:7]  # ceil(0.7 * 10) events form the history
        assert [item_of[s] for s in r["hist_neg"]] == hist[hist.label == 0].item_id.tolist()
        fut = ev.iloc[7:]
        fut = fut[fut.timestamp <= hist.timestamp.iloc[-1] + 7 * 86_400_000]
        assert [item_of[s] for s in gt(r)["future_neg"]] == list(dict.fromkeys(fut[fut.label == 0].item_id))


def test_bad_configs_leave_nothing(tmp_path, synth_path):
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match="codebook too large"):
        build(generic_cfg(synth_path, out, "sid.sizes=[512,4]"))
    with pytest.raises(DataPrepError, match="codebook too small"):
        build(generic_cfg(synth_path, out, "sid.sizes=[2,2]"))
    with pytest.raises(DataPrepError, match="eval_cutoff_day"):
        build(generic_cfg(synth_path, out, "split.eval_cutoff_day=20300101"))
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]
    # an existing out_dir is kept unless overwrite=true
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(DataPrepError, match="already exists"):
        build(generic_cfg(synth_path, out))
    assert (out / "keep").exists()
    build(generic_cfg(synth_path, out, "overwrite=true"))
    assert not (out / "keep").exists() and (out / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["log.csv", "out"]


def test_sft_sets_exclude_validation_users(built):
    d, log, out = built
    val_users = set(read(out, "rl/val.parquet")["extra_info"].map(lambda e: e["user_id"]))
    assert val_users
    for rel in ("sft/alignment.parquet", "sft/warmup.parquet"):
        users = set(read(out, rel)["extra_info"].map(lambda e: e["user_id"]))
        assert users and not users & val_users, rel


def _warmup_log(log, out):
    """The built folder's SID map and the log's events warm-up SFT may use: items with a SID,
    training users, days up to the evaluation cutoff."""
    sm = read(out, "sid_map.parquet")
    sid_of = dict(zip(sm.item_id, sm.sid))
    val_users = set(read(out, "rl/val.parquet")["extra_info"].map(lambda e: e["user_id"]))
    log = log.assign(day=pd.to_datetime(log.timestamp, unit="ms").dt.strftime("%Y%m%d").astype(int))
    return sid_of, log[(log.day <= 20240110) & log.item_id.isin(sid_of) & ~log.user_id.isin(val_users)]


def _walk(log, label: int):
    """(user, event, the user's events strictly before it) for every event of ``label``, users in
    sorted order, each user's events in time order: the brute-force walk of the warm-up oracles."""
    for user, ev in log.groupby("user_id", sort=True):
        ev = ev.sort_values("timestamp", kind="stable")
        for _, e in ev[ev.label == label].iterrows():
            yield user, e, ev[ev.timestamp < e.timestamp]


def test_warmup_every_dislike_matches_a_brute_force_walk_of_the_log(built):
    from conrec_verl.core import prompts

    d, log, out = built
    sid_of, log = _warmup_log(log, out)
    expected = []
    for user, e, before in _walk(log, label=0):
        negs = [sid_of[i] for i in before[before.label == 0].item_id]
        if negs:
            expected.append((user, sid_of[e.item_id], negs[-96:]))
    warm = read(out, "sft/warmup.parquet")
    got = []
    for msgs, info in zip(warm["messages"], warm["extra_info"]):
        text, answer = msgs[0]["content"], msgs[1]["content"]
        ctx = info["context"]
        assert (prompts.NEG_RECENT_HEADER in text) == (ctx == 1) and (prompts.POS_HEADER in text) == (ctx == 3)
        neg_line = [line for line in text.split("\n") if line.startswith(prompts.NEG_RECENT_HEADER if ctx == 1
                                                                            else prompts.NEG_ALL_HEADER)][0]
        assert not neg_line.endswith(prompts.EMPTY)  # no prompt with an empty negative context
        got.append((info["user_id"], answer, neg_line.split(":", 1)[1].split(), ctx))
    assert sorted((u, a) for u, a, _ in expected) == sorted((u, a) for u, a, _, _ in got)
    by_key = {}
    for u, a, negs in expected:
        by_key.setdefault((u, a), []).append(negs)
    for u, a, shown, ctx in got:
        if ctx != 1:  # the full negative history before the dislike (newest 96 at most)
            assert shown in by_key[(u, a)]
        else:         # recent negatives: a suffix of it
            assert any(n[len(n) - len(shown):] == shown for n in by_key[(u, a)])
    assert {c for *_, c in got} == {1, 2, 3}


def test_warmup_window_targets_are_dislikes_of_the_window_from_each_anchor(built, tmp_path):
    """``sft.warmup.targets=window``: the same rows and prompts as the next-dislike rows, each
    target a dislike of the same user within window_days of the anchor (the anchor's day counts),
    never an item of the prompt's history and never after the evaluation cutoff (the anchor's
    own target where every such dislike repeats a history item); draws seeded."""
    d, log, out = built
    sid_of, log = _warmup_log(log, out)
    log = log.assign(dn=day_number(log.day.to_numpy()))
    anchors = {}  # user -> [(next SID, SIDs allowed by the window)] in time order
    for user, ev in log.groupby("user_id", sort=True):
        ev = ev.sort_values("timestamp", kind="stable")
        for _, e in ev[ev.label == 0].iterrows():
            before = ev[ev.timestamp < e.timestamp]
            if not (before.label == 0).any():
                continue
            seen = {sid_of[i] for i in before.item_id}
            win = ev[(ev.timestamp >= e.timestamp) & (ev.dn < e.dn + 7) & (ev.label == 0)]
            pool = {sid_of[i] for i in win.item_id} - seen
            anchors.setdefault(str(user), []).append((sid_of[e.item_id], pool))

    def by_user(folder):
        w = read(folder, "sft/warmup.parquet")
        rows = {}
        for msgs, info in zip(w["messages"], w["extra_info"]):
            rows.setdefault(info["user_id"], []).append((msgs[0]["content"], msgs[1]["content"]))
        return rows

    nxt = by_user(out)
    win_out = build(generic_cfg(d / "log.csv", tmp_path / "win", "sft.warmup.targets=window"))
    win = by_user(win_out)
    assert sorted(win) == sorted(nxt) == sorted(anchors)
    changed = 0
    for user, rows in win.items():
        assert len(rows) == len(nxt[user]) == len(anchors[user])
        for (prompt, target), (prompt0, target0), (next_sid, pool) in zip(rows, nxt[user], anchors[user]):
            assert prompt == prompt0 and target0 == next_sid
            if pool:
                assert target in pool and target not in prompt, (user, target, pool)
            else:  # every dislike of the window repeats a history item: the anchor's own target
                assert target == target0
            changed += target != target0
    assert changed > 0
    again = build(generic_cfg(d / "log.csv", tmp_path / "win2", "sft.warmup.targets=window"))
    assert read(again, "sft/warmup.parquet").equals(read(win_out, "sft/warmup.parquet"))
    with pytest.raises(DataPrepError, match="sft.warmup.targets must be next or window"):
        build(generic_cfg(d / "log.csv", tmp_path / "bad", "sft.warmup.targets=future"))
    with pytest.raises(DataPrepError, match="needs sft.warmup.rows=every_dislike"):
        build(generic_cfg(d / "log.csv", tmp_path / "bad", "sft.warmup.targets=window", "sft.warmup.rows=cutoffs"))
    assert not (tmp_path / "bad").exists()


def test_warmup_like_rows_ask_the_likes_and_leave_the_dislike_rows_as_they_were(built, tmp_path):
    """``sft.warmup.likes=s``: the dislike rows are exactly those of ``s = 0``; the like rows are the
    training users' likes whose history before them holds a dislike (every one at ``s = 1``, a seeded
    subset at ``s = 0.5``), each asking the like question with the liked item as its answer;
    the validation set stays dislikes only; bad shares are refused before anything is written."""
    from conrec_verl.core import prompts

    d, log, out = built
    sid_of, log = _warmup_log(log, out)
    expected = [(str(user), sid_of[e.item_id]) for user, e, before in _walk(log, label=1)
                if (before.label == 0).any()]

    def parts(folder):
        w = read(folder, "sft/warmup.parquet")
        rows = {"warmup": [], "warmup_like": []}
        for msgs, info in zip(w["messages"], w["extra_info"]):
            rows[info["task"]].append((info["user_id"], msgs[0]["content"], msgs[1]["content"], info["context"]))
        return rows

    base = parts(out)
    assert base["warmup_like"] == []
    every = build(generic_cfg(d / "log.csv", tmp_path / "all", "sft.warmup.likes=1.0"))
    half = build(generic_cfg(d / "log.csv", tmp_path / "half", "sft.warmup.likes=0.5"))
    got_all, got_half = parts(every), parts(half)
    assert got_all["warmup"] == got_half["warmup"] == base["warmup"]
    assert sorted((u, a) for u, _, a, _ in got_all["warmup_like"]) == sorted(expected)
    for _, text, answer, ctx in got_all["warmup_like"]:
        assert text.endswith(prompts.LIKE_INSTRUCTION) and prompts.INSTRUCTION not in text
        assert (prompts.POS_HEADER in text) == (ctx == 3)
        assert not text.split("\n")[0].endswith(prompts.EMPTY)  # a dislike is shown, as in the dislike rows
    assert {c for *_, c in got_all["warmup_like"]} == {1, 2, 3}
    half_rows = set(map(tuple, got_half["warmup_like"]))
    assert half_rows < set(map(tuple, got_all["warmup_like"]))
    assert 0.3 < len(half_rows) / len(got_all["warmup_like"]) < 0.7
    for folder in (every, half):  # the epoch chosen answers the dislike question: no like rows there
        assert read(folder, "sft/warmup_val.parquet").equals(read(out, "sft/warmup_val.parquet"))
    again = build(generic_cfg(d / "log.csv", tmp_path / "half2", "sft.warmup.likes=0.5"))
    assert read(again, "sft/warmup.parquet").equals(read(half, "sft/warmup.parquet"))
    # window targets change the dislike rows' answers only: a like row still answers its like
    win = parts(build(generic_cfg(d / "log.csv", tmp_path / "win", "sft.warmup.likes=1.0",
                                  "sft.warmup.targets=window")))
    assert win["warmup_like"] == got_all["warmup_like"] and win["warmup"] != got_all["warmup"]
    for bad, msg in (("1.5", "must be in \\[0, 1\\]"), ("many", "must be a number"), ("true", "must be a number")):
        with pytest.raises(DataPrepError, match=f"sft.warmup.likes {msg}"):
            build(generic_cfg(d / "log.csv", tmp_path / "bad", f"sft.warmup.likes={bad}"))
    with pytest.raises(DataPrepError, match="sft.warmup.likes needs sft.warmup.rows=every_dislike"):
        build(generic_cfg(d / "log.csv", tmp_path / "bad", "sft.warmup.likes=0.5", "sft.warmup.rows=cutoffs"))
    assert not (tmp_path / "bad").exists()


def test_warmup_rows_cutoffs_mode_answers_the_next_future_dislike(tmp_path, synth_path):
    out = build(generic_cfg(synth_path, tmp_path / "o", "sft.warmup.rows=cutoffs"))
    warm = read(out, "sft/warmup.parquet")
    train = read(out, "rl/train.parquet")
    assert len(warm) == len(train)
    nxt = train["reward_model"].map(lambda r: json.loads(r["ground_truth"]))
    expected = [g["next_neg"] or g["future_neg"][0] for g in nxt]
    key = lambda df: list(zip(df["extra_info"].map(lambda e: e["user_id"]), df["extra_info"].map(lambda e: e["cutoff_day"])))
    got = dict(zip(key(warm), warm["messages"].map(lambda m: m[1]["content"])))
    assert [got[k] for k in key(train)] == expected
    with pytest.raises(DataPrepError, match=r"unknown config key sft.warmup.rowz; did you mean sft.warmup.rows"):
        build(generic_cfg(synth_path, tmp_path / "x", "+sft.warmup.rowz=1"))


def test_rl_and_eval_files_load_in_verl_rlhf_dataset(built, tmp_path):
    """verl's own RLHFDataset (0.9.1) reads the RL/eval parquet and yields the chat prompt."""
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    d, log, out = built
    for rel in ("rl/train.parquet", "eval/test.parquet"):
        ds = RLHFDataset(data_files=[str(out / rel)], tokenizer=None,
                         config=OmegaConf.create({"filter_overlong_prompts": False, "cache_dir": str(tmp_path)}))
        assert len(ds) == len(read(out, rel))
        item = ds[0]
        assert item["raw_prompt"][0]["role"] == "user"
        assert "Predict one item" in item["raw_prompt"][0]["content"]
        assert json.loads(item["reward_model"]["ground_truth"])["sid_build"] == item["extra_info"]["sid_build"]


def test_training_rows_get_the_full_window_and_never_reach_the_test_window(tmp_path):
    log = synth_log(seed=3, n_users=30, n_days=24)
    log.to_csv(tmp_path / "log.csv", index=False)
    # global_day: eval cutoff 2024-01-18, window 7 -> training cutoffs on or before 2024-01-11
    out = build(generic_cfg(tmp_path / "log.csv", tmp_path / "g", "split.eval_cutoff_day=20240118"))
    m = json.load(open(out / "manifest.json"))
    assert m["split"]["train_cutoff_days"] == [20240109, 20240110, 20240111] and m["split"]["train_windows"] == "full"
    for name in ("rl/train.parquet", "rl/val.parquet"):
        rows = read(out, name)
        assert len(rows) and (rows["extra_info"].map(lambda e: e["window_days"]) == 7).all()
    assert m["samples"]["train"]["window_days"] == {"min": 7, "mean": 7.0, "max": 7}
    # the same log with truncated windows: cutoffs run up to the day before the eval cutoff
    out_t = build(generic_cfg(tmp_path / "log.csv", tmp_path / "t", "split.eval_cutoff_day=20240118",
                              "split.train_windows=truncated"))
    mt = json.load(open(out_t / "manifest.json"))
    assert mt["split"]["train_cutoff_days"] == [20240115, 20240116, 20240117]
    assert mt["samples"]["train"]["window_days"]["min"] < 7
    with pytest.raises(DataPrepError, match="no training cutoff fits"):
        build(generic_cfg(tmp_path / "log.csv", tmp_path / "x", "split.eval_cutoff_day=20240106",
                          "split.min_history_days=3"))
    assert not (tmp_path / "x").exists()


def test_per_user_training_cutoffs_move_back_to_a_full_window(tmp_path):
    rows = []
    for u in range(10):
        for k in range(20):  # one event a day for 20 days: eval cutoff at day 14, full windows end by day 7
            rows.append((f"u{u}", f"i{(u + k) % 15}", ms(1 + k), 0 if k % 3 == 0 else 1))
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"])
    log.to_csv(tmp_path / "log.csv", index=False)
    out = build(generic_cfg(tmp_path / "log.csv", tmp_path / "out", "split.mode=per_user", "sid.sizes=[4,4]",
                            "split.train_fractions=[0.3,0.55]", "samples.val_user_fraction=0"))
    m = json.load(open(out / "manifest.json"))
    train = read(out, "rl/train.parquet")
    days = sorted({r["cutoff_day"] for r in train["extra_info"]})
    # 0.3 -> day 6 (kept); 0.55 -> day 11 would overlap the eval window: moved back to day 7
    assert days == [20240106, 20240107] and m["split"]["train_cutoffs_moved_back"] == 10
    assert (train["extra_info"].map(lambda e: e["window_days"]) == 7).all()


def test_extra_level_keeps_every_quantised_sid_and_its_embedding(tmp_path, synth_path):
    out_r = build(generic_cfg(synth_path, tmp_path / "r", "sid.sizes=[4,4,4]"))
    out_x = build(generic_cfg(synth_path, tmp_path / "x", "sid.sizes=[4,4,4]", "sid.collisions=extra_level"))
    rep_r = json.load(open(out_r / "sid_report.json"))
    rep_x = json.load(open(out_x / "sid_report.json"))
    book_r, book_x = Codebook.load(out_r / "codebook.npz"), Codebook.load(out_x / "codebook.npz")
    sm_x = read(out_x, "sid_map.parquet")
    # 64 SIDs for 56 items: quantisation collides, the repair moves items; the extra level never does
    assert rep_r["repair"]["moved"] > 0 and rep_x["repair"]["moved"] == 0
    assert book_x.num_levels == 4 and book_x.sizes[:3] == (4, 4, 4)
    assert book_x.sizes[3] == rep_x["repair"]["dedup_level_size"] == max(
        sm_x.groupby(["code_0", "code_1", "code_2"]).size())
    assert sm_x["sid"].is_unique and rep_x["after"]["collision_rate"] == 0.0
    assert np.allclose(book_x.codewords[3], 0.0)
    # same codewords for the first three levels; every item keeps its quantised (pre-repair) SID
    for lv in range(3):
        assert np.allclose(book_x.codewords[lv], book_r.codewords[lv])
    assert rep_x["relative_reconstruction_error"]["after"] == rep_x["relative_reconstruction_error"]["before"]
    assert rep_r["relative_reconstruction_error"]["after"] > rep_r["relative_reconstruction_error"]["before"]
    codes = sm_x[[f"code_{lv}" for lv in range(4)]].to_numpy()
    assert np.allclose(book_x.embed_many(codes), book_r.embed_many(codes[:, :3]))
    with pytest.raises(DataPrepError, match="sid.collisions"):
        build(generic_cfg(synth_path, tmp_path / "bad", "sid.collisions=merge"))


@pytest.mark.parametrize("override, match", [
    ("+swing.min_co_dislikerz=3", r"unknown config key swing.min_co_dislikerz; did you mean swing.min_co_dislikers"),
    ("+foo=1", r"unknown config key foo; known keys here: \['embedding'"),
    ("+input.columns.usr=u", r"unknown config key input.columns.usr; did you mean input.columns.user"),
])
def test_unknown_config_keys_are_errors_even_with_plus(synth_path, tmp_path, override, match):
    """Hydra accepts any key added with '+': data_prep refuses keys no shipped config has, before
    reading anything, so a typo is never silently ignored."""
    out = tmp_path / "x"
    with pytest.raises(DataPrepError, match=match):
        build(generic_cfg(synth_path, out, override))
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_the_rl_keys_old_names_still_work_and_a_conflict_is_one_error(synth_path, tmp_path):
    """rl.val_stage / eval_stage / stages / stage_assignment were renamed to *context*; the old
    names give the same folder as the new ones, and an old and a new name that disagree are refused."""
    read = lambda out, f: pq.read_table(out / f).to_pylist()  # noqa: E731
    new = build(generic_cfg(synth_path, tmp_path / "new", "rl.val_context=3", "rl.eval_context=2",
                            "rl.contexts=[2,3]", "rl.context_assignment=replicate"))
    old = build(generic_cfg(synth_path, tmp_path / "old", "rl.val_stage=3", "rl.eval_stage=2",
                            "rl.stages=[2,3]", "rl.stage_assignment=replicate"))
    for f in ("rl/train.parquet", "rl/val.parquet", "eval/test.parquet"):
        assert read(new, f) == read(old, f), f
    assert {r["extra_info"]["context"] for r in read(new, "rl/val.parquet")} == {3}
    assert {r["extra_info"]["context"] for r in read(new, "rl/train.parquet")} == {2, 3}
    with pytest.raises(DataPrepError, match=r"rl.val_context=1 and its old name rl.val_stage=3 disagree"):
        build(generic_cfg(synth_path, tmp_path / "both", "rl.val_context=1", "rl.val_stage=3"))
    assert not (tmp_path / "both").exists()


def test_eval_cutoff_auto_holds_out_the_last_window_and_the_summary_reports_the_days(synth_path, tmp_path, capsys):
    import json

    out = build(generic_cfg(synth_path, tmp_path / "auto", "split.eval_cutoff_day=auto", "print_summary=true"))
    split = json.loads((out / "manifest.json").read_text())["split"]
    first, last = split["log_days"]
    last_day = pd.Timestamp(str(last))
    assert split["eval_cutoff_from"] == "auto"
    assert pd.Timestamp(str(split["eval_cutoff_day"])) == last_day - pd.Timedelta(days=split["window_days"])
    summary = capsys.readouterr().out
    assert f"log days {first}..{last}, evaluation cutoff {split['eval_cutoff_day']} (auto)" in summary
    with pytest.raises(DataPrepError, match=rf"the log covers {first}..{last}, and auto would take"):
        build(generic_cfg(synth_path, tmp_path / "none", "split.eval_cutoff_day=null"))


def test_a_killed_build_leaves_nothing_behind_and_its_leftovers_are_swept(synth_path, tmp_path):
    """SIGTERM removes the temporary folder; a folder left by a SIGKILLed build (its pid dead) is
    removed by the next build, one of a build still running is not."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conrec_verl.data_prep.pipeline import OWNER_FILE

    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "conrec_verl.data_prep", "--config-name", "generic", f"input.path={synth_path}", f"out_dir={out}",
           "split.eval_cutoff_day=20240110", "sid.sizes=[4,4,8]", "embedding.dim=8", "progress=false",
           "split.num_train_cutoffs=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".d.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not list(tmp_path.glob(".d.tmp-*")) and (proc.returncode != 0) == (not out.exists())
    stale = tmp_path / ".d.tmp-stale"
    stale.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stale / OWNER_FILE).write_text(str(dead.pid))
    running = tmp_path / ".d.tmp-running"
    running.mkdir()
    (running / OWNER_FILE).write_text(str(os.getpid()))
    build(generic_cfg(synth_path, out, "overwrite=true"))
    assert not stale.exists() and running.exists() and not (out / OWNER_FILE).exists()


def test_a_single_user_log_is_one_error_that_says_why(tmp_path):
    log = tmp_path / "one_user.csv"
    pd.DataFrame({"user_id": ["u1"] * 60, "item_id": [f"i{k % 25}" for k in range(60)],
                  "timestamp": [1700000000 + 86400 * (k // 2) for k in range(60)],
                  "label": [k % 2 for k in range(60)]}).to_csv(log, index=False)
    with pytest.raises(DataPrepError, match=r"hold 25 item\(s\) and 1 user\(s\).*need at least 2 of each.*input.path"):
        build(generic_cfg(log, tmp_path / "out", "split.eval_cutoff_day=auto"))
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_one_error_line(synth_path, tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "conrec_verl.data_prep", "--config-name", "generic", f"input.path={synth_path}",
                           f"out_dir={blocker / 'data'}", "split.eval_cutoff_day=20240110", "progress=false"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("data_prep: error: cannot write or read") and proc.stderr.count("\n") == 1, proc.stderr


def test_require_negative_history_skips_rows_without_a_dislike_before_the_cutoff(tmp_path):
    """Off (default): evaluation and validation keep users with likes but no dislike before the
    cutoff (their prompt says so), training never trains them. On: no split has such a row, and
    the skipped rows are counted under their reason."""
    log = synth_log()  # every synthetic user dislikes early; add users who only like until the eval cutoff
    extra = [(f"w{u}", f"i{(u + k) % 20}", ms(day), 1) for u in range(4) for k, day in enumerate(range(2, 10))]
    extra += [(f"w{u}", f"i{(u + k) % 20 + 1}", ms(day, 15), 0) for u in range(4) for k, day in enumerate((11, 12))]
    log = pd.concat([log, pd.DataFrame(extra, columns=log.columns)], ignore_index=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    out = build(generic_cfg(tmp_path / "log.csv", tmp_path / "off"))
    n_neg = {name: read(out, name)["extra_info"].map(lambda e: e["n_hist_neg"])
             for name in ("rl/train.parquet", "rl/val.parquet", "eval/test.parquet")}
    assert (n_neg["rl/train.parquet"] > 0).all()
    without = {name: int((v == 0).sum()) for name, v in n_neg.items()}
    assert without["eval/test.parquet"] > 0  # the synthetic log has such users: the check below can fail
    on = build(generic_cfg(tmp_path / "log.csv", tmp_path / "on", "samples.require_negative_history=true"))
    m = json.loads((on / "manifest.json").read_text())
    for name, before in n_neg.items():
        after = read(on, name)["extra_info"].map(lambda e: e["n_hist_neg"])
        assert (after > 0).all() and len(after) == len(before) - without[name], name
    assert m["samples"]["skipped"]["test"]["no_negative_history"] == without["eval/test.parquet"]
