"""Outputs unchanged by a refactor: the bundled sample's data folder and a reward batch, built by
this checkout and by another revision, compared.

    python benchmarks/refactor_check.py --base <rev>

For each tree (``<rev>`` checked out into a temporary git worktree, and this working tree) it
builds the data folder of the bundled KuaiRand sample with data_prep and scores a reward batch:
the first ``--rows`` rows of every ``rl/*.parquet`` file, each with ten responses (the row's own
target SID, random item SIDs, two SIDs, spaced and wrapped SIDs, half a SID, out-of-range and
four-level tuples, an empty response, stray levels), through ``compute_score`` (the function swap)
and through the ``conrec`` reward manager on a ``DataProto`` with a tokenizer of the build's SID
tokens. It prints what differs and exits 1 if anything does: a data file's bytes (the manifest is
compared without ``config.out_dir`` and ``timings_s``), or any score or extra-info value.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snapshot(out: Path, rows_per_file: int) -> None:
    """Build the data folder into ``out/data`` and write ``out/rewards.json`` and ``out/files.json``
    with the conrec_verl importable in this process (the tree under test)."""
    import glob

    import numpy as np
    import pandas as pd
    import torch
    import verl
    from hydra import compose, initialize_config_dir
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    import conrec_verl
    from conrec_verl import data_prep
    from conrec_verl.core.sid import Codebook
    from conrec_verl.model_builder import build_tokenizer

    tree = str(Path(conrec_verl.__file__).resolve().parents[1])

    def in_tree(name: str) -> bool:
        """Whether module ``name`` exists in the tree under test (an editable install of another
        tree would otherwise supply a module this revision does not have)."""
        spec = importlib.util.find_spec(name)
        return spec is not None and spec.origin is not None and str(Path(spec.origin).resolve()).startswith(tree)

    # the manager registers when its module is imported (the installed entry point may name another
    # revision's layout: the verl adapters moved into conrec_verl/plugins/)
    adapters = "conrec_verl.plugins" if in_tree("conrec_verl.plugins") else "conrec_verl"
    importlib.import_module(f"{adapters}.reward_manager")
    compute_score = importlib.import_module(f"{adapters}.compute_score").compute_score

    print(f"conrec_verl from {Path(conrec_verl.__file__).parent}", file=sys.stderr)
    data = out / "data"
    data_prep.build(data_prep.load_config("kuairand", [f"out_dir={data}", "progress=false", "print_summary=false"]))
    book = Codebook.load(data / "codebook.npz")
    items = list(pd.read_parquet(data / "sid_map.parquet")["sid"])
    rows = []
    for path in sorted(glob.glob(str(data / "rl" / "*.parquet"))):
        rows += [(os.path.basename(path), r) for r in pd.read_parquet(path).head(rows_per_file).to_dict("records")]
    rng = random.Random(0)

    def responses(gt: str) -> list[str]:
        g = json.loads(gt)
        own = (g.get("future_neg") or g.get("swing") or items[:1])[0]
        a, b = rng.choice(items), rng.choice(items)
        return [own, a, a + b, " " + a.replace("><", "> <") + " ", "junk " + b + " tail", a[: len(a) // 2],
                "<a_999999><b_0><c_0>", "", "<a_1><b_1><c_1><d_1>", "hello <b_3>" + a]

    tokenizer = build_tokenizer(book.sizes)
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        config = compose(config_name="ppo_trainer", overrides=[
            "reward.reward_manager.name=conrec", f"+reward.reward_kwargs.codebook_path={data / 'codebook.npz'}"])
    manager = load_reward_manager(config, tokenizer, reward_router_address=None, reward_model_tokenizer=None)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scored = []
    for name, row in rows:
        gt = row["reward_model"]["ground_truth"]
        for text in responses(gt):
            by_function = compute_score("conrec", text, gt, extra_info=row.get("extra_info"),
                                        codebook_path=str(data / "codebook.npz"))
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [end]
            width = len(ids) + 3
            response = torch.full((1, width), tokenizer.pad_token_id)
            response[0, : len(ids)] = torch.tensor(ids)
            mask = torch.zeros((1, 4 + width), dtype=torch.long)
            mask[0, : 4 + len(ids)] = 1
            batch = DataProto.from_dict(
                tensors={"prompts": torch.tensor([[5, 6, 7, 8]]), "responses": response, "attention_mask": mask},
                non_tensors={"data_source": np.array(["conrec"], dtype=object),
                             "reward_model": np.array([{"style": "rule", "ground_truth": gt}], dtype=object),
                             "extra_info": np.array([row.get("extra_info")], dtype=object)})
            by_manager = manager.loop.run_until_complete(manager.run_single(batch))
            scored.append({"file": name, "text": text, "compute_score": by_function, "manager": by_manager})
    (out / "rewards.json").write_text(json.dumps(scored, sort_keys=True, default=float))
    files = {}
    for path in sorted(data.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(data))
            if rel == "manifest.json":
                manifest = json.loads(path.read_text())
                manifest.pop("timings_s", None)
                manifest.get("config", {}).pop("out_dir", None)
                files[rel] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
                (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
            else:
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "files.json").write_text(json.dumps(files, indent=1, sort_keys=True))
    # (a revision without conrec_verl/plugins/: `import verl` tried the installed entry point, which
    # names the installed tree's conrec_verl.plugins.entry_point; that import failed and registered nothing)
    foreign = sorted(name for name, module in list(sys.modules.items()) if name.split(".")[0] == "conrec_verl"
                     and getattr(module, "__file__", None) and not str(Path(module.__file__).resolve()).startswith(tree)
                     and not (adapters == "conrec_verl" and name.startswith("conrec_verl.plugins")))
    if foreign:
        sys.exit(f"the snapshot of {tree} imported modules of another tree: {foreign[:5]}")


def run_snapshot(tree: Path, out: Path, rows: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--snapshot", str(out), "--rows", str(rows)]
    proc = subprocess.run(cmd, cwd=str(tree), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"snapshot of {tree} failed:\n{proc.stderr[-4000:]}")
    where = [line for line in proc.stderr.splitlines() if line.startswith("conrec_verl from ")][-1]
    if not where.endswith(str(tree / "conrec_verl")):
        sys.exit(f"the snapshot of {tree} imported another conrec_verl ({where})")


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def added_config_keys(base: Path, head: Path) -> list[str] | None:
    """When the two manifests differ only by ``config`` keys that the head adds (a new option,
    recorded with its default), those keys; otherwise None (a real difference)."""
    if not ((base / "manifest.json").is_file() and (head / "manifest.json").is_file()):
        return None
    a, b = (_flat(json.loads((d / "manifest.json").read_text())) for d in (base, head))
    added = sorted(set(b) - set(a))
    if set(a) - set(b) or any(a[k] != b[k] for k in a) or not all(k.startswith("config.") for k in added):
        return None
    return added


def compare(base: Path, head: Path, notes: list | None = None) -> list[str]:
    """What differs between two snapshots. A manifest that differs only by config keys the head
    adds is no difference (its data files are compared on their own); the keys go to ``notes``."""
    diffs = []
    fa, fb = (json.loads((d / "files.json").read_text()) for d in (base, head))
    for name in sorted(set(fa) | set(fb)):
        if name == "manifest.json" and name in fa and name in fb and fa[name] != fb[name]:
            added = added_config_keys(base, head)
            if added:
                if notes is not None:
                    notes.append(f"manifest.json records new config key(s) {', '.join(added)} (nothing else differs)")
                continue
        if fa.get(name) != fb.get(name):
            diffs.append(f"data file {name}: {'missing' if name not in fb else 'added' if name not in fa else 'bytes differ'}")
    ra, rb = (json.loads((d / "rewards.json").read_text()) for d in (base, head))
    if len(ra) != len(rb):
        diffs.append(f"reward batch: {len(ra)} vs {len(rb)} scored responses")
    for a, b in zip(ra, rb):
        if a != b:
            diffs.append(f"reward of {a['text']!r} ({a['file']}): {a} vs {b}")
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="git revision to compare this working tree against")
    p.add_argument("--rows", type=int, default=150, help="rows per rl/*.parquet file (default 150)")
    p.add_argument("--snapshot", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.snapshot:
        snapshot(Path(args.snapshot), args.rows)
        return
    if not args.base:
        p.error("--base is required")
    with tempfile.TemporaryDirectory(prefix="refactor_check_") as work:
        work = Path(work)
        tree = work / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.base], check=True)
        try:
            run_snapshot(tree, work / "out_base", args.rows)
            run_snapshot(ROOT, work / "out_head", args.rows)
            notes: list[str] = []
            diffs = compare(work / "out_base", work / "out_head", notes)
            n = len(json.loads((work / "out_head" / "rewards.json").read_text()))
            files = len(json.loads((work / "out_head" / "files.json").read_text()))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"base {args.base} vs this working tree: {files} data files, {n} scored responses (compute_score and "
          f"the conrec manager each)")
    for line in notes:
        print("  note:", line)
    for line in diffs[:40]:
        print("  DIFFERS:", line)
    print("outputs unchanged" if not diffs else f"{len(diffs)} difference(s)")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
