"""The one-command pipeline, shortened (ci_tiny profile): data_prep -> SFT stages -> progressive
GRPO -> evaluation on the bundled sample, then resume and the fail-fast checks."""

import json
import sys
from pathlib import Path

import pytest

from conrec_verl.pipeline import Phase, Pipeline, PipelineError, load_profile, main, with_added_keys


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, wheel_install):
    """The CI profile run as a user runs it: from the wheel (conftest.wheel_install), in a folder
    outside the checkout, with a relative --run-dir."""
    from ray.cluster_utils import Cluster

    cwd = tmp_path_factory.mktemp("pipeline")
    # another job's Ray cluster runs on the machine (the latest one started, which a bare ray.init
    # would attach to): the pipeline's main_ppo must start its own and leave that one alone
    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        proc = wheel_install.run(["-m", "conrec_verl.pipeline", "--run-dir", "run", "--profile", "ci_tiny"], cwd=cwd,
                                 timeout=1800)
        assert other.head_node.remaining_processes_alive(), "the other job's cluster was stopped"
    finally:
        other.shutdown()
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # every phase ran in the run folder
    return cwd / "run"


@pytest.mark.slow
def test_whole_pipeline_runs_and_reports_both_models(finished_run, capsys):
    state = json.loads((finished_run / "pipeline.json").read_text())
    for phase in ("data", "model", "sft_alignment", "sft_warmup", "grpo", "eval"):
        assert phase in state["done"], f"{phase} not finished: {sorted(state['done'])}"
    # verl's SFT trainer and main_ppo really trained: checkpoints and HF exports exist
    assert (finished_run / "models" / "sft_warmup" / "config.json").is_file()
    assert (finished_run / "models" / "grpo" / "config.json").is_file()
    grpo_log = (finished_run / "logs" / "grpo.log").read_text()
    assert "training/conrec_stage:3" in grpo_log  # the curriculum reached its last stage
    assert "++ray_kwargs.ray_init.address=local" in grpo_log and "Connecting to existing Ray cluster" not in grpo_log
    # cross-stage cleaning (on in the profile): one main_ppo per stage, each resumed from the last
    # stage's checkpoint, stages 2 and 3 screened by the model at the end of the stage before
    assert grpo_log.count("Resuming from") == 2
    for stage in (2, 3):
        decision = json.loads((finished_run / "grpo_cleaning" / f"stage_{stage}.json").read_text())
        assert decision["screened"] > 0 and decision["flagged"] > 0
        assert decision["model"].endswith(f"grpo_stage{stage - 1}")
        assert state["done"]["grpo"]["cleaning"][str(stage)]["flagged"] == decision["flagged"]
    assert "cross-stage cleaning: row weights for stage(s) [2, 3]" in grpo_log
    # warm-up SFT validated on the validation users' questions; the exported step is the best one
    warm = state["done"]["sft_warmup"]
    assert warm["val_loss"] and str(warm["chosen_step"]) == min(warm["val_loss"], key=warm["val_loss"].get)
    # every GRPO checkpoint (each stage's end) scored by FHR@20 on the validation users' rows by beam
    # search (evaluation.select); the export is the best one's weights
    val = state["done"]["grpo"]["val"]
    assert set(val["by_step"]) == {"1", "2", "3"} and val["metric"] == "FHR@20"
    scored = json.loads((finished_run / "grpo_val.json").read_text())
    assert scored["rows"] > 0 and {k: round(v, 5) for k, v in scored["scores"].items()} == val["by_step"]
    assert "conrec_verl.evaluation.select" in grpo_log
    assert str(val["chosen_step"]) == max(val["by_step"], key=lambda s: (val["by_step"][s], -int(s)))
    chosen = finished_run / "grpo" / f"global_step_{val['chosen_step']}" / "actor" / "huggingface"
    assert (finished_run / "models" / "grpo" / "model.safetensors").read_bytes() == \
        (chosen / "model.safetensors").read_bytes()
    summary = state["done"]["eval"]["summary"]
    assert {"warm-up SFT", "progressive GRPO"} <= set(summary)
    report = (finished_run / "eval" / "report.md").read_text()
    assert "| warm-up SFT |" in report and "| progressive GRPO |" in report


