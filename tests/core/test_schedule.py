"""The pure progressive stage schedule and the curriculum order."""

from __future__ import annotations

import collections

import pytest
from omegaconf import OmegaConf

from conrec_verl.core.schedule import CurriculumOrder, ScheduleError, StageSchedule

CFG = {
    "kl_ref": 1e-3,
    "stages": [
        {"context": 1, "steps": 3, "beta": 1e-3},
        {"context": 2, "steps": 2, "beta": 5e-4, "norm_adv_by_std": False},
        {"context": 3, "steps": 4},
    ],
}


def test_stage_boundaries_and_lookup():
    s = StageSchedule.from_config(CFG)
    assert s.total_steps == 9 and s.boundaries == [4, 6]
    got = [s.stage_at(step).index for step in range(0, 12)]
    assert got == [1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert [s.stage_at(x).context for x in (1, 4, 6)] == [1, 2, 3]
    assert s.stage_at(4).norm_adv_by_std is False and s.stage_at(1).norm_adv_by_std is True


def test_advantage_scale_and_effective_beta():
    s = StageSchedule.from_config(dict(CFG, beta_via="advantage_scale"))
    assert s.advantage_scale(s.stage_at(1)) == pytest.approx(1.0)
    assert s.advantage_scale(s.stage_at(4)) == pytest.approx(2.0)
    assert s.advantage_scale(s.stage_at(7)) == 1.0 and s.effective_beta(s.stage_at(7)) == 1e-3
    # the default applies beta in the KL loss: advantages are never scaled
    k = StageSchedule.from_config(CFG)
    assert k.beta_via == "kl_loss" and all(k.advantage_scale(k.stage_at(x)) == 1.0 for x in range(1, 9))
    assert k.effective_beta(k.stage_at(4)) == s.effective_beta(s.stage_at(4))
    with pytest.raises(ValueError, match="beta_via"):
        StageSchedule.from_config(dict(CFG, beta_via="adam"))


def test_reads_omegaconf_with_interpolation():
    root = OmegaConf.create({"actor": {"kl_loss_coef": 0.002},
                             "algorithm": {"progressive_grpo": dict(CFG, kl_ref="${actor.kl_loss_coef}",
                                                                    beta_via="advantage_scale")}})
    s = StageSchedule.from_config(root.algorithm.progressive_grpo)
    assert s.kl_ref == 0.002 and s.advantage_scale(s.stage_at(5)) == pytest.approx(4.0)


@pytest.mark.parametrize("bad,match", [
    ({"stages": []}, "at least one stage"),
    ({}, "stages is required"),
    (None, "stages is required"),
    ({"stages": [{"steps": 0}]}, r"stages\[0\].steps"),
    ({"stages": [{"steps": 2, "context": 4}]}, r"stages\[0\].context"),
    ({"stages": [{"steps": 2, "beta": -1}], "kl_ref": 1}, r"stages\[0\].beta"),
    ({"stages": [{"steps": 2, "beta": 0.1}]}, "kl_ref is 0"),
    ({"stages": [{"steps": 2, "bta": 0.1}]}, "unknown key"),
    ({"stagez": []}, "unknown key"),
])
def test_invalid_config_names_the_key(bad, match):
    with pytest.raises(ScheduleError, match=match):
        StageSchedule.from_config(bad)


def test_curriculum_positions_follow_the_stage_and_cover_rows():
    s = StageSchedule.from_config(CFG)
    order = CurriculumOrder(s, n_rows=5, batch_size=4, seed=7)
    assert len(order) == 9 * 4
    by_stage = collections.defaultdict(list)
    for pos in range(len(order)):
        row, stage, step = order.locate(pos)
        assert step == pos // 4 + 1 and stage is s.stage_at(step)
        by_stage[stage.index].append(row)
    # each stage walks a permutation: the first n_rows items of a stage are all rows once
    for rows in by_stage.values():
        first = rows[:5]
        assert sorted(first) == list(range(5)) or len(rows) < 5
    # stage 2 has 8 items: one full pass then a second, differently seeded pass
    assert sorted(by_stage[2][:5]) == list(range(5))
    # deterministic in the seed, different for another seed
    again = CurriculumOrder(s, n_rows=5, batch_size=4, seed=7)
    other = CurriculumOrder(s, n_rows=5, batch_size=4, seed=8)
    rows7 = [again.locate(p)[0] for p in range(len(order))]
    assert rows7 == [order.locate(p)[0] for p in range(len(order))]
    assert rows7 != [other.locate(p)[0] for p in range(len(order))]
    with pytest.raises(IndexError):
        order.locate(len(order))


def test_curriculum_total_steps_override_extends_last_stage():
    s = StageSchedule.from_config(CFG)
    order = CurriculumOrder(s, n_rows=3, batch_size=2, total_steps=12)
    assert len(order) == 24 and order.locate(23)[1].index == 3


def test_untaught_contexts_names_every_asker_outside_the_taught_ones():
    from conrec_verl.core.schedule import untaught_contexts

    asked = {"GRPO stage a": 1, "GRPO stage b": 3, "eval row": None, "val rows": 2}
    assert untaught_contexts([2, 3], asked) == ["GRPO stage a (context 1)"]
    assert untaught_contexts([3], asked) == ["GRPO stage a (context 1)", "val rows (context 2)"]
    assert untaught_contexts([1, 2, 3], asked) == []
