import torch

from conrec_verl.runtime.cpu_platform import PlatformCPU, cpu_env, normalise_backend


def test_backend_string_duplicates_are_collapsed():
    assert normalise_backend("cpu:gloo,cpu:gloo") == "cpu:gloo"
    assert normalise_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert normalise_backend("gloo") == "gloo"
    assert normalise_backend(None) is None


def test_platform_reports_cpu_and_is_never_autodetected():
    p = PlatformCPU()
    assert p.device_name == "cpu" and p.communication_backend_name() == "gloo"
    assert p.current_device() == torch.device("cpu")
    assert p.is_available() and not p.is_platform_available(use_smi_check=True)
    mod = p.device_module
    assert mod.get_device_name() == "cpu" and mod.device_count() == 1
    assert mod.memory_allocated() == 0
    assert p.ray_resource_options(1) == {"num_gpus": 1}


def test_cpu_env_names_what_main_ppo_needs():
    env = cpu_env()
    assert env["VERL_PLATFORM"] == "cpu" and env["VERL_ENGINE_DEVICE"] == "cuda"
    # bf16 autocast on CPU: oneDNN's per-shape caches are bounded (memory grows otherwise)
    assert int(env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]) > 0 and int(env["LRU_CACHE_CAPACITY"]) > 0


def test_cpu_env_is_importable_without_torch():
    import subprocess
    import sys

    code = "import sys; from conrec_verl.runtime.cpu_env import cpu_env; cpu_env(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_gloo_process_group_initialises_with_verls_backend_string(tmp_path):
    """verl builds "cpu:gloo,{device}:{backend}"; with the patch it must initialise on CPU."""
    import torch.distributed as dist

    from conrec_verl.runtime.verl_compat import install_backend_normaliser

    install_backend_normaliser()
    dist.init_process_group(backend="cpu:gloo,cpu:gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_the_shell_form_of_cpu_env_is_cpu_env(tmp_path):
    """``eval "$(python -m conrec_verl.runtime.cpu_env)"`` (the recipes' scripts) sets exactly
    cpu_env(), values with spaces and quotes included."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in cpu_env()}
    env["WANDB_MODE"] = "it's \"odd\" $HOME"  # cpu_env keeps a user's value: quoting must hold
    script = (f'eval "$({sys.executable} -m conrec_verl.runtime.cpu_env)" && '
              f'{sys.executable} -c "import json, os; print(json.dumps(dict(os.environ)))"')
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    import json

    got = json.loads(out)
    expected = subprocess.run([sys.executable, "-c", "import json; from conrec_verl.runtime.cpu_env import cpu_env; "
                               "print(json.dumps(cpu_env()))"], env=env, capture_output=True, text=True,
                              check=True).stdout
    for key, value in json.loads(expected).items():
        assert got.get(key) == value, key
    assert got["WANDB_MODE"] == env["WANDB_MODE"]
    read = lambda rel: open(os.path.join(os.path.dirname(__file__), "..", "..", rel)).read()  # noqa: E731
    text = read("recipes/conrec/run_conrec_cpu.sh")
    assert 'eval "$(python -m conrec_verl.runtime.cpu_env)"' in text and "VERL_PLATFORM=" not in text
    # the smoke script is `python -m conrec_verl.smoke --train`, which runs main_ppo with cpu_env()
    text = read("recipes/conrec/run_smoke_cpu.sh")
    assert "python -m conrec_verl.smoke" in text and "--train" in text and "VERL_PLATFORM=" not in text
    assert "**cpu_env()" in read("conrec_verl/smoke.py")
