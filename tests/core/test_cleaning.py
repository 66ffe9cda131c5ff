"""Cross-stage cleaning: the flag rule, the decision file, the weighted curriculum draw, and the
screening step with a real (tiny) model on a smoke data folder."""

from __future__ import annotations

import collections
import json

import pytest

from conrec_verl.core.cleaning import CleaningError, CleaningRule, load_row_weights, write_decision
from conrec_verl.core.schedule import CurriculumOrder, ScheduleError, StageSchedule, rows_by_context


def schedule():
    return StageSchedule.from_config({"stages": [{"context": 1, "steps": 2}, {"context": 2, "steps": 6},
                                                 {"context": 3, "steps": 2}]})


def test_share_flags_the_rows_closest_to_future_likes_and_skips_rows_without_them():
    rule = CleaningRule(share=0.5)
    sim = [0.9, 0.1, 0.95, 0.5, 0.99]
    has = [True, True, True, True, False]  # the last row has no future likes: never flagged
    assert rule.flag(sim, has).tolist() == [True, False, True, False, False]
    assert rule.weights(rule.flag(sim, has)).tolist() == [2, 1, 2, 1, 1]
    # ties are broken by row order (a reproducible decision)
    assert CleaningRule(share=0.5).flag([0.5] * 4, [True] * 4).tolist() == [True, True, False, False]


def test_threshold_and_drop():
    assert CleaningRule().share == 0.25 and CleaningRule(threshold=0.5).share is None
    with pytest.raises(CleaningError, match="exactly one"):
        CleaningRule(threshold=0.5, share=0.5)
    rule = CleaningRule.from_mapping({"enabled": True, "share": 0.25, "threshold": 0.6, "action": "drop"})
    assert rule.share is None  # a threshold replaces the share
    flagged = rule.flag([0.59, 0.6, 0.7], [True, True, True])
    assert flagged.tolist() == [False, True, True]
    assert rule.weights(flagged).tolist() == [1, 0, 0]


@pytest.mark.parametrize("bad, match", [
    ({"share": 0}, "share"), ({"threshold": 2.0}, "threshold"),
    ({"action": "boost"}, "action"), ({"repeat": 1}, "repeat"), ({"top_n": 0}, "top_n"),
    ({"treshold": 0.5}, "unknown key"),
])
def test_bad_rules_name_the_key(bad, match):
    with pytest.raises(CleaningError, match=match):
        CleaningRule.from_mapping(bad)


def test_decision_round_trip(tmp_path):
    rule = CleaningRule(share=0.5, repeat=3)
    d = write_decision(tmp_path, 2, 2, rows=[4, 7, 9, 11], sim_fps=[0.2, 0.8, 0.9, 0.1], has_fps=[True] * 4, rule=rule)
    assert d["flagged"] == 2 and d["weights"] == {"7": 3, "9": 3}
    assert load_row_weights(tmp_path) == {2: {7: 3, 9: 3}}
    assert load_row_weights(tmp_path / "absent") == {}
    (tmp_path / "stage_3.json").write_text("{not json")
    with pytest.raises(CleaningError, match="stage_3.json"):
        load_row_weights(tmp_path)


def test_weighted_stage_draws_flagged_rows_more_often_and_other_stages_are_unchanged():
    s = schedule()
    pools = {1: [0, 1], 2: [2, 3, 4, 5], 3: [6, 7]}
    plain = CurriculumOrder(s, n_rows=8, batch_size=2, seed=3, rows_by_context=pools)
    weighted = CurriculumOrder(s, n_rows=8, batch_size=2, seed=3, rows_by_context=pools,
                               row_weights={2: {3: 3, 5: 0}})
    per_stage = collections.defaultdict(collections.Counter)
    for pos in range(len(weighted)):
        row, stage, _ = weighted.locate(pos)
        per_stage[stage.index][row] += 1
        if stage.index != 2:  # stages without a decision draw exactly as before
            assert plain.locate(pos)[0] == row
    # stage 2: 12 draws from the pool [2, 3, 3, 3, 4] (two full passes + 2)
    assert set(per_stage[2]) <= {2, 3, 4} and per_stage[2][3] >= 6 and 5 not in per_stage[2]
    assert weighted.stage_rows(s.stages[1]) == 3
    # deterministic: the same decision gives the same order (a resumed run draws the same rows)
    again = CurriculumOrder(s, n_rows=8, batch_size=2, seed=3, rows_by_context=pools, row_weights={2: {3: 3, 5: 0}})
    assert [again.locate(p)[0] for p in range(len(again))] == [weighted.locate(p)[0] for p in range(len(weighted))]


