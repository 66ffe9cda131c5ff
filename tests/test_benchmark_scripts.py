"""The benchmark scripts still run (tiny sizes; their timings are not asserted)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(BENCH / name), run_name="__main__")
    return capsys.readouterr().out


def test_bench_neg_filter_runs_and_agrees(monkeypatch, capsys):
    out = run_script("bench_neg_filter.py", ["--users", "50", "--cands", "7", "--items", "300", "--sizes", "8,8,8"],
                     monkeypatch, capsys)
    assert "results agree: True" in out and "speed-up" in out


def test_bench_constrained_decoding_runs(monkeypatch, capsys):
    out = run_script("bench_constrained_decoding.py",
                     ["--device", "cpu", "--sizes", "8,8,8", "--items", "100", "--prompts", "2", "--batch-size", "2",
                      "--k", "5", "--hidden", "32", "--layers", "1"], monkeypatch, capsys)
    assert "constrained beam search:" in out and "invalid-SID rate 0.000" in out
    assert "valid and distinct: True" in out


def test_bench_catalogue_scores_agree_and_a_negative_tolerance_fails(monkeypatch, capsys):
    args = ["--sizes", "4,4,4", "--items", "30", "--prompts", "2", "--prompt-items", "5", "--chunk", "7"]
    with pytest.raises(SystemExit) as done:
        run_script("bench_catalogue_scores.py", args, monkeypatch, capsys)
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "speed-up" in out and "prompts whose top 20 items agree: 1.000" in out
    with pytest.raises(SystemExit) as done:  # the agreement check is what decides the exit status
        run_script("bench_catalogue_scores.py", [*args, "--tolerance", "-1"], monkeypatch, capsys)
    assert done.value.code == 1


def test_bench_quality_section_writer(tmp_path):
    mod = runpy.run_path(str(BENCH / "bench_quality.py"))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nintro\n\n<!-- quality:begin -->\nold\n<!-- quality:end -->\n\n## Speed\nkept\n")
    mod["write_section"](target, "new table")
    text = target.read_text()
    assert "new table" in text and "old" not in text and "## Speed\nkept" in text and "intro" in text
    assert mod["prompt_for"]([], "ml100k") == "3,384"
    assert mod["prompt_for"](["kuairand:2,504"], "kuairand") == "2,504"
    assert mod["prompt_for"](["kuairand:2,504"], "ml100k") == "3,384"
    fresh = tmp_path / "NEW.md"
    mod["write_section"](fresh, "first")
    assert "<!-- quality:begin -->\nfirst\n<!-- quality:end -->" in fresh.read_text()
    with pytest.raises(SystemExit):
        sys_argv = sys.argv
        try:
            sys.argv = ["bench_quality.py", "--datasets", "nope"]
            mod["main"]()
        finally:
            sys.argv = sys_argv


def test_bench_quality_training_time_sums_the_phases_that_made_a_model(tmp_path):
    import json

    mod = runpy.run_path(str(BENCH / "bench_quality.py"))
    parent, branch = tmp_path / "ml", tmp_path / "ml-grpo_neg_only"
    done = {"data": {"seconds": 5.0}, "model": {"seconds": 8.0},
            "sft_translation": {"seconds": 1.0, "skipped": True},
            "sft_warmup": {"seconds": 100.0, "path": str(parent / "models" / "sft_warmup")},
            "grpo": {"seconds": 200.0, "path": str(parent / "models" / "grpo")}, "eval": {"seconds": 60.0}}
    (parent / "models").mkdir(parents=True)
    (parent / "pipeline.json").write_text(json.dumps({"done": done}))
    branch_done = {k: v for k, v in done.items() if k not in ("grpo", "eval")}
    branch_done["grpo"] = {"seconds": 50.0, "path": str(branch / "models" / "grpo")}
    (branch / "models").mkdir(parents=True)
    (branch / "pipeline.json").write_text(json.dumps({"done": branch_done}))
    assert mod["training_time"](str(parent / "models" / "sft_warmup")) == (114.0, ["data", "model", "sft_warmup"])
    assert mod["training_time"](str(parent / "models" / "grpo")) == (314.0, ["data", "model", "sft_warmup", "grpo"])
    assert mod["training_time"](str(branch / "models" / "grpo"))[0] == 164.0
    assert mod["training_time"](str(tmp_path / "elsewhere" / "model")) is None


def test_run_ablation_grpo_overrides_compose_with_the_recipe():
    """Every `grpo.overrides=[...]` of run_ablation.sh composes with the cpu_tiny GRPO recipe (a '+'
    on a key the recipe already defines fails only after SFT training, 30 minutes into the script)."""
    import re

    from hydra import compose, initialize_config_dir

    text = (BENCH / "run_ablation.sh").read_text()
    groups = re.findall(r'"grpo\.overrides=\[(.*?)\]"', text)
    assert len(groups) == 2
    seen = set()
    with initialize_config_dir(config_dir=str(BENCH.parent / "recipes" / "conrec" / "config"), version_base=None):
        for group in groups:
            cfg = compose("conrec_cpu_tiny", overrides=[*group.split(","), "data_dir=/d",
                                                        "actor_rollout_ref.model.path=/m"])
            kw = cfg.reward.reward_kwargs
            seen.add((kw.variant, kw.targets))
    assert seen == {("neg_only", "next_neg"), ("neg_only", "gts")}


def _run_ablation(tmp_path, env_extra):
    """run_ablation.sh with a stand-in python that only records its arguments (nothing trains)."""
    import os
    import subprocess

    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), WORK=str(tmp_path / "work"), DATASETS="kuairand", EVAL="0", **env_extra)
    proc = subprocess.run(["bash", str(BENCH / "run_ablation.sh")], env=env, capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_run_ablation_reuse_from_starts_the_default_run_from_the_named_folder(tmp_path):
    src = tmp_path / "shipped"
    proc, calls = _run_ablation(tmp_path, {"REUSE_FROM": f"kuairand={src}"})
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "work" / "kuairand"
    first = calls[0].split()
    assert first[:2] == ["-m", "conrec_verl.pipeline"]
    assert first[first.index("--run-dir") + 1] == str(run) and first[first.index("--from") + 1] == str(src)
    assert "--only" in first and first[first.index("--only") + 1] == "data"
    # the next call trains the default run's remaining phases in the same folder, and nothing else has --from src
    assert f"--run-dir {run} --only data,model" in calls[1]
    assert sum(f"--from {src}" in c for c in calls) == 1
    # without REUSE_FROM the default run is trained from scratch: no call starts from another folder's phases
    proc, calls = _run_ablation(tmp_path / "plain", {})
    assert proc.returncode == 0, proc.stderr
    assert f"--run-dir {tmp_path / 'plain' / 'work' / 'kuairand'} --only data,model" in calls[0]


@pytest.mark.parametrize("value, message", [("runs/ml100k_ship", "LOG=RUN_FOLDER"), ("kuairand=", "LOG=RUN_FOLDER"),
                                            ("kuairand=/a kuairnd=/b", "'kuairnd' is not one of DATASETS")])
def test_run_ablation_reuse_from_refuses_a_malformed_value_before_anything_runs(tmp_path, value, message):
    proc, calls = _run_ablation(tmp_path, {"REUSE_FROM": value})
    assert proc.returncode == 2 and message in proc.stderr
    assert calls == []


def test_grpo_stage_similarity_means_per_stage(tmp_path, monkeypatch, capsys):
    mod = runpy.run_path(str(BENCH / "grpo_stage_similarity.py"))
    lines = []
    for step, stage, gts, fps in [(1, 1, 0.2, 0.6), (2, 1, 0.4, 0.4), (3, 2, 0.9, 0.1)]:
        lines.append(f"(TaskRunner) step:{step} - training/conrec_stage:{stage} - reward_extra/sim_gts/mean:{gts} - "
                     f"reward_extra/sim_fps/mean:np.float64({fps}) - training/global_step:{step}")
    lines.append("step:9 - actor/loss:1.0")  # a line without the stage metric is not a training step of ours
    means = mod["stage_means"]("\n".join(lines))
    assert means[1]["steps"] == 2 and means[1]["sim_gts"] == pytest.approx(0.3) and means[1]["sim_fps"] == pytest.approx(0.5)
    assert means[2]["sim_gts"] == pytest.approx(0.9) and "exact_hit" not in means[2]
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "grpo.log").write_text("\n".join(lines))
    assert mod["main"]([f"x={run}"]) == 0
    assert "| x | 2 | 1 | 0.900 | 0.100 |" in capsys.readouterr().out


def test_refactor_check_reports_every_changed_file_and_score(tmp_path):
    import json

    sys.path.insert(0, str(BENCH))
    try:
        from refactor_check import compare
    finally:
        sys.path.remove(str(BENCH))
    for name, files, rewards in (("a", {"x": "1", "y": "2"}, [{"text": "t", "file": "f", "score": 1.0}]),
                                 ("b", {"x": "1", "y": "3", "z": "4"}, [{"text": "t", "file": "f", "score": 1.5}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "files.json").write_text(json.dumps(files))
        (tmp_path / name / "rewards.json").write_text(json.dumps(rewards))
    diffs = compare(tmp_path / "a", tmp_path / "b")
    assert [d.split(":")[0] for d in diffs] == ["data file y", "data file z", "reward of 't' (f)"]
    assert compare(tmp_path / "a", tmp_path / "a") == []
    # a manifest that only records a new option's config key is no difference, but is noted; any
    # other manifest change (a changed or removed key, a key outside config) is one
    for name, manifest in (("c", {"config": {"k": 1}, "counts": {"x": 3}}),
                           ("d", {"config": {"k": 1, "new": {"opt": 0.0}}, "counts": {"x": 3}}),
                           ("e", {"config": {"k": 2, "new": {"opt": 0.0}}, "counts": {"x": 3}}),
                           ("f", {"config": {"k": 1}, "counts": {"x": 3, "y": 1}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "files.json").write_text(json.dumps({"manifest.json": name, "x": "1"}))
        (tmp_path / name / "rewards.json").write_text("[]")
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    notes = []
    assert compare(tmp_path / "c", tmp_path / "d", notes) == []
    assert notes == ["manifest.json records new config key(s) config.new.opt (nothing else differs)"]
    for head in ("e", "f"):
        assert compare(tmp_path / "c", tmp_path / head) == ["data file manifest.json: bytes differ"]
    assert compare(tmp_path / "d", tmp_path / "c") == ["data file manifest.json: bytes differ"]


def test_average_checkpoints_is_the_parameter_mean_and_rejects_other_shapes(tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conrec_verl.model_builder import save_tiny_model

    a = save_tiny_model(tmp_path / "a", (4, 4, 4), seed=0)
    b = save_tiny_model(tmp_path / "b", (4, 4, 4), seed=1)
    out = tmp_path / "soup"
    run_script("average_checkpoints.py", ["--out", str(out), str(a), str(b)], monkeypatch, capsys)
    sa, sb, so = (load_file(str(d / "model.safetensors")) for d in (a, b, out))
    assert set(so) == set(sa)
    moved = 0
    for k in sa:
        assert torch.allclose(so[k], (sa[k] + sb[k]) / 2, atol=1e-6), k
        moved += not torch.equal(sa[k], sb[k])
    assert moved > 0  # the two seeds differ, so the mean is a new model
    assert (out / "config.json").read_text() == (b / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(out)  # loads as a model

    wide = save_tiny_model(tmp_path / "wide", (4, 4, 4), hidden_size=32, seed=0)
    with pytest.raises(SystemExit, match="shape"):
        run_script("average_checkpoints.py", ["--out", str(tmp_path / "bad"), str(a), str(wide)], monkeypatch, capsys)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        run_script("average_checkpoints.py", ["--out", str(tmp_path / "bad"), str(a), str(tmp_path / "nope")],
                   monkeypatch, capsys)


def test_fuse_rows_is_reciprocal_rank_fusion_and_refuses_a_file_of_another_build(tmp_path, monkeypatch, capsys):
    import json

    from conrec_verl.core.eval_data import load_eval_data
    from conrec_verl.core.sid import format_sid
    from conrec_verl.evaluation.predictions import write_predictions
    from tests.evaluation.fixtures import make_data_folder

    mod = runpy.run_path(str(BENCH / "fuse_rows.py"))
    # by hand, rrf_k = 1: b = 1/3 + 1/1, a = 1/1, c = 1/2 + 1/2 (ties with a: a was seen first), d = 1/4
    assert mod["fuse"]([["a", "c", "b"], ["b", "c", None, "d"]], 3, rrf_k=1) == ["b", "a", "c"]
    assert mod["fuse"]([["x", "y"], ["y", "x"]], 2, rrf_k=60) == ["x", "y"]  # a tie keeps the first list's order
    folder = make_data_folder(tmp_path / "data", n_users=12, n_items=30)
    data = load_eval_data(folder)
    cat = list(data.catalogue)
    one = write_predictions(tmp_path / "one.jsonl", data, [cat[:5] for _ in data.rows])
    two = write_predictions(tmp_path / "two.jsonl", data, [cat[4::-1] for _ in data.rows])
    out = tmp_path / "fused.jsonl"
    with pytest.raises(SystemExit) as ok:
        run_script("fuse_rows.py", ["--data", str(folder), "--out", str(out), "--k", "5", f"a={one}", f"b={two}"],
                   monkeypatch, capsys)
    assert ok.value.code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(data.rows)
    # cat[i] scores 1/(60+i) + 1/(64-i): the ends tie highest (first list's order), the middle lowest
    assert lines[0]["predictions"] == [format_sid(cat[i]) for i in (0, 4, 1, 3, 2)]
    other = [dict(json.loads(line), sid_build="other") for line in one.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(o) + "\n" for o in other))
    with pytest.raises(SystemExit) as err:
        run_script("fuse_rows.py", ["--data", str(folder), "--out", str(tmp_path / "no.jsonl"), "--k", "5",
                                    f"a={one}", f"b={bad}"], monkeypatch, capsys)
    assert err.value.code == 2 and not (tmp_path / "no.jsonl").exists()
    assert "another SID build" in capsys.readouterr().err


def test_likes_signal_probe_scores_match_a_brute_force_count(tmp_path):
    import numpy as np

    from conrec_verl.core.eval_data import load_eval_data
    from tests.evaluation.fixtures import make_data_folder

    mod = runpy.run_path(str(BENCH / "likes_signal_probe.py"))
    data = load_eval_data(make_data_folder(tmp_path / "data", n_users=12, n_items=30))
    probe = type("p", (mod["CoInteraction"],), {"pos_weight": 0.5})(exclusion="none").fit(data)
    got = probe.row_scores(range(len(data.rows)))
    sets = [(set(r.hist_neg), set(r.hist_pos)) for r in data.all_rows]
    neg = {s: sum(s in n for n, _ in sets) for s in data.catalogue}
    pos = {s: sum(s in p for _, p in sets) for s in data.catalogue}
    for i, row in enumerate(data.rows):
        for j, item in enumerate(data.catalogue):
            co = lambda h: sum(1 for n, p in sets if h in n | p and item in n | p) if h != item else 0
            want = sum(co(h) for h in row.hist_neg) + 0.5 * sum(co(h) for h in row.hist_pos)
            want = want * (neg[item] + 1) / (neg[item] + pos[item] + 5) + 1e-6 * neg[item]
            assert np.isclose(got[i, j], want), (i, item)


def test_step_table_flags_only_a_significant_drop_against_the_row_before():
    mod = runpy.run_path(str(BENCH / "bench_quality.py"))
    n = 40
    warm = [1.0] * 12 + [0.0] * (n - 12)
    align = [1.0] * 13 + [0.0] * (n - 13)             # +1 row: no drop
    grpo = [0.0] * 13 + [0.0] * (n - 13)              # loses all 13 rows: p = 2 * 0.5**13, a drop
    lines, ok = mod["step_table"]({"warm-up SFT": warm, "+ alignment": align}, 20)
    assert ok is True and any(line.startswith("| + alignment | 0.3250") and line.endswith("| no | no |") for line in lines)
    lines, ok = mod["step_table"]({"warm-up SFT": warm, "+ alignment": align, "+ positive penalty": grpo}, 20)
    row = next(line for line in lines if line.startswith("| + positive penalty |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "+ alignment (0.3250)" and cells[3] == "-0.3250" and cells[4:6] == ["0", "13"]
    assert float(cells[6]) == pytest.approx(2 * 0.5 ** 13, rel=0.02) and cells[-1] == "**yes**" and ok is False
    assert "rows not evaluated: + progressive GRPO, + future negative reward, + cross-stage cleaning" in "\n".join(lines)
    # steps are taken in Table 2's order, whatever the dict order; fewer than two rows: no table
    lines, ok = mod["step_table"]({"+ positive penalty": align, "warm-up SFT": warm}, 20)
    assert ok is True and "| + positive penalty | 0.3250" in "\n".join(lines)
    assert mod["step_table"]({"warm-up SFT": warm}, 20) == ([], None)
    with pytest.raises(ValueError, match="not paired"):
        mod["step_table"]({"warm-up SFT": warm, "+ alignment": align[:-1]}, 20)
    # a lower value within noise is no drop; a significant rise is none either
    less = [1.0] * 10 + [0.0] * (n - 10)              # 2 rows fewer: p = 0.5, and 0.30 is inside [.., ..]
    lines, ok = mod["step_table"]({"warm-up SFT": warm, "+ alignment": less}, 20)
    assert ok is True and next(line for line in lines if line.startswith("| + alignment")).endswith("| no | no |")
    more = [1.0] * 30 + [0.0] * (n - 30)              # 18 rows more: p < 1e-4, a rise
    lines, ok = mod["step_table"]({"warm-up SFT": warm, "+ alignment": more}, 20)
    assert ok is True and next(line for line in lines if line.startswith("| + alignment")).endswith("| no | no |")
    # the row before above the step's interval is a drop even where the paired test is not significant:
    # the two rows hit disjoint rows (0.20 vs 0.28 of 200: 40 vs 56 discordant, McNemar p = 0.13), and
    # 0.28 is above the step's interval (about 0.20 +- 0.055)
    base = [0.0] * 40 + [1.0] * 56 + [0.0] * 104
    worse = [1.0] * 40 + [0.0] * 160
    lines, ok = mod["step_table"]({"warm-up SFT": base, "+ alignment": worse}, 20)
    row = next(line for line in lines if line.startswith("| + alignment")).split("|")
    assert float(row[-4]) > 0.05
    assert ok is False and row[-3].strip() == "yes" and row[-2].strip() == "**yes**"


def test_paired_rows_reads_the_harness_files_and_counts_discordant_rows(tmp_path, monkeypatch, capsys):
    from conrec_verl.core.eval_data import load_eval_data
    from conrec_verl.evaluation.predictions import hit_samples, predictions_file, write_predictions
    from tests.evaluation.fixtures import make_data_folder

    folder = make_data_folder(tmp_path / "data", n_users=12, n_items=30)
    data = load_eval_data(folder)
    cat = list(data.catalogue)
    # a row with no future dislike at all (the metric leaves it out; the old script scored it a miss)
    data.rows[3].target.future_neg, data.rows[3].target.n_future_neg_cold = [], 0
    assert not data.rows[3].target.has_future_dislike
    pred = tmp_path / "eval" / "predictions"
    pred.mkdir(parents=True)
    # row A: each row's own future dislikes first (a hit wherever the row has one); row B: one fixed list
    first = [list(dict.fromkeys(list(r.target.future_neg) + cat))[:5] for r in data.rows]
    a = write_predictions(predictions_file(pred, "+ row A"), data, first)
    b = write_predictions(predictions_file(pred, "row/B"), data, [cat[:5] for _ in data.rows])
    assert a.name == "row_A.jsonl" and b.name == "row_B.jsonl"
    ha, hb = hit_samples(a, data, 5), hit_samples(b, data, 5)
    # scored as the metric scores them: rows without any future dislike are left out; a row whose
    # future dislikes have no SID counts, as a miss
    scored = [r for r in data.rows if r.target.has_future_dislike]
    assert len(ha) == len(hb) == len(scored) == len(data.rows) - 1
    assert sum(ha) == sum(bool(r.target.future_neg) for r in scored)
    want_b = [float(bool(set(cat[:5]) & set(r.target.future_neg))) for r in scored]
    assert hb == want_b
    monkeypatch.setattr("conrec_verl.core.eval_data.load_eval_data", lambda *a, **k: data)  # the row above
    with pytest.raises(SystemExit) as done:
        run_script("paired_rows.py", ["--data", str(folder), "--eval", str(tmp_path / "eval"), "--a", "+ row A",
                                      "--b", "row/B", "--k", "5"], monkeypatch, capsys)
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"on {len(scored)} rows" in out
    assert f"only A hits {int(sum(ha) - sum(want_b))}, only B hits 0" in out
    with pytest.raises(SystemExit) as err:
        run_script("paired_rows.py", ["--data", str(folder), "--eval", str(tmp_path / "eval"), "--a", "nope", "--b", "row/B"],
                   monkeypatch, capsys)
    assert err.value.code == 2 and "nope" in capsys.readouterr().err


def test_prior_correction_probe_prints_both_splits_and_alpha_zero_is_the_models_ranking(tmp_path, capsys):
    import numpy as np
    import pyarrow.parquet as pq

    from conrec_verl.model_builder import save_tiny_model
    from tests.evaluation.fixtures import make_data_folder

    mod = runpy.run_path(str(BENCH / "prior_correction_probe.py"))
    m = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert mod["log_prior"](m) == pytest.approx(np.log([0.3, 0.175, 0.525]))
    folder = make_data_folder(tmp_path / "data")
    (folder / "rl").mkdir()
    pq.write_table(pq.read_table(folder / "eval" / "test.parquet"), folder / "rl" / "val.parquet")
    model = save_tiny_model(tmp_path / "tiny", (4, 4, 4))
    assert mod["main"](["--data", str(folder), "--model", str(model), "--alphas=0,0.5", "--k", "5",
                        "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| +")]
    assert len(lines) == 2
    # val and test are the same rows here, so both columns agree; alpha 0 is the exact decoding's FHR@5
    from conrec_verl.core.eval_data import load_eval_data
    from conrec_verl.evaluation.harness import EnsembleSpec, ensemble_predictions

    data = load_eval_data(folder)
    pset, _, _ = ensemble_predictions(data, EnsembleSpec([str(model)]), 5, device="cpu", candidate_acc=False)
    hits = [any(s in r.target.future_neg for s in top) for r, top in zip(data.rows, pset.sids) if r.target.has_future_dislike]
    cells = lines[0].strip("|").split("|")
    assert float(cells[1]) == float(cells[2]) == pytest.approx(sum(hits) / len(hits), abs=1e-4)


def test_rollout_non_items_classes_outputs_as_the_reward_and_the_trie_spells_only_items(tmp_path, capsys):
    import pyarrow.parquet as pq

    from conrec_verl.core.sid import format_sid
    from conrec_verl.model_builder import save_tiny_model
    from conrec_verl.plugins.compute_score import get_scorer
    from tests.evaluation.fixtures import make_data_folder

    mod = runpy.run_path(str(BENCH / "rollout_non_items.py"))
    folder = make_data_folder(tmp_path / "data")
    (folder / "rl").mkdir()
    test = pq.read_table(folder / "eval" / "test.parquet")
    keep = [json.loads(r["ground_truth"])["future_neg"] != [] for r in test.column("reward_model").to_pylist()]
    test = test.filter(keep)  # training rows always have a future dislike
    pq.write_table(test, folder / "rl" / "train.parquet")
    scorer = get_scorer({"codebook_path": str(folder / "codebook.npz")})
    items = sorted(scorer.items)
    non_item = next(c for c in ((a, b, c) for a in range(4) for b in range(4) for c in range(4)) if c not in scorer.items)
    gt = test.column("reward_model").to_pylist()[0]["ground_truth"]
    shares = mod["classify"](scorer, ["no sid here", format_sid(non_item), format_sid(items[0]), format_sid(items[1])],
                             [gt] * 4)
    assert (shares["invalid"], shares["non_item"], shares["item"]) == (0.25, 0.25, 0.5)
    assert shares["reward"] == pytest.approx(sum(scorer.score(t, gt).reward for t in (
        "no sid here", format_sid(non_item), format_sid(items[0]), format_sid(items[1]))) / 4)
    model = save_tiny_model(tmp_path / "tiny", (4, 4, 4))
    assert mod["main"](["--data", str(folder), "--model", str(model), "--rows", "6", "--n", "4"]) == 0
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
             if line.startswith("| ") and not line.startswith("| rollouts")}
    assert table["item trie (recipe default)"][:4] == ["24", "0.0000", "0.0000", "1.0000"]
    assert float(table["unconstrained"][3]) < 1.0  # a random model spells non-items or no SID unconstrained
    assert mod["main"](["--data", str(tmp_path / "nowhere"), "--model", str(model)]) == 2
