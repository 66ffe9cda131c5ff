"""The baselines beside brute-force versions of their formulas, the exclusion rule, early stopping,
and training data that does not depend on how many rows are scored."""

import json
from collections import Counter

import numpy as np
import pytest

from conrec_verl.baselines import BASELINES, CoDislikeBaseline, RecentPopularityBaseline, SASRecBaseline
from conrec_verl.baselines.base import training_sequences
from conrec_verl.core.eval_data import load_eval_data
from conrec_verl.evaluation.harness import run_evaluation
from conrec_verl.evaluation.predictions import write_predictions

from tests.evaluation.fixtures import make_data_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_data_folder(tmp_path_factory.mktemp("d") / "data", n_users=30, n_items=40)


@pytest.fixture(scope="module")
def data(folder):
    return load_eval_data(folder)


def test_codislike_matches_a_brute_force_count(data):
    seqs = [set(s) for s in training_sequences(data)]
    b = CoDislikeBaseline(exclusion="none").fit(data)
    scores = b.row_scores(range(len(data.rows)))
    pop = Counter(s for seq in seqs for s in seq)
    top_pop = max(pop.values())
    for i, row in enumerate(data.rows):
        for j, item in enumerate(data.catalogue):
            co = sum(sum(1 for seq in seqs if h in seq and item in seq) for h in set(row.hist_neg) if h != item)
            want = 1.0 + co if co > 0 else pop.get(item, 0) / (top_pop + 1.0)
            assert scores[i, j] == pytest.approx(want), (i, item)


def test_recent_popularity_matches_a_brute_force_sum(data):
    b = RecentPopularityBaseline(half_life=2.0, exclusion="none").fit(data)
    want = Counter()
    for seq in training_sequences(data):
        seen = set()
        for age, s in enumerate(reversed(seq)):
            if s not in seen:
                seen.add(s)
                want[s] += 0.5 ** (age / 2.0)
    assert [b.counts[b.index[s]] for s in data.catalogue] == pytest.approx([want[s] for s in data.catalogue])
    # an infinite half-life is plain popularity
    flat = RecentPopularityBaseline(half_life=float("inf")).fit(data)
    pop = BASELINES["popularity"]().fit(data)
    assert flat.counts.tolist() == pop.counts.tolist()
    with pytest.raises(ValueError, match="half_life"):
        RecentPopularityBaseline(half_life=0)


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("rule", ["none", "dislikes", "interacted"])
def test_every_baseline_obeys_the_exclusion_rule(data, name, rule):
    kw = {"epochs": 2} if name == "sasrec" else {}
    b = BASELINES[name](exclusion=rule, **kw).fit(data)
    recs = b.recommend(10)
    hit_excluded = 0
    for row, top in zip(data.rows, recs):
        assert len(top) == 10 and len(set(top)) == 10
        assert not set(top) & row.excluded(rule)
        hit_excluded += bool(set(top) & row.excluded("interacted"))
    if rule == "none" and name in ("popularity", "codislike"):
        assert hit_excluded > 0  # without the rule the fixture's baselines do recommend known items


def test_baselines_learn_the_same_whatever_max_rows(folder):
    full = load_eval_data(folder)
    few = load_eval_data(folder, max_rows=3)
    assert len(few.rows) == 3 and len(few.all_rows) == len(full.rows) and few.reduced and not full.reduced
    assert training_sequences(few) == training_sequences(full)
    for name in ("popularity", "codislike", "recent_popularity", "swing"):
        a = BASELINES[name]().fit(full).recommend(10)[:3]
        b = BASELINES[name]().fit(few).recommend(10)
        assert a == b, name


