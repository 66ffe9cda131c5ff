"""The data contract (``conrec_verl.core.contract``): one writer and one parser of the ground truth
that are inverse to each other on real rows, errors that name the key, rows that fit the schema,
and the documentation listing the same fields."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conrec_verl.core.contract import (
    EVAL_SCHEMA,
    RL_SCHEMA,
    GroundTruth,
    GroundTruthError,
    ground_truth_sids,
    missing_rl_columns,
    parse_ground_truth,
    renamed_option,
    rl_record,
    row_context,
)

ROOT = Path(__file__).resolve().parents[2]
A, B, C = "<a_1><b_2><c_3>", "<a_4><b_5><c_6>", "<a_7><b_8><c_9>"


def test_writer_and_parser_are_inverse_and_keep_the_documented_key_order():
    gt = GroundTruth(future_neg=(A, B), swing=(C,), future_pos=(B,), next_neg=A, long_tail_items=(B,),
                     n_future_neg_cold=2, n_future_neg=4, sid_build="abc")
    text = gt.to_json()
    assert GroundTruth.parse(text) == gt and GroundTruth.parse(json.loads(text)) == gt
    assert list(json.loads(text)) == [f.name for f in dataclasses.fields(GroundTruth)]
    # optional keys are left out when unknown, and come back as unknown
    bare = GroundTruth(future_neg=(A,))
    assert "n_future_neg" not in json.loads(bare.to_json()) and GroundTruth.parse(bare.to_json()) == bare


@pytest.mark.parametrize("value, key", [
    ({"future_neg": [A, 3]}, "future_neg"),
    ({"future_neg": A + B}, "future_neg"),
    ({"future_pos": {"x": 1}}, "future_pos"),
    ({"next_neg": 5}, "next_neg"),
    ({"n_future_neg_cold": "2"}, "n_future_neg_cold"),
    ({"n_future_neg": True}, "n_future_neg"),
])
def test_a_wrong_type_is_an_error_naming_the_key(value, key):
    with pytest.raises(GroundTruthError, match=rf"ground_truth\.{key}\b"):
        GroundTruth.parse(json.dumps(value))


@pytest.mark.parametrize("value, match", [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                                          (7, "JSON string or a dict")])
def test_what_is_not_a_json_object_is_one_error(value, match):
    with pytest.raises(GroundTruthError, match=match):
        parse_ground_truth(value)


def test_the_lenient_sid_view_the_scorer_uses():
    gt = {"future_neg": [A, 3, None, B], "next_neg": C, "swing": None}
    assert ground_truth_sids(gt, "future_neg") == [A, B]
    assert ground_truth_sids(gt, "next_neg") == [C] and ground_truth_sids(gt, "swing") == []
    assert ground_truth_sids(gt, "missing") == []


def test_rows_of_the_writer_fit_the_schemas(tmp_path):
    row = rl_record(prompt_text="p", ground_truth=GroundTruth(future_neg=(A,)),
                    extra_info={"split": "train", "index": 0, "user_id": "u", "cutoff_day": 20220101, "context": 1,
                                "long_tail_user": False, "sid_build": "abc", "window_days": 7, "n_hist_neg": 1},
                    hist_neg_recent=[A], hist_neg=[A], hist_pos=[B])
    table = pa.Table.from_pylist([row], schema=RL_SCHEMA)
    pq.write_table(table, tmp_path / "rl.parquet")
    back = pq.read_table(tmp_path / "rl.parquet").to_pylist()[0]
    assert back == row and missing_rl_columns(table.column_names) == []
    assert missing_rl_columns(["hist_neg", "reward_model"]) == ["hist_neg_recent", "hist_pos"]
    pa.Table.from_pylist([{**row, "candidates": [A, B], "candidate_target": 0}], schema=EVAL_SCHEMA)


def test_every_ground_truth_of_a_written_folder_round_trips(tmp_path):
    """What the producers write, the one parser reads back to the same string (smoke data here;
    data_prep's bundled-sample folder is compared byte for byte in tests/data_prep)."""
    from conrec_verl.smoke import write_smoke_dataset

    data = write_smoke_dataset(tmp_path / "d", n_train=16, n_val=4)
    for split in ("train", "val"):
        for rm in pq.read_table(data / "rl" / f"{split}.parquet", columns=["reward_model"]).column(0).to_pylist():
            text = rm["ground_truth"]
            assert GroundTruth.parse(text).to_json() == text


def test_the_data_format_doc_lists_every_ground_truth_field():
    doc = (ROOT / "docs" / "data-format.md").read_text()
    block = doc[doc.index("`ground_truth` JSON"):]
    block = block[:block.index("```", block.index("```") + 3)]
    documented = re.findall(r'"([a-z_]+)":', block)
    assert documented == [f.name for f in dataclasses.fields(GroundTruth)]


def test_row_context_reads_the_field_and_its_old_name():
    assert row_context({"context": 2, "stage": 1}) == 2
    assert row_context({"stage": 1}) == 1  # a folder written before the rename
    assert row_context({}) is None and row_context(None) is None


def test_renamed_option_reads_the_old_name_and_refuses_a_disagreement():
    assert renamed_option({"new": 1}, "new", "old", default=3) == 1
    assert renamed_option({"old": 2}, "new", "old", default=3) == 2
    assert renamed_option({"new": 3, "old": 2}, "new", "old", default=3) == 2  # a default yields to the old name
    assert renamed_option({}, "new", "old", default=3) == 3
    with pytest.raises(ValueError, match=r"rl.new=1 and its old name rl.old=2 disagree; set only rl.new"):
        renamed_option({"new": 1, "old": 2}, "new", "old", default=3, where="rl.")