@pytest.mark.slow
def test_rerun_skips_finished_phases(finished_run, capsys):
    capsys.readouterr()
    assert main(["--run-dir", str(finished_run), "--profile", "ci_tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 7
    assert "FHR@20" in out and "progressive GRPO" in out


@pytest.mark.slow
def test_a_data_folder_of_another_sid_build_is_refused(finished_run, tmp_path):
    state = json.loads((finished_run / "pipeline.json").read_text())
    state["sid_build"] = "0123456789abcdef"
    pipe = Pipeline(finished_run, load_profile("ci_tiny"))
    with pytest.raises(PipelineError, match="trained on build 0123456789abcdef"):
        pipe.check_data_folder(state)


def test_wrong_paths_fail_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), "--profile", "ci_tiny", "model.base=/nonexistent/model"]) == 2
    assert "model.base=/nonexistent/model does not exist" in capsys.readouterr().err
    assert not (run / "data").exists()
    assert main(["--run-dir", str(run), "--profile", "no_such_profile"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["cpu_tiny", "ci_tiny", "cpu_small", "gpu_qwen3"])
def test_profiles_compose_with_their_verl_configs(profile):
    """Every profile names SFT and GRPO configs that hydra composes on verl's own configs."""
    from hydra import compose, initialize_config_dir

    from conrec_verl.pipeline import RECIPE_DIR

    prof = load_profile(profile)
    with initialize_config_dir(config_dir=str(RECIPE_DIR / "config"), version_base=None):
        sft = compose(config_name=str(prof.sft.config), overrides=["model.path=m", "data.train_files=f"])
        grpo = compose(config_name=str(prof.grpo.config),
                       overrides=["data_dir=d", "actor_rollout_ref.model.path=m", *map(str, prof.grpo.overrides)])
    assert sft.checkpoint.save_contents[-1] == "hf_model"  # the pipeline exports every stage
    assert grpo.algorithm.adv_estimator == "progressive_grpo" and grpo.reward.reward_manager.name == "conrec"
    assert grpo.data.custom_cls.name == "ConrecSidDataset" and grpo.data.shuffle is False
    assert "hf_model" in grpo.actor_rollout_ref.actor.checkpoint.save_contents
    assert grpo.trainer.device == ("cpu" if prof.device == "cpu" else "cuda")
    # the hf rollout (the CPU backend, and the GPU profile's vLLM-less path) spells only items of the
    # build, as evaluation decodes: the item trie is on in every profile's GRPO config
    hf = grpo.actor_rollout_ref.rollout.engine_kwargs.hf
    assert hf.logits_processor == "conrec_verl.constrained:rollout_logits_processor"
    assert hf.logits_processor_kwargs.sid_map == "d/sid_map.parquet"
    if prof.device == "cpu":  # the CPU runtime starts no Ray dashboard and no idle workers
        ray_init = grpo.ray_kwargs.ray_init
        assert ray_init.include_dashboard is False
        assert ray_init._system_config.prestart_worker_first_driver is False
        assert grpo.data.dataloader_num_workers == 0  # no loader processes killed at exit


def test_the_launcher_imports_neither_torch_nor_verl():
    """The pipeline process lives for the whole run beside the trainers: it must stay small."""
    import subprocess
    import sys

    code = ("import sys; from conrec_verl.pipeline import Pipeline, load_profile; "
            "env = Pipeline('/tmp/x', load_profile('cpu_tiny')).env; "
            "assert env['VERL_PLATFORM'] == 'cpu', env; "
            "heavy = sorted(m for m in ('torch', 'verl', 'transformers', 'ray') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- nothing silently wrong: names, prerequisites, one pipeline per folder, early config errors ----

def test_only_names_real_phases_and_their_prerequisites(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), "--profile", "ci_tiny", "--only", "grpoo"]) == 2
    err = capsys.readouterr().err
    assert "--only: unknown phase(s) ['grpoo']" in err and "grpo, eval" in err
    assert main(["--run-dir", str(run), "--profile", "ci_tiny", "--only", "grpo"]) == 2
    assert "phase grpo needs the data phase first" in capsys.readouterr().err
    assert not (run / "data").exists() and not (run / "grpo").exists()


