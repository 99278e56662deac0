"""Evaluation output: a run's `results.json`, Markdown table, bar chart, and run-to-run comparison.

A run folder holds `config.yaml` (the settings), `results.json` (below), `results.md`,
`plots/scores.png` and `samples/<task>.jsonl` (one record per item: prompt, scores, answer).

`results.json` carries the run's settings and, in `results`, one flat row per (task, metric):
`{"model", "task", "metric", "value", "stderr", "n"}`; `tasks` adds per-task details (kind,
source, items scored out of how many, seconds, items/s, chance level).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.errors import LmforgeError

# Metrics shown in the table, in this order, when a task has them.
METRIC_ORDER = ["acc", "acc_norm", "exact_match", "pass@1", "pass@10", "pass@100", "bits_per_byte", "perplexity", "loss"]
LOWER_IS_BETTER = {"bits_per_byte", "perplexity", "loss"}


def _fmt(v, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if metric in ("perplexity",):
        return f"{v:.2f}"
    return f"{v:.4f}" if metric in LOWER_IS_BETTER else f"{v:.3f}"


def results_table(run: dict) -> str:
    """Markdown: one line per (task, metric)."""
    lines = ["| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for row in sorted_rows(run):
        se = row.get("stderr")
        lines.append(f"| {row['task']} | {row['metric']} | {_fmt(row['value'], row['metric'])} | "
                     f"{_fmt(se, row['metric']) if se is not None else '-'} | {row['n']} |")
    return "\n".join(lines)


def sorted_rows(run: dict) -> list[dict]:
    task_order = [t["task"] for t in run.get("tasks", [])]
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}

    def key(r):
        t = task_order.index(r["task"]) if r["task"] in task_order else len(task_order)
        return (t, rank.get(r["metric"], len(rank)), r["metric"])

    return sorted(run["results"], key=key)


def summary_header(run: dict) -> str:
    s = run.get("settings", {})
    parts = [f"model: {run.get('model')}", f"limit: {s.get('limit')}", f"fewshot: {s.get('fewshot')}",
             f"chat: {s.get('chat')}", f"seed: {s.get('seed')}"]
    if run.get("duration_s") is not None:
        parts.append(f"time: {run['duration_s']:.0f} s")
    return " · ".join(parts)


def plot_scores(run: dict, path: Path) -> Path | None:
    """Bar chart of each task's main score with ±1 stderr and the chance level (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = run.get("tasks", [])
    bounded = [t for t in tasks if t.get("primary") not in LOWER_IS_BETTER]
    bpb = [t for t in tasks if t.get("primary") == "bits_per_byte"]
    if not bounded and not bpb:
        return None
    panels = [p for p in (bounded, bpb) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 0.75 * len(tasks) + 3), 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": [max(len(p), 1) for p in panels]})
    for ax, group in zip(axes[0], panels):
        names = [t["task"] for t in group]
        vals = [t["metrics"][t["primary"]]["value"] for t in group]
        errs = [t["metrics"][t["primary"]].get("stderr") or 0.0 for t in group]
        x = range(len(group))
        ax.bar(x, vals, yerr=errs, capsize=3, color="#4C72B0" if group is bounded else "#DD8452")
        for i, t in enumerate(group):
            if t.get("chance") is not None:
                ax.hlines(t["chance"], i - 0.4, i + 0.4, colors="black", linestyles="dashed", linewidth=1)
            ax.text(i, vals[i] + errs[i], f"{vals[i]:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        if group is bounded:
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("acc / exact match / pass@1 (dashes: chance)")
        else:
            ax.set_ylabel("bits per byte (lower is better)")
    fig.suptitle(f"{run.get('model')}  (limit {run.get('settings', {}).get('limit')}, "
                 f"{run.get('settings', {}).get('fewshot')}-shot)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_run(out: Path, run: dict, samples: dict[str, list[dict]] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(run, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(f"{summary_header(run)}\n\n{results_table(run)}\n")
    for name, recs in (samples or {}).items():
        p = out / "samples" / (name.replace("/", "__").replace("@", "_") + ".jsonl")
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    plot_scores(run, out / "plots" / "scores.png")
    return out


def load_run(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise LmforgeError(f"no eval results at {path} (expected a run folder or its results.json)")
    try:
        run = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{p} is not valid JSON: {e}") from None
    if "results" not in run:
        raise LmforgeError(f"{p} is not an lmforge eval results file (no 'results')")
    run.setdefault("_path", str(p))
    return run


def compare(a: dict, b: dict) -> str:
    """Markdown side by side: every (task, metric) of either run, with B − A and its stderr."""
    ia = {(r["task"], r["metric"]): r for r in a["results"]}
    ib = {(r["task"], r["metric"]): r for r in b["results"]}
    keys = [k for k in ((r["task"], r["metric"]) for r in sorted_rows(a)) if k in ia]
    keys += [k for k in ((r["task"], r["metric"]) for r in sorted_rows(b)) if k not in ia]
    lines = [f"A: {a.get('model')} ({a.get('_path', '')})", f"B: {b.get('model')} ({b.get('_path', '')})", "",
             "| task | metric | A | B | B − A | ± stderr | n (A/B) |", "|---|---|---:|---:|---:|---:|---:|"]
    for k in keys:
        ra, rb = ia.get(k), ib.get(k)
        va = ra["value"] if ra else None
        vb = rb["value"] if rb else None
        delta = se = None
        if va is not None and vb is not None:
            delta = vb - va
            sa, sb = (ra.get("stderr") if ra else None), (rb.get("stderr") if rb else None)
            if sa is not None and sb is not None:
                se = math.sqrt(sa ** 2 + sb ** 2)
        d = "-" if delta is None else f"{delta:+.4f}"
        lines.append(f"| {k[0]} | {k[1]} | {_fmt(va, k[1])} | {_fmt(vb, k[1])} | {d} | "
                     f"{'-' if se is None else f'{se:.4f}'} | {ra['n'] if ra else '-'}/{rb['n'] if rb else '-'} |")
    return "\n".join(lines)
