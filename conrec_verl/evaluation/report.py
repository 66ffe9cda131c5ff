"""Write an evaluation report: ``report.md`` (tables), ``metrics.json`` (everything) and PNG plots.

All files are first written to a staging folder beside ``out_dir`` and then moved in, so a crash
never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from conrec_verl.io_utils import atomic_dir  # noqa: E402

GOAL_RATIO = 1.25  # project goal: full-pipeline FHR@20 >= 1.25 x the best baseline


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _with_ci(r: dict, key: str) -> str:
    v = r["metrics"].get(key)
    ci = (r.get("ci") or {}).get(key)
    if v is None:
        return "–"
    return f"{v:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.4f}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def markdown(report: dict) -> str:
    k = report["k"]
    rows = report["rows"]
    ci_cols = [f"HR@{k}", f"FHR@{k}", f"LUF@{k}", f"LIF@{k}", "CandAcc"]
    cols = [f"P1HR@{k}", f"P2HR@{k}", f"sim_future_neg@{k}", f"sim_future_pos@{k}", "invalid_rate", "forget_rate"]
    m = report["machine"]
    reduced = report.get("reduced")
    lines = [f"# {report['title']}", ""]
    if reduced:
        lines += [f"**Smoke run: only the first {report['n_rows']} of {report.get('n_rows_split')} evaluation rows "
                  "were scored (`--max-rows`). No quality claim can be made from it.**", ""]
    lines += [f"- data: `{Path(report['data_dir']).name}` split `{report['split']}`, SID build `{report['sid_build']}`",
              f"- {report['n_rows']} evaluation rows" + (f" of {report.get('n_rows_split')}" if reduced else " (the full split)")
              + f", {report['n_items']} items with a SID, K = {k}",
              f"- exclusion rule (every row): `{report.get('exclusion', 'n/a')}`"
              + {"interacted": " (no row recommends an item the user liked or disliked before the cutoff)",
                 "dislikes": " (no row recommends an item the user disliked before the cutoff)",
                 "none": " (nothing excluded)"}.get(report.get("exclusion"), ""),
              f"- machine: {m.get('platform')}, {m.get('cpus')} CPUs" + (f", {m['gpu']}" if m.get("gpu") else "")
              + f", torch {m.get('torch')}; wall time {report['wall_s']} s"]
    if report.get("bootstrap"):
        b = report["bootstrap"]
        lines.append(f"- intervals: bootstrap 95% over rows ({b['resamples']} resamples, seed {b['seed']}); "
                     f"paired test: exact McNemar on per-row {report.get('paired_metric', f'FHR@{k}')} hits against the best baseline")
    if rows:
        r0 = rows[0]["metrics"]
        lines.append(f"- rows scored (≥ 1 future dislike): {r0['n_rows_scored']}; long-tail-user rows "
                     f"{r0['n_rows_long_tail_user']}; long-tail-item rows {r0['n_rows_long_tail_item']}; "
                     f"rows with candidates {r0['n_rows_candidates']}; cold share of future dislikes "
                     f"{_fmt(r0['cold_share'], 3)}; FHR ceiling (rows with a future dislike that has a SID) "
                     f"{_fmt(r0.get('fhr_ceiling'), 3)}")
    lines += ["", "## Quality", "", "Value [95% interval].", "",
              "| row | kind | " + " | ".join(ci_cols + cols) + " | wall s |",
              "|---|---|" + "---|" * (len(ci_cols) + len(cols) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | " + " | ".join(_with_ci(r, c) for c in ci_cols) + " | "
                     + " | ".join(_fmt(r["metrics"].get(c)) for c in cols) + f" | {r['wall_s']} |")
    lines += ["", "HR: next dislike; FHR: any dislike in the future window (main metric); LUF/LIF: FHR on "
              "long-tail users/items; P1HR/P2HR: a prediction shares the first 1/2 SID levels with a future "
              "dislike; CandAcc: the real dislike ranked first of its candidates; sim_future_neg/pos: mean "
              "cosine (codebook embeddings, as the reward) of a top-K entry to the closest future dislike / "
              "future like of its row; invalid_rate: top-K entries "
              "that are not a SID of this build. Denominators count dislikes of items without a SID as misses "
              "(see `conrec_verl.core.metrics`).", ""]
    best = report.get("best_baseline") or {}
    if best:
        lines.append("Best baseline per metric: " + ", ".join(
            f"{key} **{name}**" for key, name in best.items()) + ".")
        lines.append("")
    paired = [r for r in rows if r.get("paired")]
    if paired:
        pm = paired[0]["paired"]["metric"]
        lines += [f"## Paired test against the best baseline ({pm}: {paired[0]['paired']['against']})", "",
                  f"| row | {pm} | difference | rows only the row hits | rows only the baseline hits | McNemar p |",
                  "|---|---|---|---|---|---|"]
        for r in paired:
            t = r["paired"]
            lines.append(f"| {r['name']} | {_with_ci(r, pm)} | {t['diff']:+.4f} | {t['only_row']} | "
                         f"{t['only_baseline']} | {_p(t['p_value'])} |")
        lines.append("")
    ctx_rows = [r for r in rows if (r.get("info") or {}).get("by_context")]
    if ctx_rows:
        lines += [f"## Model rows by prompt context (FHR@{k} [95% interval])", "",
                  "Each model decoded with the prompt of context 1 (recent dislikes), 2 (all dislikes) and 3 "
                  "(dislikes and likes), same token budget; the row's own context is the one in the quality table.", "",
                  "| row | own context | context 1 | context 2 | context 3 |", "|---|---|---|---|---|"]
        for r in ctx_rows:
            bc = r["info"]["by_context"]
            cells = []
            for c in ("1", "2", "3"):
                e = bc.get(c)
                if e is None or e.get(f"FHR@{k}") is None:
                    cells.append("–")
                else:
                    ci = e.get(f"FHR@{k}_ci")
                    cells.append(f"{e[f'FHR@{k}']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            lines.append(f"| {r['name']} | {r['info'].get('prompt_context')} | " + " | ".join(cells) + " |")
        lines.append("")
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
    fkey = f"FHR@{k}"
    other = [r for r in rows if r["kind"] != "baseline" and r["metrics"].get(fkey) is not None]
    if fkey in best:
        b_row = next(r for r in rows if r["name"] == best[fkey])
        b = b_row["metrics"][fkey]
        lines += ["", "## Goal", "", f"Best baseline on {fkey}: **{b_row['name']}** = {_with_ci(b_row, fkey)}."]
        if reduced:
            lines.append(f"Smoke run ({report['n_rows']} of {report.get('n_rows_split')} rows): no goal claim.")
        else:
            for r in other:
                ratio = r["metrics"][fkey] / b if b else None
                t = r.get("paired") or {}
                sig = t.get("p_value") is not None and t["p_value"] < 0.05
                verdict = ("meets" if ratio is not None and ratio >= GOAL_RATIO and sig and t.get("diff", 0) > 0
                           else "misses")
                lines.append(f"- {r['name']}: {fkey} = {_fmt(r['metrics'][fkey])}, {_fmt(ratio, 2)}x the best baseline"
                             + (f", McNemar p = {_p(t['p_value'])}" if t else "")
                             + (f" (meets the {GOAL_RATIO}x goal: >= {GOAL_RATIO}x and a significant paired improvement)"
                                if verdict == "meets" else
                                f" (misses the {GOAL_RATIO}x goal, which needs >= {GOAL_RATIO}x and a significant paired improvement)"))
    forget = report.get("forget")
    if forget:
        lines += ["", "## Forget rate", "",
                  f"Reference: `{Path(str(forget['reference'])).name}` (the alignment-SFT model), alignment accuracy "
                  f"{_fmt(forget['reference_acc'])} on `{forget.get('alignment_file')}`"
                  + (f" ({forget['reference_rows']} held-out questions)" if forget.get("reference_rows") else "")
                  + "; forget rate = (reference − row) / reference."]
    if report.get("timings"):
        lines += ["", "## Evaluation wall time per phase", "", "| phase | seconds |", "|---|---|"]
        for t in report["timings"]:
            lines.append(f"| {t['phase']} | {t['seconds']:.1f} |")
        lines.append(f"| **total** | **{report['wall_s']}** |")
    info_rows = [r for r in rows if r.get("info")]
    if info_rows:
        lines += ["", "## Row details", ""]
        for r in info_rows:
            lines.append(f"- {r['name']}: " + ", ".join(f"{a}={_fmt(b)}" for a, b in r["info"].items()
                                                          if a != "by_context"))
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


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Write every report file into ``out_dir`` (staged beside it, then moved in)."""
    with atomic_dir(out_dir, merge=True) as stage:
        write_report_files(report, stage)
    return Path(out_dir)


def write_report_files(report: dict, folder: Path) -> None:
    """The report files -- ``metrics.json``, ``report.md`` and the plots -- written into ``folder``."""
    (folder / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(markdown(report))
    plot_metric_by_k(report, folder / "metric_by_k.png")
    plot_rows(report, folder / "rows.png")
    plot_filter_sweep(report, folder / "filter_sweep.png")