@pytest.mark.parametrize("weights, match", [({9: {0: 2}}, "stages 1..3"), ({2: {0: 2}}, "not one the stage draws"),
                                            ({2: {2: -1}}, "integer >= 0"), ({1: {0: 0, 1: 0}}, "no row")])
def test_bad_row_weights_are_refused(weights, match):
    with pytest.raises(ScheduleError, match=match):
        CurriculumOrder(schedule(), n_rows=8, batch_size=2, rows_by_context={1: [0, 1], 2: [2, 3, 4, 5], 3: [6, 7]},
                        row_weights=weights)


def test_rows_by_context_is_the_dataset_rule():
    out = rows_by_context([1, 0, 0, 2], [3, 2, 0, 2], [1, 2, 3, 3], how="assigned")
    assert out == {1: [0], 2: [1], 3: [3]}  # row 2 has no dislike at all: no context
    assert rows_by_context([1, 0, 0, 2], [3, 2, 0, 2], None, how="eligible") == {1: [0, 3], 2: [0, 1, 3],
                                                                                 3: [0, 1, 3]}
    with pytest.raises(ScheduleError, match="row 1 has no extra_info.context"):
        rows_by_context([1, 0], [1, 1], [1, None])


def test_screening_with_a_real_model_writes_the_decision(tmp_path, tiny_model_dir):
    """The stage's rows (same rule as the dataset), answered by the model in the stage's context,
    scored against future likes with the reward's embeddings; the CLI refuses to redo a decision."""
    from conrec_verl.cleaning import main, read_rl_rows
    from conrec_verl.core.scoring import Scorer
    from conrec_verl.core.sid import Codebook
    from conrec_verl.smoke import write_smoke_dataset

    data = write_smoke_dataset(tmp_path / "data", n_train=48)
    out = tmp_path / "clean"
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--stage", "2", "--context", "2", "--out", str(out),
            "--share", "0.5", "--max-prompt-tokens", "384", "--device", "cpu"]
    assert main(args) == 0
    d = json.loads((out / "stage_2.json").read_text())
    rows = read_rl_rows(data / "rl" / "train.parquet")
    expected = rows_by_context([len(r["hist_neg_recent"]) for r in rows], [len(r["hist_neg"]) for r in rows],
                               [r["extra_info"]["context"] for r in rows])[2]
    assert d["screened"] == len(expected) and d["context"] == 2
    assert d["flagged"] == int(0.5 * d["rows_with_future_likes"]) and len(d["weights"]) == d["flagged"]
    assert set(map(int, d["weights"])) <= set(expected) and set(d["weights"].values()) == {2}
    # the flagged rows' answers are at least as close to their future likes as any unflagged row's
    sims = {int(r): x for r, x in d["sim_fps_by_row"].items()}
    flagged = {int(r) for r in d["weights"]}
    assert min(sims[r] for r in flagged) >= max(x for r, x in sims.items() if r not in flagged)
    assert d["sim_fps_flagged_min"] == pytest.approx(min(sims[r] for r in flagged), abs=1e-4)
    scorer = Scorer(Codebook.load(data / "codebook.npz"))
    assert all(scorer.targets(rows[int(r)]["reward_model"]["ground_truth"]).fps for r in d["weights"])
    assert main(args) == 2  # a stage's decision never changes once written
    assert main([*args, "--overwrite", "--threshold", "1.0"]) == 0
    assert json.loads((out / "stage_2.json").read_text())["rule"]["threshold"] == 1.0
