"""metrics.jsonl in, PNG curves out."""
from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(records: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG curves from metrics records: loss (+ every *loss* key), lr, tokens/s, other evals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ks in _groups(records).items():
        if not ks:
            continue
        fig = Figure(figsize=(6, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        for k in ks:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                        markersize=3, label=k, linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(UNITS.get(name, name))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


# y-axis labels with units for the metrics the trainers log
UNITS = {"loss": "cross-entropy (nats per token)", "lr": "learning rate", "tokens_per_s": "tokens per second",
         "tok_s": "tokens per second", "grad_norm": "gradient norm (before clipping)", "mfu": "model FLOPs utilization",
         "val_bpb": "bits per byte", "heldout_bpb": "bits per byte", "peak_mem_gb": "peak memory (GB)"}


def _groups(records: list[dict]) -> dict[str, list[str]]:
    """One plot per metric, except all losses together and all router loads together."""
    keys = []
    for r in records:
        for k, v in r.items():
            if k not in keys and k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    skip = {"tokens", "elapsed_s", "eta_s", "epoch"}
    groups = {"loss": [k for k in keys if "loss" in k]}
    for k in keys:
        if "loss" not in k and k not in skip and not k.startswith("router_load"):
            groups[k] = [k]
    loads = [k for k in keys if k.startswith("router_load")]
    if loads:
        groups["router_load"] = loads
    return groups


def safe_plots(records: list[dict], run_dir: Path) -> None:
    try:
        plot_metrics(records, run_dir / "plots")
    except Exception as e:  # a plot must never kill a training run
        print(f"warning: could not draw plots: {e}")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is suspect
    return out
