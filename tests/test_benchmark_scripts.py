"""The benchmark scripts still run (tiny sizes; their timings are not asserted)."""

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
