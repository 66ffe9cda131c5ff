"""Run stock `python -m verl.trainer.main_ppo` in a subprocess and parse its console metrics."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from conrec_verl.runtime.cpu_platform import cpu_env

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipes" / "conrec" / "config"
_STEP_LINE = re.compile(r"step:(\d+) - (.*)$")


def run_main_ppo(config_name: str, overrides: list[str], timeout: int = 420, log_path: Path | None = None):
    """Returns ``(returncode, output)``; the output is also written to ``log_path``."""
    env = dict(os.environ)
    env.update(cpu_env())
    env["RAY_DEDUP_LOGS"] = "0"
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR),
           "--config-name", config_name, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
    out = proc.stdout + proc.stderr
    if log_path is not None:
        Path(log_path).write_text(out)
    return proc.returncode, out


def run_smoke_cli(out_dir: Path, overrides: list[str], timeout: int = 420, log_path: Path | None = None):
    """``python -m conrec_verl.smoke --out out_dir --train *overrides`` (the README's install check:
    it sets the CPU environment itself and runs main_ppo from the packaged recipe) from an empty
    folder; returns ``(returncode, output)``."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_env()}  # the CLI must set them itself
    env["RAY_DEDUP_LOGS"] = "0"
    cwd = Path(out_dir).parent / "cwd"
    cwd.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "conrec_verl.smoke", "--out", str(out_dir), "--train", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(cwd))
    out = proc.stdout + proc.stderr
    if log_path is not None:
        Path(log_path).write_text(out)
    return proc.returncode, out


def _value(text: str) -> float | None:
    text = text.strip()
    m = re.fullmatch(r"np\.\w+\((.*)\)", text)
    if m:
        text = m.group(1)
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return float(v) if isinstance(v, (int, float)) else None


def step_metrics(output: str) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from the console logger's ``step:N - k:v - ...`` lines."""
    steps: dict[int, dict[str, float]] = {}
    for line in output.splitlines():
        m = _STEP_LINE.search(line)
        if not m:
            continue
        metrics = steps.setdefault(int(m.group(1)), {})
        for item in m.group(2).split(" - "):
            key, sep, val = item.partition(":")
            if sep:
                v = _value(val)
                if v is not None:
                    metrics[key.strip()] = v
    return steps