def test_a_run_folder_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["--run-dir", str(path), "--profile", "ci_tiny"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_two_pipelines_cannot_share_a_run_folder(tmp_path, capsys):
    from conrec_verl.pipeline import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        assert main(["--run-dir", str(run), "--profile", "ci_tiny"]) == 2
        err = capsys.readouterr().err
        assert "is in use by another pipeline (pid" in err and "another --run-dir" in err
        assert not (run / "data").exists()
    with RunLock(run):  # released when its holder is done (the OS releases it when a holder dies)
        pass


def test_a_bad_training_override_stops_the_pipeline_before_any_phase(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), "--profile", "ci_tiny", "grpo.overrides=[trainer.no_such_key=1]"]) == 2
    err = capsys.readouterr().err
    assert "phase grpo: its verl config conrec_cpu_tiny with the profile's overrides does not compose" in err
    assert "no_such_key" in err and len(err.splitlines()) <= 3
    assert not (run / "data").exists()
    assert main(["--run-dir", str(run), "--profile", "ci_tiny",
                 "sft.overrides=[optim.no_such_key=1]"]) == 2
    err = capsys.readouterr().err
    assert "phase sft_translation: its verl config sft_cpu_tiny" in err and "no_such_key" in err
    assert not (run / "data").exists()


def test_a_context_warm_up_sft_never_taught_stops_the_pipeline_before_any_phase(tmp_path, capsys):
    """GRPO stages and evaluation rows are asked only in prompt contexts warm-up SFT taught
    (data_prep sft.warmup.contexts), read from the composed data_prep config before data exists."""
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), "--profile", "ci_tiny", "data.overrides=['sft.warmup.contexts=[2,3]']"]) == 2
    err = capsys.readouterr().err
    assert "GRPO stage recent_neg (context 1)" in err and "sft.warmup.contexts=[2, 3]" in err
    assert "all_neg" not in err and "neg_and_pos" not in err and "evaluation" not in err
    assert not (run / "data").exists()
    # every asker is named: the configs as composed (no child process needed for the rest)
    pipe = Pipeline(run, load_profile("ci_tiny", ["eval.warmup_prompt=2,384"]))
    grpo = {"algorithm": {"adv_estimator": "progressive_grpo", "progressive_grpo": {"kl_ref": 0.001, "stages": [
        {"name": "recent_neg", "context": 1, "steps": 1}, {"name": "all_neg", "context": 2, "steps": 1}]}}}
    data = {"sft": {"warmup": {"contexts": [1, 3]}}, "rl": {"val_context": 2, "eval_context": 3}}
    with pytest.raises(PipelineError) as err:
        pipe.check_contexts(grpo, data)
    assert "evaluation: the warm-up SFT row (eval.warmup_prompt) (context 2)" in str(err.value)
    assert "GRPO stage all_neg (context 2)" in str(err.value) and "recent_neg" not in str(err.value)
    assert "GRPO validation rows (rl.val_context) (context 2)" in str(err.value)
    pipe.check_contexts(grpo, {**data, "sft": {"warmup": {"contexts": [1, 2, 3]}}})