def test_sasrec_stops_early_then_refits_for_its_best_epoch_count(data):
    b = SASRecBaseline(epochs=200, patience=3, dim=32, layers=1, seed=0, val_items=2).fit(data)
    info = b.fit_info
    assert info["stopped_early"] and info["epochs_run"] < 200 and info["val_sequences"] > 0
    best = max(range(len(b.val_hr)), key=lambda i: (b.val_hr[i], -b.val_nll[i]))
    assert info["best_epoch"] == best + 1 and info["epochs_run"] == best + 1 + 3
    assert info["val_hr_best"] == pytest.approx(b.val_hr[best], abs=1e-4)
    # the final model is a fresh fit on every whole sequence for the best epoch count
    plain = SASRecBaseline(epochs=info["best_epoch"], patience=0, dim=32, layers=1, seed=0).fit(data)
    assert len(b.losses) == info["best_epoch"] and b.losses == pytest.approx(plain.losses)
    assert np.allclose(plain.row_scores(range(5)), b.row_scores(range(5)))
    # patience 0: no validation, every epoch trained
    c = SASRecBaseline(epochs=4, patience=0, dim=32, layers=1).fit(data)
    assert len(c.losses) == 4 and c.val_nll == [] and not c.fit_info["stopped_early"]


@pytest.mark.parametrize("span", [1, 3])
def test_sasrec_target_span_loss_is_the_mean_over_each_positions_next_items(span):
    """target_span = N: the first step's loss is the cross-entropy averaged over every (position,
    one of its next N items) pair, computed here one pair at a time from the same network."""
    import copy

    import torch

    from conrec_verl.baselines.sasrec import SASRecNet, _pad_left

    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 11, size=n).tolist() for n in (2, 4, 7, 9, 12)]
    torch.manual_seed(0)
    net = SASRecNet(10, dim=16, max_len=12, layers=1, dropout=0.0)
    b = SASRecBaseline(dim=16, max_len=12, layers=1, dropout=0.0, batch_size=100, target_span=span)
    first = b._train(copy.deepcopy(net), seqs, 1)[0]
    terms = []
    with torch.no_grad():
        for s in seqs:
            logits = net(_pad_left([s[:-1]], 12))[0]
            for i in range(len(s) - 1):
                pos = 12 - (len(s) - 1) + i
                for o in range(1, span + 1):
                    if i + o < len(s):
                        terms.append(float(torch.nn.functional.cross_entropy(logits[pos], torch.tensor(s[i + o] - 1))))
    assert first == pytest.approx(float(np.mean(terms)), rel=1e-5)
    with pytest.raises(ValueError, match="target_span"):
        SASRecBaseline(target_span=0)


def test_every_report_row_obeys_one_rule_and_reduced_runs_claim_nothing(folder, tmp_path):
    data = load_eval_data(folder)
    # a predictions file that puts each user's known items first: the rule removes them
    known = [sorted(r.excluded("interacted")) + [s for s in data.catalogue if s not in r.excluded("interacted")]
             for r in data.rows]
    pred = write_predictions(tmp_path / "known.jsonl", data, [k[:20] for k in known])
    rep = run_evaluation(folder, tmp_path / "r", predictions={"known": str(pred)},
                         baseline_params={"sasrec": {"epochs": 2}}, n_boot=100)
    assert rep["exclusion"] == "interacted"
    preds_dir = tmp_path / "r" / "predictions"
    for row in rep["rows"]:
        if row["kind"] == "predictions":
            assert row["info"]["excluded_entries_removed"] > 0
            continue
        lines = [json.loads(x) for x in (preds_dir / f"{row['name']}.jsonl").read_text().splitlines()]
        for r, line in zip(data.rows, lines):
            from conrec_verl.core.sid import parse_sid

            assert not {parse_sid(s) for s in line["predictions"]} & r.excluded("interacted"), row["name"]
    assert len({r["name"] for r in rep["rows"] if r["kind"] == "baseline"}) == 6
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Smoke run" not in md and "the full split" in md
    small = run_evaluation(folder, tmp_path / "s", baselines=["popularity"], predictions={"known": str(pred)},
                           max_rows=5, n_boot=50)
    assert small["reduced"] and small["n_rows"] == 5 and small["n_rows_split"] == len(data.rows)
    md = (tmp_path / "s" / "report.md").read_text()
    assert "Smoke run" in md and "no goal claim" in md and "meets the" not in md and "misses the" not in md
