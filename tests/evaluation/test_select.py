"""Checkpoint selection by a validation hit rate: the score is the evaluation's metric, on rows that
may repeat a (user, cutoff), with ties to the model named first."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conrec_verl.core.eval_data import EvalInputError, load_eval_data
from conrec_verl.evaluation.select import main, parse_metric, validation_scores
from tests.evaluation.fixtures import make_data_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_data_folder(tmp_path_factory.mktemp("sel") / "data", n_users=10)
    rows = pq.read_table(root / "eval" / "test.parquet").to_pylist()
    (root / "rl").mkdir()
    # validation rows as data_prep writes them: one (user, cutoff) can have several rows
    pq.write_table(pa.Table.from_pylist(rows + rows[:4]), root / "rl" / "val.parquet")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conrec_verl.model_builder import save_tiny_model

    base = tmp_path_factory.mktemp("sel_models")
    return {name: str(save_tiny_model(base / name, (4, 4, 4), seed=seed)) for name, seed in (("a", 0), ("b", 1))}


def by_hand(folder, model, k, which):
    """The hit rate of ``model``'s constrained top ``k`` on every validation row with a future dislike."""
    from conrec_verl.evaluation.harness import model_predictions

    data = load_eval_data(folder, "rl/val.parquet", unique_rows=False)
    pset, _, _ = model_predictions(data, model, k, device="cpu", candidate_acc=False, max_prompt_tokens=384)
    hits = []
    for row, top in zip(data.rows, pset.sids):
        t = row.target
        if not t.has_future_dislike:
            continue
        wanted = list(t.future_neg) if which == "FHR" else ([t.next_neg] if t.next_neg is not None else [])
        hits.append(any(s in wanted for s in top[:k]))
    return sum(hits) / len(hits), len(hits)


def test_repeated_rows_load_only_when_allowed(folder):
    with pytest.raises(EvalInputError, match="val.parquet: row 10: user 0 cutoff 20220414 repeats row 0"):
        load_eval_data(folder, "rl/val.parquet")
    assert len(load_eval_data(folder, "rl/val.parquet", unique_rows=False).rows) == 14


@pytest.mark.parametrize("metric", ["FHR@5", "HR@10"])
def test_scores_are_the_evaluation_metric_on_every_validation_row(folder, models, metric):
    which, k = parse_metric(metric)
    result = validation_scores(folder, models, metric, device="cpu")
    for name, model in models.items():
        value, n = by_hand(folder, model, k, which)
        assert result["scores"][name] == pytest.approx(value)
        assert result["rows"] == n and n > 10  # the repeated rows count too
    best = max(result["scores"].values())
    assert result["best"] == next(m for m, v in result["scores"].items() if v == best)