def test_a_built_data_folder_tells_which_contexts_were_taught(tmp_path):
    """Once data_prep ran, its manifest is the record (old rl key names still win, as data_prep reads them)."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    config = {"sft": {"warmup": {"contexts": [2, 3]}}, "rl": {"val_context": 2, "eval_context": 3, "eval_stage": None}}
    (run / "data" / "manifest.json").write_text(json.dumps({"config": config}))
    pipe = Pipeline(run, load_profile("ci_tiny", ["eval.grpo_prompt=row,384"]))
    pipe.check_contexts(None, None)  # the GRPO row is asked in the rows' own context, 3: taught
    config["rl"]["eval_stage"] = 1
    (run / "data" / "manifest.json").write_text(json.dumps({"config": config}))
    with pytest.raises(PipelineError, match=r"evaluation: the GRPO row \(eval.grpo_prompt\) \(context 1\)"):
        pipe.check_contexts(None, None)
    config["sft"]["warmup"]["contexts"] = [1, 2, 3]
    (run / "data" / "manifest.json").write_text(json.dumps({"config": config}))
    pipe.check_contexts(None, None)
    (run / "data" / "manifest.json").write_text(json.dumps({"config": {"rl": config["rl"]}}))
    pipe.check_contexts(None, None)  # a manifest written before sft.warmup.contexts existed: not refused


def test_killing_the_pipeline_stops_the_running_phase(tmp_path):
    """SIGTERM to the pipeline reaches the phase's process (torchrun and main_ppo stop their
    workers on it), so nothing trains on after the pipeline is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    script = (
        "import signal, sys\n"
        "from pathlib import Path\n"
        "from conrec_verl.pipeline import Pipeline, load_profile, _raise_terminated\n"
        "signal.signal(signal.SIGTERM, _raise_terminated)\n"
        f"pipe = Pipeline(Path({str(tmp_path / 'run')!r}), load_profile('ci_tiny'))\n"
        "try:\n"
        f"    pipe._run('phase', [sys.executable, '-c', {child!r}])\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    try:
        os.kill(child_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the phase's process outlived the pipeline"


def test_profile_overrides_must_name_a_key_and_be_valid_yaml():
    with pytest.raises(PipelineError, match=r"profile override 'grpo.overidez=\[\]'.*conrec-pipeline --help"):
        load_profile("ci_tiny", ["grpo.overidez=[]"])
    with pytest.raises(PipelineError, match="not key=value with a valid YAML value"):
        load_profile("ci_tiny", ["data.overrides=[a=[1,2]"])
    assert load_profile("ci_tiny", ["grpo.cleaning.share=0.5"]).grpo.cleaning.share == 0.5


def test_relative_paths_resolve_against_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "log.csv").write_text("user_id,item_id\n")
    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny", ["data.input_path=logs/log.csv"]))
    assert pipe.profile.data.input_path == str(tmp_path / "logs" / "log.csv")
    pipe.check_inputs()  # exists, seen from where the user typed it


def test_a_run_folder_can_start_from_another_runs_finished_phases(tmp_path, capsys):
    """--from: the data folder is linked, the reused phases are recorded as done (with where they
    came from), and only the rest runs; nothing of the source changes."""
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "models" / "sft_warmup").mkdir(parents=True)
    done = {"data": {"seconds": 1, "sid_build": "abc"}, "model": {"seconds": 1, "path": str(src / "models" / "base")},
            "sft_warmup": {"seconds": 9, "path": str(src / "models" / "sft_warmup")},
            "grpo": {"seconds": 5, "path": str(src / "models" / "grpo")}}
    (src / "pipeline.json").write_text(json.dumps({"done": done, "sid_build": "abc"}))
    before = (src / "pipeline.json").read_text()
    new = Pipeline(tmp_path / "new", load_profile("ci_tiny"))
    new.run.mkdir()
    assert new.start_from(src) == ["data", "model", "sft_warmup"]  # every finished phase before GRPO
    state = new._load_state()
    assert set(state["done"]) == {"data", "model", "sft_warmup"} and state["sid_build"] == "abc"
    assert state["done"]["sft_warmup"]["reused_from"] == str(src)
    assert (new.run / "data").resolve() == (src / "data").resolve()
    assert new._current_model(state) == src / "models" / "sft_warmup"
    # the reused model that exists is linked where this run keeps its models; none is invented
    assert (new.run / "models" / "sft_warmup").resolve() == (src / "models" / "sft_warmup").resolve()
    assert not (new.run / "models" / "base").exists() and not (new.run / "models" / "base").is_symlink()
    clash = Pipeline(tmp_path / "clash", load_profile("ci_tiny"))
    (clash.run / "models" / "sft_warmup").mkdir(parents=True)  # a model of its own where the link would go
    with pytest.raises(PipelineError, match="exists and is not"):
        clash.start_from(src)
    assert not (clash.run / "data").exists() and not (clash.run / "pipeline.json").exists()  # nothing half-made
    assert [p.name for p in new.select(["grpo"], state)] == ["grpo"]  # its prerequisites are done
    assert (src / "pipeline.json").read_text() == before
    with pytest.raises(PipelineError, match=r"phase\(s\) \['sft_alignment'\] have not finished"):
        Pipeline(tmp_path / "other", load_profile("ci_tiny")).start_from(src, ["data", "sft_alignment"])
    with pytest.raises(PipelineError, match="must include the data phase"):
        Pipeline(tmp_path / "other", load_profile("ci_tiny")).start_from(src, ["model"])
    only_base = Pipeline(tmp_path / "base_only", load_profile("ci_tiny"))
    only_base.run.mkdir()
    only_base.start_from(src, ["data", "model"])
    assert only_base._current_model(only_base._load_state()) == src / "models" / "base"  # the reused base model
    only_base.start_from(src)  # a rerun reuses what the first run chose, not every phase finished since
    assert set(only_base._load_state()["done"]) == {"data", "model"}
    own = Pipeline(tmp_path / "own", load_profile("ci_tiny"))
    own.run.mkdir()
    own._save_state({"done": {"data": {"seconds": 2}}})
    with pytest.raises(PipelineError, match="already has finished phases of its own"):
        own.start_from(src)


