"""Embedding / SID options and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conrec_verl.core.sid import Codebook
from conrec_verl.data_prep import DataPrepError, build, load_config
from conrec_verl.data_prep.sids import build_sids, resolve_collisions, residual_kmeans, quantize
from dp_helpers import GENRES, generic_cfg, write_movielens

ROOT = Path(__file__).resolve().parents[2]
def ml_cfg(folder, out, *extra):
    return load_config("movielens", [f"input.path={folder}", f"out_dir={out}", "sid.sizes=[4,4,4]",
                                     "embedding.dim=8", "progress=false", "print_summary=false", *extra])


def test_movielens_build_with_titles_and_cold_content(tmp_path):
    write_movielens(tmp_path / "ml")
    out = build(ml_cfg(tmp_path / "ml", tmp_path / "out"))
    sm = pd.read_parquet(out / "sid_map.parquet")
    assert sm["sid"].is_unique
    cold = sm[sm.cold]
    assert len(cold) > 0 and (cold.source == "content").all()  # cold items placed from content
    assert (sm[~sm.cold].source == "collab").all()
    tr = pd.read_parquet(out / "sft/translation.parquet")
    assert len(tr) == 2 * len(sm)
    first = tr.iloc[0]["messages"]
    assert first[0]["content"].startswith("What is the title of the item <a_")
    assert "movie" in first[1]["content"]
    al = pd.read_parquet(out / "sft/alignment.parquet")
    assert len(al) > 0
    for _, r in al.iterrows():
        text, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        k = r["extra_info"]["answer_index"]
        assert f"{'ABCD'[k]}: {answer}" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["split"]["mode"] == "per_user" and m["input_stats"]["neutral_dropped"] > 0


def test_content_and_file_embeddings(tmp_path):
    write_movielens(tmp_path / "ml")
    out = build(ml_cfg(tmp_path / "ml", tmp_path / "content", "embedding.method=content"))
    sm = pd.read_parquet(out / "sid_map.parquet")
    assert (sm.source == "content").all() and sm.sid.is_unique
    ids = sm.item_id.to_numpy()
    vecs = np.random.default_rng(0).normal(size=(len(ids), 6)).astype(np.float32)
    pd.DataFrame({"item_id": ids, "embedding": list(vecs)}).to_parquet(tmp_path / "emb.parquet")
    out2 = build(ml_cfg(tmp_path / "ml", tmp_path / "file", "embedding.method=file",
                        f"embedding.file={tmp_path / 'emb.parquet'}"))
    sm2 = pd.read_parquet(out2 / "sid_map.parquet")
    assert (sm2.source == "file").all() and Codebook.load(out2 / "codebook.npz").dim == 6
    pd.DataFrame({"item_id": ids[:2], "embedding": [vecs[0], vecs[1][:3]]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataPrepError, match=r"bad\.parquet, column 'embedding', row 2"):
        build(ml_cfg(tmp_path / "ml", tmp_path / "bad", "embedding.method=file",
                     f"embedding.file={tmp_path / 'bad.parquet'}"))
    assert not (tmp_path / "bad").exists()


def test_rqvae_option_is_deterministic(tmp_path, synth_path):
    extra = ["sid.method=rqvae", "sid.rqvae.epochs=3", "sid.rqvae.latent_dim=6", "sid.rqvae.hidden_dim=16"]
    a = build(generic_cfg(synth_path, tmp_path / "a", *extra))
    b = build(generic_cfg(synth_path, tmp_path / "b", *extra))
    ba, bb = Codebook.load(a / "codebook.npz"), Codebook.load(b / "codebook.npz")
    assert ba.fingerprint == bb.fingerprint and ba.dim == 6 and ba.meta["space"] == "rqvae_latent"
    sm = pd.read_parquet(a / "sid_map.parquet")
    assert sm.sid.is_unique
    rep = json.loads((a / "sid_report.json").read_text())
    assert set(rep["rqvae_final_loss"]) == {"recon", "commitment", "codebook"}


def test_collision_repair_keeps_prefix_and_closest_item():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    x[10:20] = x[10]          # ten identical items
    x[15] += 1e-3             # ... one slightly off
    books = residual_kmeans(x, [4, 4, 32], seed=0)
    codes = quantize(x, books)
    fixed, stats = resolve_collisions(x, codes, books, np.array([f"i{i:03d}" for i in range(300)], dtype=object))
    keys = [tuple(c) for c in fixed]
    assert len(set(keys)) == 300
    assert stats["moved"] == 300 - len({tuple(c) for c in codes})
    # the first of the identical items (by id) keeps the original SID; the others keep the prefix
    assert tuple(fixed[10]) == tuple(codes[10])
    assert all(tuple(fixed[i][:2]) == tuple(codes[i][:2]) for i in range(10, 20))
    unchanged = [i for i in range(300) if sum(tuple(codes[j]) == tuple(codes[i]) for j in range(300)) == 1]
    assert all(tuple(fixed[i]) == tuple(codes[i]) for i in unchanged)


def test_build_sids_errors():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    ids = np.array([str(i) for i in range(50)], dtype=object)
    with pytest.raises(DataPrepError, match="too large"):
        build_sids(x, np.ones(50, bool), ids, {"sizes": [64, 2]}, 0)
    with pytest.raises(DataPrepError, match="must be rkmeans or rqvae"):
        build_sids(x, np.ones(50, bool), ids, {"sizes": [8, 8], "method": "pq"}, 0)


def test_cli_bundled_sample_writes_only_out_dir(tmp_path):
    """The one full run of the bundled KuaiRand sample, through the CLI, from an empty cwd."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "conrec_verl.data_prep", "out_dir=../kr", "progress=false"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(cwd) == []
    out = tmp_path / "kr"
    assert "users" in proc.stdout and "SIDs" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["users"] == 664 and m["counts"]["events"] == 41828
    assert m["split"]["eval_cutoff_day"] == 20220414 and m["split"]["warm_items"] == 5441
    test = m["samples"]["test"]
    # 466 users dislike something in the 7 days after 2022-04-14; ~97% of those dislikes are cold
    assert test["rows"] + m["samples"]["skipped"]["test"].get("empty_history", 0) == 466
    assert 0.95 < test["cold_share"] < 0.99
    assert m["sid"]["after"]["collision_rate"] == 0.0
    # a bad override: one clear error, exit code 2, nothing written
    proc = subprocess.run([sys.executable, "-m", "conrec_verl.data_prep", "out_dir=../bad", "sid.sizes=[9000,2]"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "codebook too large" in proc.stderr
    assert not (tmp_path / "bad").exists() and os.listdir(cwd) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "kr"]


def test_generic_config_names_missing_mandatory_keys(tmp_path, synth_path):
    with pytest.raises(DataPrepError, match=r"set input.path="):
        build(load_config("generic", [f"out_dir={tmp_path / 'o'}", "progress=false"]))
    with pytest.raises(DataPrepError, match="split.eval_cutoff_day"):
        build(load_config("generic", [f"out_dir={tmp_path / 'o'}", f"input.path={synth_path}", "progress=false"]))
    with pytest.raises(DataPrepError, match="out_dir is required"):
        build(load_config("generic", [f"input.path={synth_path}", "split.eval_cutoff_day=20240110"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_generic_with_item_metadata_builds_translation_and_content_sids(tmp_path, synth_path):
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(60)],
                          "name": [f"{GENRES[k % 5]} film number {k}" for k in range(60)],
                          "kind": [GENRES[k % 5] for k in range(60)], "year": [1990 + k % 9 for k in range(60)]})
    log = pd.read_csv(synth_path)
    items = items[items.item_id.isin(set(log.item_id))]
    items.to_csv(tmp_path / "items.csv", index=False)
    out = build(generic_cfg(synth_path, tmp_path / "o", f"input.items.path={tmp_path / 'items.csv'}",
                            "input.items.columns.title=name", "input.items.columns.category=kind",
                            "input.items.columns.numeric=[year]", "embedding.method=content"))
    sm = pd.read_parquet(out / "sid_map.parquet")
    assert (sm.source == "content").all() and sm.sid.is_unique and len(sm) == len(items)
    tr = pd.read_parquet(out / "sft/translation.parquet")
    assert len(tr) == 2 * len(items)
    assert set(tr["extra_info"].map(lambda e: e["task"])) == {"sid_to_title", "title_to_sid"}