def test_exact_decoding_scores_as_the_beam_with_a_beam_per_item(folder, models, capsys):
    """``decode="exact"`` is the evaluation's exact model row: the same hit rates as a beam search
    that misses nothing; the CLI passes --decode on and refuses one that does not exist."""
    n_items = len(load_eval_data(folder, "rl/val.parquet", unique_rows=False).sid_items)
    exact = validation_scores(folder, models, "FHR@10", device="cpu", decode="exact")
    beam = validation_scores(folder, models, "FHR@10", device="cpu", num_beams=n_items)
    assert exact["decode"] == "exact" and beam["decode"] == "beam"
    assert exact["scores"] == pytest.approx(beam["scores"]) and exact["rows"] == beam["rows"]
    assert main(["--data", str(folder), "--model", f"a={models['a']}", "--metric", "FHR@10", "--device", "cpu",
                 "--decode", "exact"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"]["a"] == pytest.approx(exact["scores"]["a"])
    with pytest.raises(SystemExit):
        main(["--data", str(folder), "--model", f"a={models['a']}", "--decode", "greedy"])


def test_ties_go_to_the_model_named_first(folder, models):
    same = {"start": models["a"], "later": models["a"]}
    assert validation_scores(folder, same, "FHR@20", device="cpu")["best"] == "start"


@pytest.mark.parametrize("bad", ["fhr@20", "FHR@0", "NDCG@10", "FHR"])
def test_bad_metric_is_one_error(folder, models, bad, capsys):
    with pytest.raises(ValueError, match="is not FHR@K or HR@K"):
        parse_metric(bad)
    assert main(["--data", str(folder), "--model", f"a={models['a']}", "--metric", bad]) == 2
    assert "conrec-select: error:" in capsys.readouterr().err


def test_cli_writes_the_result(folder, models, tmp_path, capsys):
    out = tmp_path / "val.json"
    assert main(["--data", str(folder), "--model", f"a={models['a']}", "--model", f"b={models['b']}",
                 "--metric", "FHR@20", "--device", "cpu", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out)
    assert list(written["scores"]) == ["a", "b"] and written["metric"] == "FHR@20" and written["k"] == 20


@pytest.mark.parametrize("spec", ["no-equals", "=dir", "name="])
def test_a_bad_model_spec_is_one_error(folder, spec, capsys):
    assert main(["--data", str(folder), "--model", spec]) == 2
    assert "--model expects NAME=PATH" in capsys.readouterr().err


def test_ensemble_search_scores_every_subset_as_conrec_eval_would(folder, models, tmp_path, capsys):
    """Each subset's score is the hit rate of the ensemble row conrec-eval would rank (by hand from
    ensemble_predictions); the single-folder subsets equal the exact decoding of each model."""
    from conrec_verl.evaluation.harness import EnsembleSpec, ensemble_predictions
    from conrec_verl.evaluation.select import ensemble_search
    from conrec_verl.model_builder import save_tiny_model

    three = dict(models, c=str(save_tiny_model(tmp_path / "c", (4, 4, 4), seed=2)))
    result = ensemble_search(folder, three, "FHR@10", device="cpu")
    data = load_eval_data(folder, "rl/val.parquet", unique_rows=False)
    assert len(result["ensembles"]) == 7 and result["rows"] > 10
    for entry in result["ensembles"]:
        pset, _, _ = ensemble_predictions(data, EnsembleSpec([three[m] for m in entry["members"]]), 10, device="cpu",
                                          candidate_acc=False)
        hits = [any(s in r.target.future_neg for s in top) for r, top in zip(data.rows, pset.sids)
                if r.target.has_future_dislike]
        assert entry["score"] == pytest.approx(sum(hits) / len(hits))
    scores = [e["score"] for e in result["ensembles"]]
    assert scores == sorted(scores, reverse=True)
    top = max(scores)
    first = next(e["members"] for e in sorted(result["ensembles"], key=lambda e: len(e["members"])) if e["score"] == top)
    assert result["best"] == first
    # the CLI prints the result and the conrec-eval argument of the best subset
    assert main(["--data", str(folder), "--ensembles", "--metric", "FHR@10", "--device", "cpu", "--context", "2",
                 *[f"--model={n}={p}" for n, p in three.items()]]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["best"] == ensemble_search(folder, three, "FHR@10", context=2, device="cpu")["best"]
    row = "+".join(json.loads(captured.out)["best"])
    assert f'--ensemble "{row}=' in captured.err and f'--model-prompt "{row}=2,384"' in captured.err


def test_ensemble_search_ties_go_to_fewer_members_then_the_first_listed(folder, models, monkeypatch):
    """Identical score matrices for every folder: every subset ranks the same, so the first single folder wins."""
    import numpy as np

    from conrec_verl.evaluation import harness
    from conrec_verl.evaluation.select import ensemble_search

    def same(data, path, *args, **kwargs):
        rng = np.random.default_rng(0)
        return rng.normal(size=(len(data.rows), len(data.sid_items))).astype(np.float32), {}

    monkeypatch.setattr(harness, "catalogue_scores", same)
    result = ensemble_search(folder, {"second": models["b"], "first": models["a"]}, "FHR@10", device="cpu")
    assert len({e["score"] for e in result["ensembles"]}) == 1
    assert result["best"] == ["second"]


def test_ensemble_search_refuses_one_folder_under_two_names(folder, models):
    from conrec_verl.evaluation.select import ensemble_search

    with pytest.raises(EvalInputError, match="twice"):
        ensemble_search(folder, {"a": models["a"], "again": models["a"] + "/"}, device="cpu")


def test_ensemble_search_refuses_too_many_folders(folder, models):
    from conrec_verl.evaluation.select import MAX_ENSEMBLE_FOLDERS, ensemble_search

    many = {f"m{i}": models["a"] for i in range(MAX_ENSEMBLE_FOLDERS + 1)}
    with pytest.raises(ValueError, match="at most"):
        ensemble_search(folder, many, device="cpu")