def test_metrics_are_read_from_verls_console_log_also_as_numpy_reprs(tmp_path):
    log = tmp_path / "grpo.log"
    key = "val-aux/conrec/reward/mean@1"
    log.write_text(f"step:1 - {key}:np.float64(-0.25) - x:1\nstep:2 - a:1 - {key}:0.5\n"
                   f"step:3 - {key}0:0.9 - b/{key}:0.8\nstep:4 - {key}:nan\n")  # mean@10 and b/... are other keys
    values = Pipeline.metric_by_step(log, key)
    assert values[1] == -0.25 and values[2] == 0.5 and 3 not in values and values[4] != values[4]


def test_the_chosen_checkpoint_is_the_best_finite_value_with_an_export(tmp_path):
    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny"))
    log = tmp_path / "phase.log"
    log.write_text("step:1 - m:nan\nstep:2 - m:0.4\nstep:3 - m:np.float64(0.7)\nstep:4 - m:0.7\n"
                   "step:5 - m:0.9\nstep:6 - m:inf\n")
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3, 4, 6):  # step 5 has no export (pruned)
        (ckpt / f"global_step_{step}" / "hf").mkdir(parents=True)
        (ckpt / f"global_step_{step}" / "hf" / "config.json").write_text("{}")
    assert pipe.choose_step(log, "m", "max", ckpt, "hf", "x") == (3, {"2": 0.4, "3": 0.7, "4": 0.7})
    assert pipe.choose_step(log, "m", "min", ckpt, "hf", "x")[0] == 2
    with pytest.raises(PipelineError, match="x: no finite other logged at a checkpoint"):
        pipe.choose_step(log, "other", "max", ckpt, "hf", "x")


def test_grpo_selection_validates_at_every_checkpoint_and_names_bad_settings(tmp_path):
    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny", ["grpo.select_by_val.metric=val-aux/conrec/reward/mean@1"]))
    cfg = pipe.compose_configs({"grpo": ("conrec_cpu_tiny", pipe._grpo_overrides("m", "d", "c"))})["grpo"]
    assert cfg["trainer"]["test_freq"] == cfg["trainer"]["save_freq"] == 3
    off = Pipeline(tmp_path / "off", load_profile("ci_tiny", ["grpo.select_by_val=null"]))
    assert not any("test_freq" in o for o in off._grpo_overrides("m", "d", "c"))
    for override, match in (("grpo.select_by_val.mode=median", "mode must be max or min"),
                            ("grpo.select_by_val=reward", "must be null or"),
                            ("grpo.select_by_val.metric=null", "must name a validation metric")):
        with pytest.raises(PipelineError, match=match):
            Pipeline(tmp_path / "bad", load_profile("ci_tiny", [override])).check_inputs()


