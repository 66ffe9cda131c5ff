"""The SID dataset adapter built through verl's ``create_rl_dataset`` and iterated with verl's
sampler + stateful dataloader, including a resume in the middle of a stage."""

from __future__ import annotations

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

from conrec_verl.core import prompts
from conrec_verl.core.schedule import StageSchedule
from conrec_verl.plugins.dataset import ConrecDataError, ConrecSidDataset

from tests.sid_fixtures import make_rl_rows, write_parquet

B = 3
STAGES = "[{context: 1, steps: 3}, {context: 2, steps: 3}, {context: 3, steps: 2}]"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_ds")
    train = write_parquet(make_rl_rows(7, seed=2), str(d / "train.parquet"))
    val = write_parquet(make_rl_rows(4, seed=3), str(d / "val.parquet"))
    return train, val


@pytest.fixture(scope="module")
def cfg_for(compose, files):
    train, val = files

    def make(*extra, train_files=train, val_files=val):
        return compose([
            "data.custom_cls.path=pkg://conrec_verl.plugins.dataset",
            "data.custom_cls.name=ConrecSidDataset",
            "data.shuffle=false",
            f"data.train_batch_size={B}",
            "data.max_prompt_length=512",
            "data.seed=5",
            f"data.train_files={train_files}",
            f"data.val_files={val_files}",
            f"+algorithm.progressive_grpo.stages={STAGES}",
            "+data.conrec.schedule=${algorithm.progressive_grpo}",
            "+data.conrec.val_context=2",
            *extra,
        ])

    return make


def build(cfg, tokenizer, is_train=True):
    files = cfg.data.train_files if is_train else cfg.data.val_files
    return create_rl_dataset(files, cfg.data, tokenizer, None, is_train=is_train)


def context_of(text: str) -> int:
    if prompts.NEG_RECENT_HEADER in text:
        return 1
    return 3 if prompts.POS_HEADER in text else 2


def test_curriculum_items_belong_to_the_stage_of_their_step(cfg_for, tokenizer):
    cfg = cfg_for()
    ds = build(cfg, tokenizer)
    assert isinstance(ds, ConrecSidDataset) and isinstance(ds, RLHFDataset)
    schedule = StageSchedule.from_config(cfg.algorithm.progressive_grpo)
    assert len(ds) == schedule.total_steps * B
    loader = StatefulDataLoader(ds, batch_size=B, sampler=create_rl_sampler(cfg.data, ds), drop_last=True,
                                collate_fn=collate_fn, num_workers=0)
    seen_rows = {1: set(), 2: set(), 3: set()}
    for step, batch in enumerate(loader, start=1):
        stage = schedule.stage_at(step)
        for msgs, extra, rm in zip(batch["raw_prompt"], batch["extra_info"], batch["reward_model"]):
            text = msgs[0]["content"]
            assert context_of(text) == stage.context and extra["context"] == stage.context
            assert extra["conrec_step"] == step and extra["stage_index"] == stage.index
            assert text.endswith(prompts.INSTRUCTION)
            assert set(rm) == {"style", "ground_truth"}
            seen_rows[stage.context].add(extra["conrec_row"])
    assert step == schedule.total_steps
    # each stage draws exactly the rows data_prep assigned to its context (9 or 6 items cover them)
    rows = ds.dataframe
    for c in (1, 2, 3):
        assigned = {i for i, r in enumerate(rows) if r["extra_info"]["context"] == c}
        assert assigned and seen_rows[c] == assigned


