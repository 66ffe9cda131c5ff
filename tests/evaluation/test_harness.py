import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conrec_verl.baselines import PopularityBaseline, RandomBaseline, SASRecBaseline, SwingBaseline
from conrec_verl.baselines.base import training_sequences
from conrec_verl.core.sid import format_sid
from conrec_verl.evaluation.cli import main as eval_main
from conrec_verl.core.eval_data import EvalInputError, load_eval_data
from conrec_verl.evaluation.filter_cli import main as filter_main
from conrec_verl.evaluation.harness import deployment_sweep, run_evaluation
from conrec_verl.evaluation.predictions import PredictionSet, read_predictions, write_predictions

from tests.evaluation.fixtures import make_data_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_data_folder(tmp_path_factory.mktemp("d") / "data")


@pytest.fixture(scope="module")
def data(folder):
    return load_eval_data(folder)


def oracle(data, k=20):
    """future dislikes first, then filler items: the best possible top-K."""
    out = []
    for r in data.rows:
        first = list(r.target.future_neg)
        out.append(first + [s for s in data.catalogue if s not in first][: k - len(first)])
    return out


def test_load_fixture(data):
    assert len(data.rows) == 12 and len(data.sid_items) == 40
    assert data.sid_build == data.codebook.fingerprint
    assert all(len(r.target.candidates) == 20 for r in data.rows if r.target.candidates)


def _rewrite_eval(folder, tmp_path, mutate):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    rows = pq.read_table(dst / "eval" / "test.parquet").to_pylist()
    mutate(rows)
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows), dst / "eval" / "test.parquet")
    return dst


def test_bad_ground_truth_names_file_column_row(folder, tmp_path):
    def mutate(rows):
        rows[3]["reward_model"]["ground_truth"] = "{not json"
    d = _rewrite_eval(folder, tmp_path, mutate)
    with pytest.raises(EvalInputError, match=r"test.parquet: row 3: column 'reward_model.ground_truth'"):
        load_eval_data(d)


def test_sid_outside_map_and_other_build(folder, tmp_path):
    def mutate(rows):
        gt = json.loads(rows[1]["reward_model"]["ground_truth"])
        gt["future_neg"] = ["<a_99><b_0><c_0>"]
        rows[1]["reward_model"]["ground_truth"] = json.dumps(gt)
    d = _rewrite_eval(folder, tmp_path, mutate)
    with pytest.raises(EvalInputError, match="row 1: column 'future_neg'.*not in sid_map"):
        load_eval_data(d)
    (d / "manifest.json").write_text(json.dumps({"sid_build": "deadbeef"}))
    with pytest.raises(EvalInputError, match="two SID builds"):
        load_eval_data(d)