def test_main_ppo_starts_its_own_ray_unless_pointed_at_a_cluster(tmp_path, monkeypatch):
    """The GRPO phase passes address=local (verl's ray.init would attach to the machine's latest
    cluster, finished_run shows it does not), and composes; a cluster the user names is kept."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny"))
    cfg = pipe.compose_configs({"grpo": ("conrec_cpu_tiny", pipe._grpo_overrides("m", "d", "c"))})["grpo"]
    assert cfg["ray_kwargs"]["ray_init"]["address"] == "local"
    named = ["grpo.overrides+=[++ray_kwargs.ray_init.address=auto]"]
    cfg = pipe.compose_configs({"grpo": ("conrec_cpu_tiny", Pipeline(tmp_path / "named", load_profile(
        "ci_tiny", named))._grpo_overrides("m", "d", "c"))})["grpo"]
    assert cfg["ray_kwargs"]["ray_init"]["address"] == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not any("ray_init.address" in o for o in Pipeline(tmp_path / "env", load_profile("ci_tiny"))
                   ._grpo_overrides("m", "d", "c"))


@pytest.mark.parametrize("env, args, expected", [
    ({}, [], "++ray_kwargs.ray_init.address=local"),
    ({}, ["trainer.total_epochs=1"], "++ray_kwargs.ray_init.address=local"),
    ({"RAY_ADDRESS": "10.0.0.1:6379"}, [], ""),
    ({}, ["+ray_kwargs.ray_init.address=auto"], ""),
])
def test_the_recipe_script_and_smoke_take_the_pipelines_ray_rule(env, args, expected):
    """What run_conrec_cpu.sh splices into its main_ppo command (the module's printout, read by the
    shell), for the cases the pipeline's test covers (smoke --train: tests/test_smoke.py)."""
    import os
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    out = subprocess.run([sys.executable, "-m", "conrec_verl.runtime.own_ray", *args], env=full_env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected
    script = (Path(__file__).resolve().parents[1] / "recipes" / "conrec" / "run_conrec_cpu.sh").read_text()
    assert 'own_ray="$(python -m conrec_verl.runtime.own_ray "$@")"' in script and "$own_ray \"$@\"" in script


def test_selection_by_the_evaluation_metric_skips_verls_validation_and_names_bad_settings(tmp_path):
    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny"))
    assert pipe._grpo_selection() == ("FHR@20", "max", False)  # the shipped default
    assert not any("test_freq" in o for o in pipe._grpo_overrides("m", "d", "c"))  # verl need not validate
    assert Pipeline(tmp_path / "r", load_profile("ci_tiny", ["grpo.select_by_val.include_start=true"])
                    )._grpo_selection() == ("FHR@20", "max", True)
    for override, match in (("grpo.select_by_val.mode=min", "FHR@20 is a hit rate, its mode must be max"),
                            ("grpo.select_by_val={metric: val-aux/conrec/reward/mean@1, include_start: true}",
                             "include_start needs metric FHR@K or HR@K"),
                            ("grpo.select_by_val.include_start=yes please", "include_start must be true or false"),
                            ("grpo.select_by_val=FHR@20", "must be null or"),
                            ('eval.grpo_prompt="three,384"', "prompt context must be 1, 2, 3 or row"),
                            ('eval.grpo_prompt="3,lots"', "prompt budget must be a number of tokens or none"),
                            ("eval.args=[--decode,greedy]", "--decode must be one of beam, exact")):
        with pytest.raises(PipelineError, match=match):
            Pipeline(tmp_path / "bad", load_profile("ci_tiny", [override])).check_inputs()
    # checkpoints are chosen decoded as the evaluation decodes them
    args = pipe._selection_args()
    assert args[args.index("--decode") + 1] == "beam"
    exact = Pipeline(tmp_path / "x", load_profile("ci_tiny", ["eval.args=[--decode,exact]"]))._selection_args()
    assert exact[exact.index("--decode") + 1] == "exact"


def _fake_grpo_run(pipe, tmp_path, scores, steps=(3, 6)):
    """Stand-ins for main_ppo (writes checkpoints) and the selection child (writes ``scores``, a
    function of the --model names it was given); returns the commands run."""
    ran = []

    def run(phase, cmd, cwd=None):
        ran.append(cmd)
        if "verl.trainer.main_ppo" in cmd:
            for s in steps:
                hf = pipe.run / "grpo" / f"global_step_{s}" / "actor" / "huggingface"
                hf.mkdir(parents=True)
                (hf / "config.json").write_text(json.dumps({"step": s}))
            (pipe.run / "grpo" / "latest_checkpointed_iteration.txt").write_text(str(steps[-1]))
        else:
            names = [cmd[i + 1].split("=", 1)[0] for i, c in enumerate(cmd) if c == "--model"]
            out = Path(cmd[cmd.index("--out") + 1])
            out.write_text(json.dumps({"scores": {n: scores(n) for n in names}}))

    pipe._run = run
    pipe.check_data_folder = lambda state: ""
    pipe._cleaning_rule = lambda: None
    start = tmp_path / "start"
    start.mkdir()
    (start / "config.json").write_text(json.dumps({"step": 0}))
    return ran, {"done": {"sft_warmup": {"path": str(start)}}}


@pytest.mark.parametrize("include_start", [False, True])
def test_grpo_exports_the_step_with_the_best_validation_hit_rate(tmp_path, include_start):
    profile = load_profile("ci_tiny", [f"grpo.select_by_val.include_start={str(include_start).lower()}",
                                       'eval.grpo_prompt="2,256"'])
    pipe = Pipeline(tmp_path / "run", profile)
    # step 6 beats step 3; the starting model (0) ties step 6: ties go to the earlier step
    ran, state = _fake_grpo_run(pipe, tmp_path, {"0": 0.5, "3": 0.25, "6": 0.5}.get)
    stale = pipe.run / "grpo" / "global_step_9" / "actor" / "huggingface"  # left by an earlier, longer run
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    info = pipe.phase_grpo(Phase("grpo", "GRPO"), state)
    select = ran[-1]
    assert select[:3] == [sys.executable, "-m", "conrec_verl.evaluation.select"]
    assert select[select.index("--metric") + 1] == "FHR@20"
    assert (select[select.index("--context") + 1], select[select.index("--budget") + 1]) == ("2", "256")
    assert (select[select.index("--exclusion") + 1], select[select.index("--device") + 1]) == ("interacted", "cpu")
    names = [select[i + 1].split("=", 1)[0] for i, c in enumerate(select) if c == "--model"]
    assert names == (["0"] if include_start else []) + ["3", "6"]
    exported = json.loads((pipe.run / "models" / "grpo" / "config.json").read_text())["step"]
    assert info["val"]["chosen_step"] == exported == (0 if include_start else 6)
    assert info.get("started_model_kept", False) == include_start


def test_val_losses_are_read_from_verls_console_log(tmp_path):
    log = tmp_path / "sft_warmup.log"
    log.write_text("step:1 - train/loss:2.0\nstep:274 - val/loss:1.52 - train/loss:1.4\n"
                   "step:548 - val/loss:1.49\nstep:548 - val/loss:1.48\n")  # a resumed run logged 548 again
    assert Pipeline.metric_by_step(log, "val/loss") == {274: 1.52, 548: 1.48}
    assert Pipeline.metric_by_step(tmp_path / "missing.log", "val/loss") == {}


def test_list_overrides_can_append_instead_of_replacing():
    base = load_profile("ci_tiny")
    appended = load_profile("ci_tiny", ["grpo.overrides+=[trainer.save_freq=4]"])
    assert list(appended.grpo.overrides) == [*base.grpo.overrides, "trainer.save_freq=4"]
    replaced = load_profile("ci_tiny", ["grpo.overrides=[trainer.save_freq=4]"])
    assert list(replaced.grpo.overrides) == ["trainer.save_freq=4"]
    with pytest.raises(PipelineError, match="'\\+=' appends to a list, and eval.k is not a list"):
        load_profile("ci_tiny", ["eval.k+=[1]"])


def test_a_run_folder_keeps_the_profile_it_was_started_with(tmp_path, capsys):
    run = tmp_path / "run"
    first = Pipeline(run, load_profile("ci_tiny"))
    run.mkdir()
    state = first._load_state()
    state["done"]["data"] = {"seconds": 1}
    first.check_profile(state)
    first._save_state(state)
    assert main(["--run-dir", str(run), "--profile", "ci_tiny", "--only", "data", "eval.k=10"]) == 2
    err = capsys.readouterr().err
    assert "was run with another profile (changed: eval.k)" in err and "--allow-profile-change" in err
    assert json.loads((run / "pipeline.json").read_text())["profile"]["eval"]["k"] == 20  # unchanged
    changed = Pipeline(run, load_profile("ci_tiny", ["eval.k=10"]), allow_profile_change=True)
    state = changed._load_state()
    changed.check_profile(state)
    assert state["profile"]["eval"]["k"] == 10 and state["profile_history"][0]["eval"]["k"] == 20


def test_a_run_folder_recorded_before_a_profile_key_existed_still_resumes(tmp_path):
    """A pipeline.json written before model.tiny.sid_init existed resumes with the key's default;
    asking for another value is a profile change."""
    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny"))
    pipe.run.mkdir()
    state = pipe._load_state()
    state["done"]["data"] = {"seconds": 1}
    pipe.check_profile(state)
    del state["profile"]["model"]["tiny"]["sid_init"]  # as an older version recorded it
    pipe._save_state(state)
    old = pipe._load_state()
    Pipeline(pipe.run, load_profile("ci_tiny")).check_profile(old)  # no error
    assert "sid_init" not in old["profile"]["model"]["tiny"]  # the record itself is left as it was
    with pytest.raises(PipelineError, match=r"changed: model\.tiny\.sid_init"):
        Pipeline(pipe.run, load_profile("ci_tiny", ["model.tiny.sid_init=codebook"])).check_profile(pipe._load_state())
    assert with_added_keys({"model": {"base": None}}) == {"model": {"base": None}}  # no tiny block: nothing added


def test_sid_init_is_checked_before_any_work(tmp_path):
    with pytest.raises(PipelineError, match="choose random or codebook"):
        Pipeline(tmp_path / "a", load_profile("ci_tiny", ["model.tiny.sid_init=zeros"])).check_inputs()
    base = tmp_path / "hf"
    base.mkdir()
    with pytest.raises(PipelineError, match="applies to the tiny model only"):
        Pipeline(tmp_path / "b", load_profile("ci_tiny", [f"model.base={base}", "model.tiny.sid_init=codebook"])).check_inputs()


def test_cleaning_decisions_of_another_rule_are_refused(tmp_path):
    from conrec_verl.core.cleaning import CleaningRule, write_decision

    pipe = Pipeline(tmp_path / "run", load_profile("ci_tiny"))
    (pipe.run / "data").mkdir(parents=True)
    write_decision(pipe.run / "grpo_cleaning", 2, 2, [0, 1], [0.9, 0.1], [True, True], CleaningRule(share=0.5))
    with pytest.raises(PipelineError, match=r"was screened with cleaning rule .*'share': 0.5.*delete"):
        pipe._grpo_with_cleaning(Phase("grpo", "GRPO"), ["true"], pipe.run / "models" / "base", pipe.run / "data",
                                 pipe.run / "grpo")


def test_the_model_phase_passes_the_profiles_sid_init(tmp_path):
    """model.tiny.sid_init reaches conrec-model (random unless the profile says codebook)."""
    phase = next(p for p in Pipeline(tmp_path / "x", load_profile("ci_tiny")).phases() if p.name == "model")
    for overrides, want in (([], "random"), (["model.tiny.sid_init=codebook"], "codebook")):
        pipe = Pipeline(tmp_path / want, load_profile("ci_tiny", overrides))
        ran = []
        pipe._run = lambda phase, cmd, cwd=None: ran.append(cmd)
        pipe.check_data_folder = lambda state: ""
        assert pipe.phase_model(phase, {"done": {}}) == {"path": str(pipe.run / "models" / "base")}
        cmd = ran[0]
        assert cmd[cmd.index("--sid-init") + 1] == want and cmd[cmd.index("--data-dir") + 1] == str(pipe.run / "data")