def test_no_stage_shows_an_empty_negative_context(cfg_for, tokenizer, tmp_path):
    rows = make_rl_rows(9, seed=7)
    rows[0]["hist_neg"], rows[0]["hist_neg_recent"] = [], []       # no dislike: fits no context
    rows[1]["hist_neg_recent"] = []                                # no recent dislike: not context 1
    path = write_parquet(rows, str(tmp_path / "mixed.parquet"))
    ds = build(cfg_for("+data.conrec.stage_rows=eligible", train_files=path), tokenizer)
    drawn = {1: set(), 2: set(), 3: set()}
    for pos in range(len(ds)):
        item = ds[pos]
        text = item["raw_prompt"][0]["content"]
        neg_line = next(line for line in text.split("\n") if "not interested" in line and line != prompts.INSTRUCTION)
        assert not neg_line.endswith(prompts.EMPTY)
        drawn[item["extra_info"]["context"]].add(item["extra_info"]["conrec_row"])
    assert 0 not in set().union(*drawn.values()) and 1 not in drawn[1]
    with pytest.raises(ConrecDataError, match="has no extra_info.context"):
        bare = [dict(r, extra_info={k: v for k, v in r["extra_info"].items() if k != "context"}) for r in rows]
        build(cfg_for(train_files=write_parquet(bare, str(tmp_path / "bare.parquet"))), tokenizer)
    only2 = [dict(r, extra_info=dict(r["extra_info"], context=2)) for r in rows]
    with pytest.raises(ConrecDataError, match=r"stage 1 .* has no data row"):
        build(cfg_for(train_files=write_parquet(only2, str(tmp_path / "only2.parquet"))), tokenizer)


def test_a_folder_written_before_the_context_rename_draws_the_same_rows(cfg_for, tokenizer, files, tmp_path):
    """Rows whose extra_info still names the assigned context ``stage`` build the same curriculum."""
    import pyarrow.parquet as pq

    rows = pq.read_table(files[0]).to_pylist()
    old = [dict(r, extra_info={("stage" if k == "context" else k): v for k, v in r["extra_info"].items()})
           for r in rows]
    assert all("context" not in r["extra_info"] for r in old)
    new_ds = build(cfg_for(), tokenizer)
    old_ds = build(cfg_for(train_files=write_parquet(old, str(tmp_path / "old.parquet"))), tokenizer)
    assert len(old_ds) == len(new_ds) > 0
    for pos in range(len(new_ds)):
        a, b = new_ds[pos], old_ds[pos]
        assert a["raw_prompt"] == b["raw_prompt"] and a["extra_info"] == b["extra_info"]


def test_prompt_content_is_the_rows_history_for_the_stage(cfg_for, tokenizer, files):
    import pyarrow.parquet as pq

    rows = pq.read_table(files[0]).to_pylist()
    ds = build(cfg_for(), tokenizer)
    for pos in range(len(ds)):
        item = ds[pos]
        row = rows[item["extra_info"]["conrec_row"]]
        ctx = item["extra_info"]["context"]
        assert item["raw_prompt"][0]["content"] == prompts.render_history_prompt(
            ctx, row["hist_neg_recent"], row["hist_neg"], row["hist_pos"])
        assert item["reward_model"]["ground_truth"] == row["reward_model"]["ground_truth"]
        assert item["extra_info"]["user_id"] == row["extra_info"]["user_id"]


def test_validation_files_render_one_item_per_row_for_val_context(cfg_for, tokenizer):
    ds = build(cfg_for(), tokenizer, is_train=False)
    assert len(ds) == 4
    assert all(context_of(ds[i]["raw_prompt"][0]["content"]) == 2 for i in range(4))
    fixed = build(cfg_for("+data.conrec.mode=fixed", "+data.conrec.context=1"), tokenizer)
    assert len(fixed) == 7 and context_of(fixed[0]["raw_prompt"][0]["content"]) == 1
    # the keys' old names still work; both names with different values is an error
    old = build(cfg_for("+data.conrec.mode=fixed", "+data.conrec.stage=1"), tokenizer)
    assert [old[i]["raw_prompt"] for i in range(7)] == [fixed[i]["raw_prompt"] for i in range(7)]
    with pytest.raises(ConrecDataError, match="data.conrec.context=1 and its old name data.conrec.stage=2"):
        build(cfg_for("+data.conrec.mode=fixed", "+data.conrec.context=1", "+data.conrec.stage=2"), tokenizer)


