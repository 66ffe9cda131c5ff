"""Write an evaluation report: ``report.md`` (tables), ``metrics.json`` (everything) and PNG plots.

All files are first written to a staging folder beside ``out_dir`` and then moved in, so a crash
never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GOAL_RATIO = 1.25  # project goal: full-pipeline FHR@20 >= 1.25 x the best baseline


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(report: dict) -> str:
    k = report["k"]
    rows = report["rows"]
    cols = [f"HR@{k}", f"FHR@{k}", f"LUF@{k}", f"LIF@{k}", f"P1HR@{k}", f"P2HR@{k}", "CandAcc", "invalid_rate",
            "forget_rate"]
    m = report["machine"]
    lines = [f"# {report['title']}", "",
             f"- data: `{Path(report['data_dir']).name}` split `{report['split']}`, SID build `{report['sid_build']}`",
             f"- {report['n_rows']} evaluation rows, {report['n_items']} items with a SID, K = {k}",
             f"- machine: {m.get('platform')}, {m.get('cpus')} CPUs" + (f", {m['gpu']}" if m.get("gpu") else "")
             + f", torch {m.get('torch')}; wall time {report['wall_s']} s"]
    if rows:
        r0 = rows[0]["metrics"]
        lines.append(f"- rows scored (≥ 1 future dislike): {r0['n_rows_scored']}; long-tail-user rows "
                     f"{r0['n_rows_long_tail_user']}; long-tail-item rows {r0['n_rows_long_tail_item']}; "
                     f"rows with candidates {r0['n_rows_candidates']}; cold share of future dislikes "
                     f"{_fmt(r0['cold_share'], 3)}; FHR ceiling (rows with a future dislike that has a SID) "
                     f"{_fmt(r0.get('fhr_ceiling'), 3)}")
    lines += ["", "## Quality", "", "| row | kind | " + " | ".join(cols) + " | wall s |",
              "|---|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | " + " | ".join(_fmt(r["metrics"].get(c)) for c in cols)
                     + f" | {r['wall_s']} |")
    lines += ["", "HR: next dislike; FHR: any dislike in the future window (main metric); LUF/LIF: FHR on "
              "long-tail users/items; P1HR/P2HR: a prediction shares the first 1/2 SID levels with a future "
              "dislike; CandAcc: the real dislike ranked first of its candidates; invalid_rate: top-K entries "
              "that are not a SID of this build. Denominators count dislikes of items without a SID as misses "
              "(see `conrec_verl.core.metrics`).", ""]
    lines += ["## FHR by K", "", "| row | " + " | ".join(f"FHR@{x}" for x in report["ks"]) + " |",
              "|---|" + "---|" * len(report["ks"])]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(r["metrics"].get(f"FHR@{x}")) for x in report["ks"]) + " |")
    if any(r["filter_sweep"] for r in rows):
        ths = [s["threshold"] for s in rows[0]["filter_sweep"]]
        lines += ["", f"## Deployment filter (top-{k} predicted negatives, cosine on codebook embeddings)", "",
                  "Share of future dislikes removed / share of future likes wrongly removed, per threshold.", "",
                  "| row | " + " | ".join(f"θ={t:g}" for t in ths) + " |", "|---|" + "---|" * len(ths)]
        for r in rows:
            cells = [f"{_fmt(s['dislikes_removed'], 3)} / {_fmt(s['likes_removed'], 3)}" for s in r["filter_sweep"]]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    base = [r for r in rows if r["kind"] == "baseline" and r["metrics"].get(f"FHR@{k}") is not None]
    other = [r for r in rows if r["kind"] != "baseline" and r["metrics"].get(f"FHR@{k}") is not None]
    if base:
        best = max(base, key=lambda r: r["metrics"][f"FHR@{k}"])
        lines += ["", "## Goal", "", f"Best baseline: **{best['name']}** FHR@{k} = {_fmt(best['metrics'][f'FHR@{k}'])}."]
        for r in other:
            b = best["metrics"][f"FHR@{k}"]
            ratio = r["metrics"][f"FHR@{k}"] / b if b else None
            verdict = "meets" if ratio is not None and ratio >= GOAL_RATIO else "misses"
            lines.append(f"- {r['name']}: FHR@{k} = {_fmt(r['metrics'][f'FHR@{k}'])}, "
                         f"{_fmt(ratio, 2)}x the best baseline ({verdict} the {GOAL_RATIO}x goal)")
    info_rows = [r for r in rows if r.get("info")]
    if info_rows:
        lines += ["", "## Row details", ""]
        for r in info_rows:
            lines.append(f"- {r['name']}: " + ", ".join(f"{a}={_fmt(b)}" for a, b in r["info"].items()))
    lines += ["", "Plots: `metric_by_k.png`, `rows.png`, `filter_sweep.png`; per-row predictions in `predictions/`.", ""]
    return "\n".join(lines)


def plot_metric_by_k(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(("FHR", "HR"), axes):
        for r in report["rows"]:
            ys = [r["metrics"].get(f"{metric}@{x}") for x in report["ks"]]
            ax.plot(report["ks"], [float("nan") if y is None else y for y in ys], marker="o", label=r["name"])
        ax.set_xlabel("K")
        ax.set_ylabel(f"{metric}@K")
        ax.set_title(f"{metric}@K")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rows(report: dict, path: Path) -> None:
    k = report["k"]
    metrics = [f"HR@{k}", f"FHR@{k}", f"LUF@{k}", f"LIF@{k}", f"P1HR@{k}", "CandAcc"]
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(metrics) + 0.3 * len(rows)), 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [r["metrics"].get(m) for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], [0 if v is None else v for v in vals],
               width=width, label=r["name"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics)
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_filter_sweep(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    drawn = 0
    for r in report["rows"]:
        pts = [(s["likes_removed"], s["dislikes_removed"]) for s in r["filter_sweep"]
               if s["likes_removed"] is not None and s["dislikes_removed"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=r["name"])
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no threshold sweep", ha="center", va="center", transform=ax.transAxes)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("future likes removed (share)")
    ax.set_ylabel("future dislikes removed (share)")
    ax.set_title("deployment filter, threshold sweep")
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str | os.PathLike, staged: Path | None = None) -> Path:
    """Write every report file into ``out_dir`` (staged, then moved in)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent)) if staged is None else staged
    try:
        (stage / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
        (stage / "report.md").write_text(markdown(report))
        plot_metric_by_k(report, stage / "metric_by_k.png")
        plot_rows(report, stage / "rows.png")
        plot_filter_sweep(report, stage / "filter_sweep.png")
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(stage.rglob("*")):
            if src.is_file():
                dst = out_dir / src.relative_to(stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir
