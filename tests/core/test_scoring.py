"""Pure scorer: every reward variant against independently computed values, parsing rules, and a
property test that no text makes it raise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conrec_verl.core.contract import GroundTruthError
from conrec_verl.core.reward import VARIANTS, RewardConfig, ScoringConfigError
from conrec_verl.core.scoring import Scorer
from conrec_verl.core.sid import best_prefix_depth, exact_hit, prefix_depth
from tests.sid_fixtures import ground_truth, make_codebook, sid

BOOK = make_codebook()


def cos(a, b):
    a = BOOK.embed(a)
    b = BOOK.embed(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


GTS = [(1, 2, 3), (0, 4, 5)]
SWING = [(3, 3, 3)]
FPS = [(2, 1, 0), (1, 2, 4)]
GT = ground_truth([sid(*c) for c in GTS], [sid(*c) for c in SWING], [sid(*c) for c in FPS])


def expected_terms(out):
    s_g = max(cos(out, t) for t in GTS + SWING)
    s_f = max(cos(out, t) for t in FPS)
    return s_g, s_f


@pytest.mark.parametrize("out", [(1, 2, 3), (1, 2, 4), (2, 1, 1), (3, 0, 5)])
def test_collab_is_max_cos_gts_minus_gamma_max_cos_fps(out):
    scorer = Scorer(BOOK, RewardConfig(variant="collab", gamma=0.7))
    s_g, s_f = expected_terms(out)
    r = scorer.score(f"answer: {sid(*out)}", GT)
    assert r.valid
    assert r.reward == pytest.approx(s_g - 0.7 * s_f, abs=1e-5)
    assert r.sim_gts == pytest.approx(s_g, abs=1e-5)
    assert r.sim_fps == pytest.approx(s_f, abs=1e-5)


@pytest.mark.parametrize("out", [(1, 2, 3), (2, 1, 1), (3, 0, 5), (0, 0, 0)])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 0.95])
def test_truncated_variants(out, threshold):
    s_g, s_f = expected_terms(out)
    trunc = lambda x: x if x >= threshold else 0.0  # noqa: E731
    neg_only = Scorer(BOOK, RewardConfig(variant="neg_only")).score(sid(*out), GT).reward
    neg_tr = Scorer(BOOK, RewardConfig(variant="neg_truncated", sim_threshold=threshold)).score(sid(*out), GT).reward
    dbl = Scorer(BOOK, RewardConfig(variant="double_truncated", sim_threshold=threshold, gamma=0.5)).score(
        sid(*out), GT).reward
    assert neg_only == pytest.approx(s_g, abs=1e-5)
    assert neg_tr == pytest.approx(trunc(s_g), abs=1e-5)
    assert dbl == pytest.approx(trunc(s_g) - 0.5 * trunc(s_f), abs=1e-5)


def test_truncation_really_truncates_something():
    # guard against a fixture in which the threshold never bites
    sims = [expected_terms(o)[0] for o in [(1, 2, 3), (2, 1, 1), (3, 0, 5), (0, 0, 0)]]
    assert min(sims) < 0.6 <= max(sims)


@pytest.mark.parametrize("out,depth", [((1, 2, 3), 3), ((3, 3, 3), 3), ((1, 2, 0), 2), ((0, 4, 1), 2),
                                       ((1, 0, 0), 1), ((2, 2, 2), 0)])
def test_hierarchical_prefix_rewards(out, depth):
    scorer = Scorer(BOOK, RewardConfig(variant="hierarchical"))
    r = scorer.score(sid(*out), GT)
    assert r.prefix_depth == depth
    assert r.exact_hit == (depth == 3)
    assert r.reward == pytest.approx({3: 1.0, 2: 0.1, 1: 0.01, 0: 0.0}[depth])
    custom = Scorer(BOOK, RewardConfig(variant="hierarchical", hier_weights=[0.2, 0.5, 2.0])).score(sid(*out), GT)
    assert custom.reward == pytest.approx({3: 2.0, 2: 0.5, 1: 0.2, 0: 0.0}[depth])


def test_hier_weights_must_match_levels():
    with pytest.raises(ScoringConfigError, match="hier_weights"):
        Scorer(BOOK, RewardConfig(variant="hierarchical", hier_weights=[1.0, 0.1]))


def test_exact_hit_and_gts_includes_swing():
    r = Scorer(BOOK).score(sid(3, 3, 3), GT)
    assert r.exact_hit and r.prefix_depth == 3 and r.sim_gts == pytest.approx(1.0, abs=1e-5)


def test_parsing_first_complete_sid_counts():
    scorer = Scorer(BOOK, RewardConfig(variant="hierarchical"))
    # partial SID first, then a complete one: the complete one counts
    assert scorer.parse_output("<a_1><b_2> then <a_1> <b_2>  <c_3> and <a_0><b_0><c_0>") == (1, 2, 3)
    # out-of-range codes are skipped, the next in-range SID counts
    assert scorer.parse_output("<a_9><b_0><c_0> <a_0><b_4><c_5>") == (0, 4, 5)
    # four levels is not a 3-level SID
    assert scorer.parse_output("<a_1><b_2><c_3><d_4>") is None
    assert scorer.parse_output("garbage") is None
    # non-canonical spelling is not a token the model can emit
    assert scorer.parse_output("<a_0><b_00><c_0> <a_1><b_2><c_3>") == (1, 2, 3)
    assert scorer.parse_output(None) is None
    strict = Scorer(BOOK, RewardConfig(parse_mode="strict"))
    assert strict.parse_output("  <a_1><b_2><c_3>\n") == (1, 2, 3)
    assert strict.parse_output("it is <a_1><b_2><c_3>") is None


def test_invalid_output_gets_format_penalty_below_every_valid_reward():
    for variant in VARIANTS:
        cfg = RewardConfig(variant=variant, gamma=0.5)
        scorer = Scorer(BOOK, cfg)
        bad = scorer.score("no sid here <a_1><b_2>", GT)
        assert not bad.valid and bad.reward == cfg.lower_bound() - 0.5
        valid = [scorer.score(sid(a, b, c), GT).reward for a in range(4) for b in range(5) for c in range(6)]
        assert min(valid) >= cfg.lower_bound() - 1e-6
        assert bad.reward < min(valid)
    explicit = Scorer(BOOK, RewardConfig(format_penalty=-3.0)).score("", GT)
    assert explicit.reward == -3.0


def test_ground_truth_as_dict_or_json_and_empty_sets():
    as_dict = ground_truth([sid(*c) for c in GTS], [sid(*c) for c in SWING], [sid(*c) for c in FPS], as_json=False)
    scorer = Scorer(BOOK)
    assert scorer.score(sid(2, 1, 1), GT).reward == pytest.approx(scorer.score(sid(2, 1, 1), as_dict).reward)
    # no usable target: every output would score alike -- an error by default ...
    for no_target in (ground_truth([], [], []), "{}", '{"answer": "72"}', ground_truth(["<a_99><b_0><c_0>"], [], [])):
        with pytest.raises(GroundTruthError, match="no usable target SID under future_neg/swing"):
            scorer.score(sid(2, 1, 1), no_target)
    # ... or similarity 0, counted, where the user asks for it
    lenient = Scorer(BOOK, RewardConfig.from_mapping({"empty_targets": "zero"}))
    empty = lenient.score(sid(2, 1, 1), ground_truth([], [], []))
    assert empty.valid and empty.reward == 0.0 and empty.sim_gts == 0.0 and empty.sim_fps == 0.0
    assert lenient.n_empty_targets == 1
    with pytest.raises(ScoringConfigError, match="empty_targets 'skip' unknown"):
        RewardConfig(empty_targets="skip")
    # a malformed SID inside the ground truth is skipped and counted, not fatal
    t = scorer.targets(ground_truth(["<a_1><b_2>", sid(1, 2, 3)], [], ["<a_99><b_0><c_0>"]))
    assert t.gts == ((1, 2, 3),) and t.fps == () and t.n_invalid == 2


def test_ground_truth_of_another_sid_build_is_refused():
    other = ground_truth([sid(1, 2, 3)], sid_build="0123456789abcdef")
    with pytest.raises(GroundTruthError, match="SID build '0123456789abcdef' but the codebook has fingerprint"):
        Scorer(BOOK).score(sid(1, 2, 3), other)
    assert Scorer(BOOK, RewardConfig(check_sid_build=False)).score(sid(1, 2, 3), other).exact_hit
    assert Scorer(BOOK).score(sid(1, 2, 3), ground_truth([sid(1, 2, 3)], sid_build="")).exact_hit


def test_bad_ground_truth_is_a_clear_error():
    with pytest.raises(GroundTruthError, match="not valid JSON"):
        Scorer(BOOK).score(sid(1, 2, 3), "{not json")
    with pytest.raises(GroundTruthError, match="must be a JSON object"):
        Scorer(BOOK).score(sid(1, 2, 3), "[1, 2]")


def test_config_validation():
    with pytest.raises(ScoringConfigError, match="variant"):
        RewardConfig(variant="nope")
    with pytest.raises(ScoringConfigError, match="unknown reward option"):
        RewardConfig.from_mapping({"gama": 1.0})
    cfg = RewardConfig.from_mapping({"variant": "neg_only", "gamma": "2", "codebook_path": "x"}, ignore=["codebook_path"])
    assert cfg.variant == "neg_only" and cfg.gamma == 2.0


def test_prefix_helpers_unchanged():
    assert prefix_depth((1, 2, 3), (1, 2, 4)) == 2
    assert best_prefix_depth((1, 2, 3), []) == 0
    assert exact_hit((1, 2, 3), [(1, 2, 3)]) and not exact_hit((1, 2, 3), [(1, 2)])


SID_PIECES = st.sampled_from(["<a_1>", "<b_2>", "<c_3>", "<a_0>", "<b_4>", "<c_5>", "<a_99999>", "<d_1>", " ", "\n",
                              "<a_", "_1>", "<", ">", "a", "<a_-1>", "<b_0000001>"])
TEXTS = st.one_of(st.text(max_size=200), st.lists(SID_PIECES, max_size=30).map("".join),
                  st.binary(max_size=50), st.none(), st.integers(), st.floats(allow_nan=True))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, variant=st.sampled_from(VARIANTS), mode=st.sampled_from(["first", "strict"]))
def test_never_raises_and_reward_is_bounded(text, variant, mode):
    cfg = RewardConfig(variant=variant, parse_mode=mode)
    r = Scorer(BOOK, cfg).score(text, GT)
    assert math.isfinite(r.reward)
    if r.valid:
        assert cfg.lower_bound() - 1e-5 <= r.reward <= 1.0 + 1e-5
        assert r.sid and isinstance(text, str) and r.sid in "".join(text.split())
    else:
        assert r.reward == cfg.effective_format_penalty()
    info = r.as_extra_info()
    assert set(info) == {"valid_sid", "non_item_sid", "exact_hit", "future_neg_hit", "prefix_depth", "sim_gts",
                         "sim_fps"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in info.values())


@pytest.mark.parametrize("variant", ["collab", "neg_only", "hierarchical"])
@pytest.mark.parametrize("out", [(1, 2, 3), (3, 3, 3), (2, 1, 1)])
def test_next_neg_targets_score_against_the_single_next_dislike_only(variant, out):
    nxt = (0, 4, 5)
    gt = ground_truth([sid(*c) for c in GTS], [sid(*c) for c in SWING], [sid(*c) for c in FPS], next_neg=sid(*nxt))
    r = Scorer(BOOK, RewardConfig(variant=variant, targets="next_neg")).score(sid(*out), gt)
    s_g, s_f = cos(out, nxt), max(cos(out, t) for t in FPS)
    expected = {"collab": s_g - 0.5 * s_f, "neg_only": s_g,
                "hierarchical": [0.0, 0.01, 0.1, 1.0][prefix_depth(out, nxt)]}[variant]
    assert r.valid
    assert r.reward == pytest.approx(expected, abs=1e-5)
    assert r.sim_gts == pytest.approx(s_g, abs=1e-5)
    assert r.exact_hit == (out == nxt)
    # the default target set still sees future_neg ∪ swing: (1, 2, 3) and (3, 3, 3) are exact hits there
    default = Scorer(BOOK, RewardConfig(variant=variant)).score(sid(*out), gt)
    assert default.exact_hit == (out in GTS + SWING)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("targets", ["gts", "next_neg"])
@pytest.mark.parametrize("out", [(1, 2, 3), (0, 4, 5), (3, 3, 3), (1, 2, 4), (2, 1, 1)])
def test_hit_bonus_is_added_for_a_future_dislike_only(variant, targets, out):
    """The bonus goes to an output that is one of the row's future dislikes (the next one under
    next_neg), never to a Swing neighbour or a near miss; everything else about the score is as without it."""
    nxt = (0, 4, 5)
    gt = ground_truth([sid(*c) for c in GTS], [sid(*c) for c in SWING], [sid(*c) for c in FPS], next_neg=sid(*nxt))
    plain = Scorer(BOOK, RewardConfig(variant=variant, targets=targets)).score(sid(*out), gt)
    bonus = Scorer(BOOK, RewardConfig(variant=variant, targets=targets, hit_bonus=0.75)).score(sid(*out), gt)
    is_target = out == nxt if targets == "next_neg" else out in GTS
    assert plain.future_neg_hit == bonus.future_neg_hit == is_target
    assert bonus.reward == pytest.approx(plain.reward + (0.75 if is_target else 0.0), abs=1e-9)
    assert (bonus.exact_hit, bonus.sim_gts, bonus.sim_fps, bonus.prefix_depth) == \
        (plain.exact_hit, plain.sim_gts, plain.sim_fps, plain.prefix_depth)
    assert bonus.as_extra_info()["future_neg_hit"] == float(is_target)
    if out in SWING and targets == "gts":  # a Swing neighbour is an exact GTS hit but earns no bonus
        assert bonus.exact_hit and not bonus.future_neg_hit


def test_hit_bonus_keeps_invalid_outputs_and_the_invalid_count_unchanged():
    bad = ground_truth([sid(1, 2, 3), "<a_9><b_9><c_9>"], [], [sid(2, 1, 0)])
    cfg = RewardConfig(hit_bonus=1.0)
    scorer = Scorer(BOOK, cfg)
    assert scorer.targets(bad).n_invalid == 1  # counted once, not again for the hit set
    assert scorer.score("no sid here", bad).reward == cfg.effective_format_penalty()
    assert scorer.score(sid(1, 2, 3), bad).reward == pytest.approx(1.0 - 0.5 * cos((1, 2, 3), (2, 1, 0)) + 1.0,
                                                                    abs=1e-5)


@pytest.mark.parametrize("value", [-0.1, float("nan"), "x", True])
def test_hit_bonus_must_be_a_non_negative_number(value):
    with pytest.raises(ScoringConfigError, match="hit_bonus"):
        RewardConfig.from_mapping({"hit_bonus": value})
    assert RewardConfig.from_mapping({"hit_bonus": 2}).hit_bonus == 2.0


def test_next_neg_targets_with_no_next_dislike_is_an_empty_set():
    gt = ground_truth([sid(1, 2, 3)], [], [], next_neg=None)
    with pytest.raises(GroundTruthError, match="under next_neg"):
        Scorer(BOOK, RewardConfig(variant="neg_only", targets="next_neg")).score(sid(1, 2, 3), gt)
    r = Scorer(BOOK, RewardConfig(variant="neg_only", targets="next_neg", empty_targets="zero")).score(sid(1, 2, 3), gt)
    assert r.valid and r.reward == 0.0 and not r.exact_hit


def test_unknown_target_set_is_refused_and_targets_is_a_reward_kwarg():
    with pytest.raises(ScoringConfigError, match="targets 'future' unknown"):
        RewardConfig(targets="future")
    assert RewardConfig.from_mapping({"targets": "next_neg", "variant": "neg_only"}).targets == "next_neg"


@pytest.mark.parametrize("options, match", [
    ({"gamma": "abc"}, "gamma must be a finite number, got 'abc'"),
    ({"gamma": float("nan")}, "gamma must be a finite number"),
    ({"sim_threshold": None, "gamma": True}, "gamma must be a finite number, got True"),
    ({"hier_weights": [float("nan"), 1, 1], "variant": "hierarchical"}, "hier_weights must be a finite number"),
    ({"hier_weights": "1,1,1", "variant": "hierarchical"}, "hier_weights must be a list of numbers"),
    ({"format_penalty": "low"}, "format_penalty must be a finite number"),
    ({"check_sid_build": "no"}, "check_sid_build must be true or false"),
])
def test_reward_options_are_checked_for_type_and_finiteness(options, match):
    with pytest.raises(ScoringConfigError, match=match):
        RewardConfig.from_mapping(options)


def test_nan_hier_weights_are_refused_when_built_directly():
    with pytest.raises(ScoringConfigError, match="hier_weights must be a finite number"):
        RewardConfig(variant="hierarchical", hier_weights=(float("nan"), 1.0, 1.0))


# -- the reward-variant registry ------------------------------------------------------------------

@given(s_g=st.floats(-1, 1), s_f=st.floats(-1, 1), depth=st.integers(0, 3),
       gamma=st.floats(0, 2), threshold=st.floats(-1, 1))
def test_every_registered_variant_stays_above_its_lower_bound(s_g, s_f, depth, gamma, threshold):
    from conrec_verl.core.reward import REWARD_VARIANTS

    for name, variant in REWARD_VARIANTS.items():
        cfg = RewardConfig(variant=name, gamma=gamma, sim_threshold=threshold)
        reward = variant.fn(s_g, s_f, depth, cfg, cfg.effective_hier_weights(3))
        assert reward >= cfg.lower_bound() - 1e-12, name
        assert cfg.effective_format_penalty() < cfg.lower_bound()


def test_a_registered_variant_is_usable_by_name_in_one_place(monkeypatch):
    from conrec_verl.core import reward

    monkeypatch.setattr(reward, "REWARD_VARIANTS", dict(reward.REWARD_VARIANTS))

    @reward.register_reward_variant("fps_only", lower_bound=lambda c: -c.gamma)
    def fps_only(s_g, s_f, depth, config, hier_weights):
        """``-gamma * s_f``."""
        return -config.gamma * s_f

    book = make_codebook()
    scorer = Scorer(book, RewardConfig(variant="fps_only", gamma=1.0, check_sid_build=False))
    gt = ground_truth([sid(1, 2, 3)], [], [sid(1, 2, 3)])
    assert scorer.score(sid(1, 2, 3), gt).reward == pytest.approx(-1.0)
    assert scorer.score("garbage", gt).reward == pytest.approx(-1.5)  # lower bound - 0.5
    with pytest.raises(ValueError, match="already registered"):
        reward.register_reward_variant("collab", lower_bound=lambda c: 0.0)(fps_only)
    with pytest.raises(ScoringConfigError, match="unknown; choose one of"):
        RewardConfig(variant="nope")