def test_resume_in_the_middle_of_a_stage(cfg_for, tokenizer):
    cfg = cfg_for()
    schedule = StageSchedule.from_config(cfg.algorithm.progressive_grpo)

    def loader_for(ds):
        return StatefulDataLoader(ds, batch_size=B, sampler=create_rl_sampler(cfg.data, ds), drop_last=True,
                                  collate_fn=collate_fn, num_workers=0)

    uninterrupted = [[e["conrec_row"] for e in b["extra_info"]] for b in loader_for(build(cfg, tokenizer))]
    first = loader_for(build(cfg, tokenizer))
    it = iter(first)
    for _ in range(4):  # steps 1..4; step 4 is the first of stage 2 (steps 4-6)
        next(it)
    state = first.state_dict()
    # a fresh process: new dataset object, new loader, restored position
    resumed = loader_for(build(cfg, tokenizer))
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == schedule.total_steps - 4
    for step, batch in enumerate(rest, start=5):
        stage = schedule.stage_at(step)
        assert [e["conrec_step"] for e in batch["extra_info"]] == [step] * B
        assert all(context_of(m[0]["content"]) == stage.context for m in batch["raw_prompt"])
        assert [e["conrec_row"] for e in batch["extra_info"]] == uninterrupted[step - 1]
    assert schedule.stage_at(5).index == 2 and schedule.stage_at(7).index == 3


def test_truncates_oldest_history_to_fit_and_keeps_instruction(cfg_for, tokenizer, tmp_path):
    rows = make_rl_rows(2, seed=9, hist_len=(30, 31))
    path = write_parquet(rows, str(tmp_path / "long.parquet"))
    cfg = cfg_for("data.max_prompt_length=90", "+data.conrec.mode=fixed", "+data.conrec.context=3",
                  train_files=path)
    ds = build(cfg, tokenizer)
    for i in range(2):
        text = ds[i]["raw_prompt"][0]["content"]
        assert ds.prompt_length(text) <= 90
        assert text.endswith(prompts.INSTRUCTION)
        row = rows[i]
        kept_neg = text.split(prompts.NEG_ALL_HEADER)[1].split("\n")[0].split()
        assert 0 < len(kept_neg) < len(row["hist_neg"])
        assert kept_neg == row["hist_neg"][-len(kept_neg):]  # newest kept, oldest dropped
    with pytest.raises(ConrecDataError, match="max_prompt_length=10 is smaller"):
        build(cfg_for("data.max_prompt_length=10", "+data.conrec.stage_rows=eligible", train_files=path), tokenizer)


