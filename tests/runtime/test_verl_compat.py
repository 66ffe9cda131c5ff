"""The one module that adapts verl at run time (``conrec_verl.runtime.verl_compat``): every
adaptation is still needed on the installed verl (so this test fails on the verl release that adds
the hook, and the adaptation can go), ``docs/upstream.md`` lists exactly these adaptations, no other
module touches the verl internals they patch, and the version guard."""

from __future__ import annotations

import logging
import re
import tokenize
from pathlib import Path

import pytest

from conrec_verl.runtime import verl_compat
from conrec_verl.runtime.verl_compat import ADAPTATIONS, PINNED_VERL

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_verl_is_the_pinned_one():
    assert verl_compat.verl_version() == PINNED_VERL


@pytest.mark.parametrize("name", list(ADAPTATIONS))
def test_every_adaptation_is_still_needed_on_the_installed_verl(name):
    assert ADAPTATIONS[name].still_needed(), (
        f"verl {verl_compat.verl_version()} has the hook adaptation {name!r} works around "
        f"({ADAPTATIONS[name].what}): use it and drop the adaptation (docs/upstream.md)")


def test_upstream_doc_lists_exactly_these_adaptations_in_order():
    doc = (ROOT / "docs" / "upstream.md").read_text()
    listed = re.findall(r"^\| \d+ \| `([a-z_]+)` \|", doc, flags=re.M)
    assert listed == list(ADAPTATIONS)


def _code(path: Path) -> str:
    """The code of a module without comments and strings (docstrings may name verl internals)."""
    with path.open() as fh:
        return " ".join(tok.string for tok in tokenize.generate_tokens(fh.readline)
                        if tok.type not in (tokenize.COMMENT, tokenize.STRING))


PATCHED = [r"_ROLLOUT_REGISTRY", r"auto_set_device\s*=(?!=)", r"SkipManager", r"CPUOffloadPolicy",
           r"init_process_group\s*=(?!=)", r"\.\s*poll_interval\s*=(?!=)", r"_load_dataloader_state\s*=(?!=)"]


def test_no_other_module_touches_the_patched_verl_internals():
    compat = _code(ROOT / "conrec_verl" / "runtime" / "verl_compat.py")
    assert all(re.search(p, compat) for p in PATCHED)  # the scanner finds each where it is
    offenders = [f"{path.relative_to(ROOT)}: {p}" for path in (ROOT / "conrec_verl").rglob("*.py")
                 if path.name != "verl_compat.py" for p in PATCHED if re.search(p, _code(path))]
    assert not offenders


def test_guard_applies_on_the_pinned_verl_and_skips_what_a_newer_verl_fixed(monkeypatch, caplog):
    verl_compat.guard.cache_clear()
    try:
        assert verl_compat.guard("backend_string")
        verl_compat.guard.cache_clear()
        monkeypatch.setattr(verl_compat, "verl_version", lambda: "9.9.9")
        fixed = verl_compat.Adaptation("backend_string", "x", "y", lambda: False)
        monkeypatch.setitem(ADAPTATIONS, "backend_string", fixed)
        assert not verl_compat.guard("backend_string")
        verl_compat.guard.cache_clear()
        monkeypatch.setitem(ADAPTATIONS, "backend_string", verl_compat.Adaptation("backend_string", "x", "y", lambda: True))
        with caplog.at_level(logging.WARNING, logger=verl_compat.__name__):
            assert verl_compat.guard("backend_string")
        assert "written for verl 0.9.1, found 9.9.9" in caplog.text
    finally:
        verl_compat.guard.cache_clear()


def test_a_skipped_patch_leaves_verl_alone(monkeypatch):
    import torch.distributed as dist

    verl_compat.guard.cache_clear()
    monkeypatch.setattr(verl_compat, "verl_version", lambda: "9.9.9")
    monkeypatch.setitem(ADAPTATIONS, "backend_string", verl_compat.Adaptation("backend_string", "x", "y", lambda: False))
    original = dist.init_process_group
    unwrapped = getattr(original, "__wrapped__", original)
    monkeypatch.setattr(dist, "init_process_group", unwrapped)
    try:
        verl_compat.install_backend_normaliser()
        assert dist.init_process_group is unwrapped
    finally:
        verl_compat.guard.cache_clear()


def _sft_run(model, data, ckpt, *extra):
    """verl's own SFT trainer (torchrun, CPU, the tiny recipe), checkpoint after every epoch;
    returns the training steps it logged."""
    import os
    import subprocess

    from conrec_verl.runtime.cpu_env import cpu_env, torchrun_cmd

    cmd = [*torchrun_cmd(1), "-m", "verl.trainer.sft_trainer", "--config-path", str(ROOT / "recipes/conrec/config"),
           "--config-name", "sft_cpu_tiny", f"model.path={model}", f"data.train_files={data}",
           f"trainer.default_local_dir={ckpt}", "trainer.save_freq=after_each_epoch",
           # a constant lr: the stopped run below ends by total_training_steps, which would also
           # shorten a decaying schedule; a killed run keeps its schedule
           "optim.lr_scheduler_type=constant", *extra]
    proc = subprocess.run(cmd, env=dict(os.environ, **cpu_env()), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return sorted({int(s) for s in re.findall(r"step:(\d+) - ", proc.stdout + proc.stderr)})


def test_an_sft_run_resumed_at_the_end_of_an_epoch_trains_every_epoch(tiny_model_dir, tmp_path):
    """Adaptation ``sft_epoch_resume``: 3 epochs of 2 steps, stopped after the checkpoint that ends
    epoch 1 (as a run killed during epoch 2) and started again, train the steps and end with the
    weights of the same 3 epochs run without a stop. On verl 0.9.1 alone the resumed run restores
    the finished epoch's dataloader iterator, skips an epoch and ends at step 4."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from conrec_verl.core.prompts import render_history_prompt

    rows = [{"messages": [{"role": "user", "content": render_history_prompt(2, [], [f"<a_{i % 16}><b_1><c_2>"], [])},
                          {"role": "assistant", "content": f"<a_{i % 4}><b_{(i + 1) % 4}><c_{(i + 2) % 4}>"}]}
            for i in range(64)]  # 2 steps of 32 rows per epoch
    data = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    whole = _sft_run(tiny_model_dir, data, tmp_path / "whole", "trainer.total_epochs=3")
    assert whole == [1, 2, 3, 4, 5, 6]
    first = _sft_run(tiny_model_dir, data, tmp_path / "stopped", "trainer.total_epochs=3", "trainer.total_training_steps=2")
    assert first == [1, 2]
    resumed = _sft_run(tiny_model_dir, data, tmp_path / "stopped", "trainer.total_epochs=3")
    assert resumed == [3, 4, 5, 6]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "global_step_6" / "huggingface", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stopped" / "global_step_6" / "huggingface", dtype=torch.float32)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)