def _write_lines(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_predictions_round_trip_and_errors(data, tmp_path):
    preds = oracle(data)
    p = write_predictions(tmp_path / "p.jsonl", data, preds)
    ps = read_predictions(p, data, 20)
    assert ps.sids == [list(x) for x in preds] and ps.n_invalid_strings == 0
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    bad = [dict(x, sid_build="other") for x in lines]
    with pytest.raises(EvalInputError, match="another SID build"):
        read_predictions(_write_lines(tmp_path / "b.jsonl", bad), data, 20)
    with pytest.raises(EvalInputError, match="users missing"):
        read_predictions(_write_lines(tmp_path / "m.jsonl", lines[:-2]), data, 20)
    with pytest.raises(EvalInputError, match="not a row of"):
        read_predictions(_write_lines(tmp_path / "u.jsonl", lines + [dict(lines[0], user_id="nobody")]), data, 20)
    with pytest.raises(EvalInputError, match="larger than the number of items"):
        read_predictions(p, data, 41)
    with pytest.raises(EvalInputError, match="fewer than K=20"):
        read_predictions(_write_lines(tmp_path / "s.jsonl", [dict(x, predictions=x["predictions"][:5]) for x in lines]),
                         data, 20)
    junk = [dict(x, predictions=["garbage"] + x["predictions"][1:]) for x in lines]
    ps = read_predictions(_write_lines(tmp_path / "j.jsonl", junk), data, 20)
    assert ps.n_invalid_strings == len(lines) and all(row[0] is None for row in ps.sids)


def test_popularity_matches_hand_count(data):
    counts = Counter()
    for seq in training_sequences(data):
        counts.update(set(seq))
    b = PopularityBaseline(exclude_history=False).fit(data)
    top = b.recommend(5)[0]
    expected = sorted(data.catalogue, key=lambda s: (-counts[s], data.catalogue.index(s)))[:5]
    assert top == expected
    cs = b.candidate_scores()
    for r, scores in zip(data.rows, cs):
        if r.target.candidates:
            assert scores == [float(counts[c]) for c in r.target.candidates]


def test_history_excluded_and_random_deterministic(data):
    for cls in (PopularityBaseline, RandomBaseline):
        recs = cls(seed=1).fit(data).recommend(10)  # default rule: interacted
        for r, top in zip(data.rows, recs):
            assert len(set(top)) == 10 and not set(top) & (set(r.hist_neg) | set(r.hist_pos))
    assert RandomBaseline(seed=1).fit(data).recommend(10) == RandomBaseline(seed=1).fit(data).recommend(10)
    assert RandomBaseline(seed=1).fit(data).recommend(10) != RandomBaseline(seed=2).fit(data).recommend(10)


def test_swing_scores_match_brute_force(data, folder):
    table = pq.read_table(folder / "swing.parquet").to_pandas()
    b = SwingBaseline(exclude_history=False, backfill=False).fit(data)
    scores = b.row_scores(range(len(data.rows)))
    for i, r in enumerate(data.rows):
        hist_items = [data.sid_items[s] for s in r.hist_neg]
        expect = {}
        for _, e in table[table.item_id.isin(hist_items)].iterrows():
            expect[e.neighbor_id] = expect.get(e.neighbor_id, 0.0) + e.score * hist_items.count(e.item_id)
        for j, s in enumerate(data.catalogue):
            item = data.sid_items[s]
            want = 1.0 + expect[item] if expect.get(item, 0) > 0 else 0.0
            assert scores[i, j] == pytest.approx(want)


def test_sasrec_training_reduces_loss(data):
    b = SASRecBaseline(epochs=30, dim=32, layers=1, dropout=0.0).fit(data)
    assert b.losses[-1] < b.losses[0] * 0.8
    recs = b.recommend(20)
    assert all(len(set(t)) == 20 and all(s in data.sid_items for s in t) for t in recs)


def test_deployment_sweep_oracle_removes_all_dislikes(data):
    ps = PredictionSet("o", oracle(data), [None] * len(data.rows))
    sweep = deployment_sweep(data, ps, 20, [0.999])
    assert sweep[0]["dislikes_removed"] == 1.0


def test_cli_end_to_end(folder, tmp_path):
    from conrec_verl.model_builder import save_tiny_model

    data = load_eval_data(folder)
    pred = write_predictions(tmp_path / "oracle.jsonl", data, oracle(data),
                             candidate_scores=[None if r.target.candidates is None else
                                               [float(i == r.target.candidate_target) for i in range(20)]
                                               for r in data.rows])
    model = save_tiny_model(tmp_path / "tiny", (4, 4, 4))
    out = tmp_path / "report"
    rc = eval_main(["--data", str(folder), "--out", str(out), "--sasrec-epochs", "2", "--predictions",
                    f"oracle={pred}", "--model", f"tiny={model}", "--model-prompt", "tiny=2,96",
                    "--forget-reference", "tiny", "--measure-unconstrained", "--ks", "1,5,20", "--all-contexts",
                    "--exclusion", "none", "--bootstrap", "200"])
    assert rc == 0
    for f in ("report.md", "metrics.json", "metric_by_k.png", "rows.png", "filter_sweep.png",
              "predictions/random.jsonl", "predictions/tiny.jsonl", "predictions/oracle.jsonl"):
        assert (out / f).is_file(), f
    # a predictions-file row is kept as scored, beside the others (paired tests read them there)
    assert read_predictions(out / "predictions" / "oracle.jsonl", data, 20, "o").sids == \
        read_predictions(pred, data, 20, "o").sids
    rep = json.loads((out / "metrics.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == {"random", "popularity", "recent_popularity", "swing", "codislike", "sasrec", "oracle", "tiny"}
    o = rows["oracle"]["metrics"]
    scored = [r for r in data.rows if r.target.has_future_dislike]
    assert o["FHR@20"] == pytest.approx(sum(bool(r.target.future_neg) for r in scored) / len(scored))
    assert o["CandAcc"] == 1.0 and o["invalid_rate"] == 0.0
    t = rows["tiny"]
    assert t["metrics"]["invalid_rate"] == 0.0 and t["metrics"]["forget_rate"] == 0.0
    assert 0.0 <= t["info"]["alignment_acc"] <= 1.0
    assert t["info"]["alignment_file"] == "alignment_heldout.parquet" and t["info"]["alignment_rows"] == 3
    # the row's own context and budget are recorded, and every prompt fits the budget
    assert t["info"]["prompt_context"] == 2 and t["info"]["prompt_budget"] == 96
    assert t["info"]["prompt_tokens_max"] <= 96
    assert set(t["info"]["by_context"]) == {"1", "2", "3"}
    assert t["info"]["by_context"]["2"]["FHR@20"] == pytest.approx(t["metrics"]["FHR@20"])
    # intervals around every headline metric, the paired test against the best FHR@20 baseline
    assert rep["exclusion"] == "none" and not rep["reduced"]
    best = rep["best_baseline"]["FHR@20"]
    assert rows[best]["metrics"]["FHR@20"] == max(r["metrics"]["FHR@20"] for r in rows.values() if r["kind"] == "baseline")
    for r in rows.values():
        lo, hi = r["ci"]["FHR@20"]
        assert lo <= r["metrics"]["FHR@20"] <= hi
    assert rows["oracle"]["paired"]["against"] == best and rows["oracle"]["paired"]["only_baseline"] == 0
    assert rows["oracle"]["paired"]["only_row"] >= 1 and rows["oracle"]["paired"]["diff"] > 0
    phases = [p["phase"] for p in rep["timings"]]
    assert "load data" in phases and "baseline sasrec" in phases and "tiny: beam search" in phases
    assert t["info"]["invalid_rate_unconstrained"] > 0.5
    # the model row's predictions file is itself valid input
    assert read_predictions(out / "predictions" / "tiny.jsonl", data, 20).n_invalid_strings == 0
    md = (out / "report.md").read_text()
    assert "| oracle | predictions |" in md and "FHR@20" in md
    assert "Paired test against the best baseline" in md and "wall time per phase" in md
    assert "by prompt context" in md and "Smoke run" not in md


def test_cli_bad_input_one_error_no_output(folder, tmp_path, capsys):
    bad = _write_lines(tmp_path / "bad.jsonl", [{"user_id": "0", "cutoff_day": 20220414, "sid_build": "x",
                                                  "predictions": []}])
    out = tmp_path / "never"
    rc = eval_main(["--data", str(folder), "--out", str(out), "--baselines", "popularity",
                    "--predictions", f"bad={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and "another SID build" in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    rc = eval_main(["--data", str(folder), "--out", str(out), "--baselines", "popularity", "--k", "50"])
    assert rc == 2 and "larger than the number of items" in capsys.readouterr().err


def test_filter_cli_matches_brute_force(folder, tmp_path):
    data = load_eval_data(folder)
    preds = [r.target.future_neg[:1] + data.catalogue[:2] for r in data.rows]
    pfile = write_predictions(tmp_path / "p.jsonl", data, preds)
    rng = np.random.default_rng(0)
    cands = pd.DataFrame({"user_id": [str(u) for u in rng.integers(0, 12, 60)] + ["nobody"],
                          "item_id": [f"i{j}" for j in rng.integers(0, 45, 60)] + ["i1"]})
    cands.to_parquet(tmp_path / "c.parquet")
    out = tmp_path / "kept.parquet"
    assert filter_main(["--data", str(folder), "--predictions", str(pfile), "--candidates",
                        str(tmp_path / "c.parquet"), "--out", str(out), "--threshold", "0.8"]) == 0
    got = pd.read_parquet(out)
    pred_by_user = {r.user_id: p for r, p in zip(data.rows, preds)}
    for _, row in got.iterrows():
        sid = data.item_sids.get(row.item_id)
        ps = pred_by_user.get(row.user_id, [])
        if sid is None or not ps:
            assert not row.removed and np.isnan(row.max_sim)
            continue
        e = data.codebook.embed(sid)
        sims = [float(e @ data.codebook.embed(p) / np.linalg.norm(e) / np.linalg.norm(data.codebook.embed(p)))
                for p in ps]
        assert row.max_sim == pytest.approx(max(sims), abs=1e-5)
        assert row.removed == (max(sims) >= 0.8)
    assert got.removed.any() and not got.removed.all()
    pfile.write_text(pfile.read_text().replace(data.sid_build, "otherbuild"))
    assert filter_main(["--data", str(folder), "--predictions", str(pfile), "--candidates",
                        str(tmp_path / "c.parquet"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("extra, match", [(["--top", "-1"], "--top must be >= 1"),
                                          (["--out", "kept.txt"], "name it \\*.parquet or \\*.csv")])
def test_filter_cli_refuses_nonsense_options(folder, tmp_path, capsys, extra, match):
    import re

    data = load_eval_data(folder)
    pfile = write_predictions(tmp_path / "p.jsonl", data, [data.catalogue[:2] for _ in data.rows])
    pd.DataFrame({"user_id": ["0"], "item_id": ["i1"]}).to_parquet(tmp_path / "c.parquet")
    args = ["--data", str(folder), "--predictions", str(pfile), "--candidates", str(tmp_path / "c.parquet"),
            "--out", str(tmp_path / "kept.parquet")]
    if extra[0] == "--out":
        args[-1] = str(tmp_path / extra[1])
        extra = []
    assert filter_main(args + extra) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.count("\n") == 1
    assert not list(tmp_path.glob("kept*"))


def test_unwritable_output_is_one_error_line(folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert eval_main(["--data", str(folder), "--out", str(blocker / "eval"), "--baselines", "popularity"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conrec-eval: error: cannot write or read") and err.count("\n") == 1


def test_cli_run_folder_defaults(folder, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(folder, run / "data")
    assert eval_main(["--run", str(run), "--baselines", "popularity", "--thresholds", "none"]) == 0
    rep = json.loads((run / "eval" / "metrics.json").read_text())
    assert [r["name"] for r in rep["rows"]] == ["popularity"] and rep["rows"][0]["filter_sweep"] == []


def test_run_evaluation_api_errors_leave_no_output(folder, tmp_path):
    out = tmp_path / "rep"
    with pytest.raises(EvalInputError, match="forget reference"):
        run_evaluation(folder, out, baselines=("popularity",), forget_reference="nope")
    with pytest.raises(EvalInputError, match="unknown baseline"):
        run_evaluation(folder, out, baselines=("popularity", "magic"))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_training_sequences_add_train_only_users_without_future(folder, tmp_path):
    import shutil

    import pyarrow as pa

    d = tmp_path / "with_train"
    shutil.copytree(folder, d)
    data = load_eval_data(d)
    without = training_sequences(data)
    a, b, c = data.catalogue[:3]
    (d / "rl").mkdir()
    rows = [
        # a train-only user: two cutoffs, the latest history is used
        {"extra_info": {"user_id": "new", "cutoff_day": 20220410}, "hist_neg": [format_sid(a)]},
        {"extra_info": {"user_id": "new", "cutoff_day": 20220412}, "hist_neg": [format_sid(a), format_sid(b)]},
        # an evaluated user: its evaluation history wins, this row is ignored
        {"extra_info": {"user_id": "0", "cutoff_day": 20220401}, "hist_neg": [format_sid(c)]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), d / "rl" / "train.parquet")
    with_train = training_sequences(load_eval_data(d))
    assert len(with_train) == len(without) + 1
    assert [a, b] in with_train
    assert sorted(map(tuple, with_train[: len(without)])) == sorted(map(tuple, without))
    rows[0]["hist_neg"] = ["not a sid"]
    rows[1]["extra_info"]["cutoff_day"] = 20220409  # now the bad row is the latest
    pq.write_table(pa.Table.from_pylist(rows), d / "rl" / "train.parquet")
    with pytest.raises(EvalInputError, match=r"train.parquet: row 0: column 'hist_neg'"):
        training_sequences(load_eval_data(d))


@pytest.mark.parametrize("rule", ["none", "dislikes", "interacted"])
def test_model_rows_obey_the_exclusion_rule_and_return_k(folder, tmp_path, rule):
    from conrec_verl.evaluation.harness import model_predictions
    from conrec_verl.model_builder import save_tiny_model

    data = load_eval_data(folder)
    model = save_tiny_model(tmp_path / "tiny", (4, 4, 4))
    # as many beams as items: the search is exact, so the masked ranking must be the free one less the excluded
    beams = len(data.sid_items)
    free, _, _ = model_predictions(data, model, 10, device="cpu", candidate_acc=False, exclusion="none",
                                   num_beams=beams)
    excl, info, scores = model_predictions(data, model, 10, device="cpu", candidate_acc=False, exclusion=rule,
                                           num_beams=beams)
    assert info["exclusion"] == rule and info.get("rows_exclusion_skipped", 0) == 0
    changed = 0
    for row, f, e, sc in zip(data.rows, free.sids, excl.sids, scores):
        ex = row.excluded(rule)
        assert len(e) == 10 and len(set(e)) == 10 and not set(e) & ex
        assert sc == sorted(sc, reverse=True)
        assert all(s in data.sid_items for s in e)
        # the masked search is the unmasked ranking with the excluded items taken out
        assert [s for s in f if s not in ex] == e[: len([s for s in f if s not in ex])]
        changed += e != f
    if rule != "none":
        assert changed > 0  # the fixture's model does recommend items the rule removes


@pytest.mark.parametrize("rule", ["none", "interacted"])
def test_one_model_ensemble_is_the_exhaustive_beam_search(folder, tmp_path, rule):
    """An ensemble of one folder ranks exactly: the beam search with a beam per item gives the same top K."""
    from conrec_verl.evaluation.harness import EnsembleSpec, ensemble_predictions, model_predictions
    from conrec_verl.model_builder import save_tiny_model

    data = load_eval_data(folder)
    model = save_tiny_model(tmp_path / "tiny", (4, 4, 4))
    beam, _, bscores = model_predictions(data, model, 10, device="cpu", candidate_acc=True, exclusion=rule,
                                         num_beams=len(data.sid_items))
    ens, info, escores = ensemble_predictions(data, EnsembleSpec([str(model)]), 10, exclusion=rule, device="cpu")
    assert ens.sids == beam.sids
    assert np.allclose(escores, bscores, atol=1e-4)
    # Candidate Acc scores are the model's own likelihoods of the candidates, as for a model row
    for e, b in zip(ens.candidate_scores, beam.candidate_scores):
        assert (e is None) == (b is None) and (e is None or np.allclose(e, b, atol=1e-4))
    assert info["members"] == [str(model)] and info["exclusion"] == rule and info["rows_exclusion_skipped"] == 0


@pytest.mark.parametrize("rule", ["none", "interacted"])
def test_exact_decoding_of_a_model_row_is_the_exhaustive_beam_search(folder, tmp_path, rule):
    """``decode="exact"`` ranks every item by its log-probability: the top K (also in an extra
    context) and its scores are the beam search's with a beam per item, and the same as a
    one-folder ensemble row; a decode that does not exist is refused before anything runs."""
    from conrec_verl.evaluation.harness import EnsembleSpec, ensemble_predictions, model_predictions, run_evaluation
    from conrec_verl.model_builder import save_tiny_model

    data = load_eval_data(folder)
    model = save_tiny_model(tmp_path / "tiny", (4, 4, 4), seed=5)
    beam, binfo, bscores = model_predictions(data, model, 10, device="cpu", exclusion=rule,
                                             num_beams=len(data.sid_items), extra_contexts=(2, 3))
    exact, info, escores = model_predictions(data, model, 10, device="cpu", exclusion=rule, decode="exact",
                                             extra_contexts=(2, 3))
    assert info["decode"] == "exact" and binfo["decode"] == "beam"
    assert exact.sids == beam.sids and np.allclose(escores, bscores, atol=1e-4)
    assert exact.candidate_scores == beam.candidate_scores
    assert info["by_context"][2]["sids"] == binfo["by_context"][2]["sids"]
    assert info.get("rows_exclusion_skipped", 0) == binfo.get("rows_exclusion_skipped", 0)
    ens, _, _ = ensemble_predictions(data, EnsembleSpec([str(model)]), 10, exclusion=rule, device="cpu")
    assert ens.sids == exact.sids
    with pytest.raises(EvalInputError, match="decode must be one of beam, exact"):
        model_predictions(data, model, 10, device="cpu", decode="greedy")
    with pytest.raises(EvalInputError, match="decode must be one of beam, exact"):
        run_evaluation(folder, tmp_path / "bad", baselines=["popularity"], models={"m": str(model)},
                       model_params={"decode": "greedy"})
    assert not (tmp_path / "bad").exists()


def test_ensemble_ranks_by_the_members_mean_log_probability(folder, tmp_path):
    from conrec_verl.constrained import score_sids
    from conrec_verl.evaluation.harness import EnsembleSpec, PhaseTimer, ensemble_predictions, load_model, render_prompts
    from conrec_verl.model_builder import save_tiny_model

    data = load_eval_data(folder)
    paths = [str(save_tiny_model(tmp_path / f"m{seed}", (4, 4, 4), seed=seed)) for seed in (1, 2)]
    spec = EnsembleSpec(paths, context=2, max_prompt_tokens=96)
    timer, cache = PhaseTimer(), {}
    ens, _, scores = ensemble_predictions(data, spec, 8, exclusion="interacted", device="cpu", timer=timer, cache=cache)
    # the oracle: every catalogue SID scored alone by each member, averaged, excluded items dropped, sorted
    catalogue = sorted(data.sid_items)
    per_model = []
    for path in paths:
        model, tok = load_model(path, "cpu")
        prompts, _, _ = render_prompts(data, tok, 2, 96)
        per_model.append(np.array([score_sids(model, tok, p, catalogue) for p in prompts]))
    mean = np.mean(per_model, axis=0)
    singles = []
    for i, row in enumerate(data.rows):
        ex = row.excluded("interacted")
        ranked = sorted((j for j, s in enumerate(catalogue) if s not in ex), key=lambda j: -mean[i, j])
        assert ens.sids[i] == [catalogue[j] for j in ranked[:8]]
        assert scores[i] == pytest.approx([mean[i, j] for j in ranked[:8]], abs=1e-4)
        singles.append([catalogue[j] for j in sorted(range(len(catalogue)), key=lambda j: -per_model[0][i, j])
                        if catalogue[j] not in ex][:8])
    assert ens.sids != singles  # the second member changes the ranking: the mean is not the first model's
    # a second ensemble row sharing a member reuses its scores (one catalogue pass per folder)
    ensemble_predictions(data, EnsembleSpec(paths[:1], context=2, max_prompt_tokens=96), 8, device="cpu",
                         timer=timer, cache=cache)
    assert sum("catalogue scores" in p["phase"] for p in timer.phases) == 2 and len(cache) == 2


def test_ensemble_rows_with_another_prompt_do_not_share_scores_and_exclusion_can_be_skipped(folder, tmp_path):
    from conrec_verl.evaluation.harness import EnsembleSpec, PhaseTimer, ensemble_predictions, rank_catalogue
    from conrec_verl.model_builder import save_tiny_model

    data = load_eval_data(folder)
    path = str(save_tiny_model(tmp_path / "m", (4, 4, 4), seed=1))
    timer, cache = PhaseTimer(), {}
    c2, _, _ = ensemble_predictions(data, EnsembleSpec([path], 2, 96), 5, device="cpu", timer=timer, cache=cache)
    c3, _, _ = ensemble_predictions(data, EnsembleSpec([path], 3, 96), 5, device="cpu", timer=timer, cache=cache)
    alone, _, _ = ensemble_predictions(data, EnsembleSpec([path], 3, 96), 5, device="cpu")
    assert len(cache) == 2 and c3.sids == alone.sids and c2.sids != c3.sids
    # K so large that a row's exclusion would leave fewer than K items: that row is ranked unmasked
    n = len(data.sid_items)
    scores = np.random.default_rng(0).normal(size=(len(data.rows), n))
    most = max(len(r.excluded("interacted")) for r in data.rows)
    top, _, skipped = rank_catalogue(data, scores, n - most + 1, "interacted")
    assert skipped >= 1
    for row, t in zip(data.rows, top):
        ex = row.excluded("interacted")
        assert len(t) == n - most + 1 and (not set(t) & ex or n - len(ex) < n - most + 1)
    with pytest.raises(EvalInputError, match="shape"):
        rank_catalogue(data, scores[:, :-1], 5)
    with pytest.raises(EvalInputError, match="list of model folders"):
        EnsembleSpec(path)
    with pytest.raises(EvalInputError, match="twice"):
        EnsembleSpec([path, path + "/"])


def test_cli_ensemble_row_and_its_errors(folder, tmp_path, capsys):
    from conrec_verl.model_builder import save_tiny_model

    a = save_tiny_model(tmp_path / "a", (4, 4, 4), seed=1)
    b = save_tiny_model(tmp_path / "b", (4, 4, 4), seed=2)
    out = tmp_path / "report"
    assert eval_main(["--data", str(folder), "--out", str(out), "--baselines", "popularity", "--thresholds", "none",
                      "--ensemble", f"both={a},{b}", "--model-prompt", "both=1,128", "--bootstrap", "50"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "metrics.json").read_text())["rows"]}
    both = rows["both"]
    assert both["kind"] == "ensemble" and both["info"]["members"] == [str(a), str(b)]
    assert both["info"]["prompt_context"] == 1 and both["info"]["prompt_budget"] == 128
    assert both["paired"]["against"] == "popularity" and both["metrics"]["invalid_rate"] == 0.0
    assert read_predictions(out / "predictions" / "both.jsonl", load_eval_data(folder), 20).n_invalid_strings == 0
    assert "| both | ensemble |" in (out / "report.md").read_text()
    capsys.readouterr()
    for args, msg in (([f"x={a},{a}"], "twice"), (["x=,"], "no folder"),
                      ([f"x={tmp_path / 'nowhere'}"], "no config.json")):
        assert eval_main(["--data", str(folder), "--out", str(tmp_path / "bad"), "--baselines", "none",
                          "--ensemble", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    assert eval_main(["--data", str(folder), "--out", str(tmp_path / "bad"), "--baselines", "none",
                      "--ensemble", f"x={a}", "--model-prompt", "y=1"]) == 2
    assert "--model or --ensemble rows" in capsys.readouterr().err
    # a bad prompt of an ensemble row names the row; a missing member fails before any baseline runs
    assert eval_main(["--data", str(folder), "--out", str(tmp_path / "bad"), "--baselines", "none",
                      "--ensemble", f"x={a},{b}", "--model-prompt", "x=5"]) == 2
    assert "--ensemble x:" in capsys.readouterr().err
    assert eval_main(["--data", str(folder), "--out", str(tmp_path / "bad"), "--baselines", "sasrec",
                      "--ensemble", f"x={a},{tmp_path / 'gone'}"]) == 2
    err = capsys.readouterr().err
    assert "row 'x'" in err and "gone" in err and not (tmp_path / "bad").exists()


def test_cli_errors_are_one_line(folder, tmp_path, capsys):
    data = load_eval_data(folder)
    p = write_predictions(tmp_path / "p.jsonl", data, oracle(data),
                          candidate_scores=[None if r.target.candidates is None else [float("nan")] * 20
                                            for r in data.rows])
    assert eval_main(["--data", str(folder), "--out", str(tmp_path / "o"), "--baselines", "none",
                      "--predictions", f"x={p}"]) == 2
    assert "finite numbers" in capsys.readouterr().err
    assert eval_main(["--data", str(folder), "--out", str(tmp_path / "o"), "--thresholds", "a,b"]) == 2
    assert "--thresholds" in capsys.readouterr().err
    assert filter_main(["--data", str(folder), "--predictions", str(p), "--candidates", str(p),
                        "--out", str(tmp_path / "f.parquet"), "--threshold", "1.5"]) == 2
    assert "[-1, 1]" in capsys.readouterr().err
    assert filter_main(["--data", str(folder), "--predictions", str(p), "--candidates", str(p),
                        "--out", str(tmp_path / "f.parquet")]) == 2
    err = capsys.readouterr().err
    assert "cannot read the candidates table" in err and err.count("\n") == 1


def test_output_similarity_is_the_mean_closest_cosine(data):
    from conrec_verl.evaluation.harness import output_similarity

    def cos(a, b):
        x, y = data.codebook.embed(a), data.codebook.embed(b)
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    preds = oracle(data, 5)
    got = output_similarity(data, PredictionSet("o", preds, [None] * len(preds)), 5)
    for key, pick in (("sim_future_neg@5", lambda r: r.target.future_neg), ("sim_future_pos@5", lambda r: r.future_pos)):
        per_row = [np.mean([max(cos(p, t) for t in pick(r)) for p in top]) for r, top in zip(data.rows, preds) if pick(r)]
        assert got[key] == pytest.approx(np.mean(per_row))
    # the oracle puts the future dislikes first: their similarity to a future dislike is 1
    top1 = output_similarity(data, PredictionSet("o", [p[:1] for p in preds], [None] * len(preds)), 1)
    rows = [r for r in data.rows if r.target.future_neg]
    assert top1["sim_future_neg@1"] == pytest.approx(1.0) and rows