def test_works_with_a_saved_and_reloaded_hf_tokenizer(cfg_for, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ds = build(cfg_for(), reloaded)
    text = ds[0]["raw_prompt"][0]["content"]
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    sids = [t for t in text.split() if t.startswith("<a_")]
    assert sids and all(reloaded.convert_ids_to_tokens(reloaded(s, add_special_tokens=False)["input_ids"])[0]
                        .startswith("<a_") for s in sids[:3])
    assert reloaded.decode(ids) == text


def test_missing_column_is_named(cfg_for, tokenizer, tmp_path):
    rows = make_rl_rows(2)
    for r in rows:
        del r["hist_pos"]
    path = write_parquet(rows, str(tmp_path / "nopos.parquet"))
    with pytest.raises(ConrecDataError, match=r"nopos.parquet: missing column\(s\) \['hist_pos'\]"):
        build(cfg_for(train_files=path), tokenizer)


def test_unknown_sid_token_names_file_column_row(cfg_for, tmp_path):
    from conrec_verl.model_builder import build_tokenizer

    small = build_tokenizer((4, 5, 4))  # level c only has codes 0..3
    rows = make_rl_rows(6, seed=4)
    # find where the first c-code >= 4 occurs, to know which file/column/row the error must name
    for i, r in enumerate(rows):
        for col in ("hist_neg_recent", "hist_neg", "hist_pos"):
            bad = [s for s in r[col] if int(s.split("<c_")[1][:-1]) >= 4]
            if bad:
                break
        if bad:
            break
    path = write_parquet(rows, str(tmp_path / "sids.parquet"))
    with pytest.raises(ConrecDataError, match=rf"sids.parquet: column '{col}', row {i}: SID .* tokenizer does not know"):
        build(cfg_for(train_files=path), small)


def test_bad_rows_and_config_are_clear_errors(cfg_for, tokenizer, tmp_path):
    rows = make_rl_rows(3)
    rows[2]["reward_model"] = {"style": "rule", "ground_truth": "{oops"}
    path = write_parquet(rows, str(tmp_path / "gt.parquet"))
    with pytest.raises(ConrecDataError, match=r"gt.parquet: column 'reward_model.ground_truth', row 2"):
        build(cfg_for(train_files=path), tokenizer)
    rows = make_rl_rows(3)
    rows[1]["hist_neg"] = ["<a_1><b_1>x"]
    path = write_parquet(rows, str(tmp_path / "sid.parquet"))
    with pytest.raises(ConrecDataError, match=r"column 'hist_neg', row 1: .* is not a SID"):
        build(cfg_for(train_files=path), tokenizer)
    with pytest.raises(ConrecDataError, match="data.shuffle must be false"):
        build(cfg_for("data.shuffle=true"), tokenizer)
    with pytest.raises(ConrecDataError, match="unknown key"):
        build(cfg_for("+data.conrec.stagee=1"), tokenizer)


def test_tokenizer_without_chat_template_counts_plain_text(cfg_for, tokenizer, tmp_path):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ds = build(cfg_for("data.max_prompt_length=90", "+data.conrec.mode=fixed", "+data.conrec.stage=3"), plain)
    text = ds[0]["raw_prompt"][0]["content"]
    assert ds.prompt_length(text) == len(plain(text, add_special_tokens=False)["input_ids"]) <= 90
    templated = build(cfg_for("data.max_prompt_length=90", "+data.conrec.mode=fixed", "+data.conrec.stage=3"),
                      tokenizer)
    # the chat template's tokens count against the budget: it keeps fewer history items
    assert len(templated[0]["raw_prompt"][0]["content"]) < len(text)


def test_same_items_with_dataloader_worker_processes(cfg_for, tokenizer):
    import pickle

    cfg = cfg_for()
    ds = build(cfg, tokenizer)
    clone = pickle.loads(pickle.dumps(ds))  # what a "spawn" dataloader worker receives
    assert [clone[i]["raw_prompt"] for i in range(len(ds))] == [ds[i]["raw_prompt"] for i in range(len(ds))]

    def rows(num_workers):
        loader = StatefulDataLoader(ds, batch_size=B, sampler=create_rl_sampler(cfg.data, ds), drop_last=True,
                                    collate_fn=collate_fn, num_workers=num_workers)
        return [[e["conrec_row"] for e in b["extra_info"]] for b in loader]

    assert rows(2) == rows(0)


def test_cleaning_decisions_reweight_their_stage_through_verls_dataloader(cfg_for, tokenizer, tmp_path):
    """``data.conrec.row_weights``: a stage with a decision draws its flagged rows ``repeat`` times
    (and never its dropped rows); the other stages draw exactly as without it."""
    from conrec_verl.core.cleaning import CleaningRule, write_decision

    plain = build(cfg_for("data.train_batch_size=2"), tokenizer)
    pool2 = [i for i, r in enumerate(plain.dataframe) if r["extra_info"]["context"] == 2]
    assert len(pool2) >= 2
    write_decision(tmp_path, 2, 2, rows=pool2, sim_fps=[1.0] + [0.0] * (len(pool2) - 1), has_fps=[True] * len(pool2),
                   rule=CleaningRule(threshold=0.9, repeat=4))
    write_decision(tmp_path, 3, 3, rows=[0], sim_fps=[0.0], has_fps=[True], rule=CleaningRule(threshold=0.9))
    ds = build(cfg_for("data.train_batch_size=2", f"+data.conrec.row_weights={tmp_path}"), tokenizer)
    schedule = StageSchedule.from_config(ds.conrec_cfg["schedule"])
    stage2 = schedule.stages[1]
    drawn = [ds[p]["extra_info"]["conrec_row"] for p in range((stage2.start_step - 1) * 2, stage2.end_step * 2)]
    assert drawn.count(pool2[0]) >= min(4, len(drawn) - (len(pool2) - 1))  # 4 of the 5-plus pool slots
    for p in range(len(ds)):
        if not (stage2.start_step - 1) * 2 <= p < stage2.end_step * 2:
            assert ds[p]["extra_info"]["conrec_row"] == plain[p]["extra_info"]["conrec_row"]
    with pytest.raises(ConrecDataError, match="not one the stage draws"):
        write_decision(tmp_path, 1, 1, rows=[pool2[0]], sim_fps=[1.0], has_fps=[True], rule=CleaningRule(threshold=0.9))
        build(cfg_for("data.train_batch_size=2", f"+data.conrec.row_weights={tmp_path}"), tokenizer)
