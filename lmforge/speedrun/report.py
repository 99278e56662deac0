"""The speedrun's report card: OUT/report.md with its plots (loss and bits per byte against
tokens seen, time per stage), the eval table, sample chats, the machine, and the command to chat
with the result. Everything comes from OUT/speedrun.json and the trainers' metrics.jsonl."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from lmforge.train.plots import read_metrics


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(111)


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _series(records: list[dict], key: str, x: str = "tokens") -> tuple[list, list]:
    """(x, y) of `key`; an eval logged on a step of its own has no token count, so it takes the
    count the step implies (the run's tokens per step are constant)."""
    per_step = next((r["tokens"] / r["step"] for r in records if r.get("tokens") and r.get("step")), 0)
    pts = [(r.get(x, r["step"] * per_step if x == "tokens" else None), r[key]) for r in records
           if isinstance(r.get(key), (int, float))]
    pts = [p for p in pts if isinstance(p[0], (int, float))]
    return [p[0] / 1e6 if x == "tokens" else p[0] for p in pts], [p[1] for p in pts]


def plot_losses(pre: list[dict], sft: list[dict], out: Path, final_bpb: float | None = None) -> list[Path]:
    paths = []
    fig, ax = _figure()
    for key, label in (("loss", "train loss"), ("val_loss", "validation loss")):
        xs, ys = _series(pre, key)
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1)
    ax.set(xlabel="tokens seen (millions)", ylabel="cross-entropy (nats per token)", title="Pretraining loss")
    paths.append(_save(fig, ax, out / "pretrain_loss.png"))
    fig, ax = _figure()
    for key, label in (("val_bpb", "validation split"), ("heldout_bpb", "held-out English")):
        xs, ys = _series(pre, key)
        if xs:
            ax.plot(xs, ys, label=label, marker="o", markersize=3, linewidth=1)
    end = _series(pre, "loss")[0]
    if final_bpb is not None and end:
        ax.plot([end[-1]], [final_bpb], marker="*", markersize=10, linestyle="none", label="held-out English, final model")
    ax.set(xlabel="tokens seen (millions)", ylabel="bits per byte (lower is better)", title="Pretraining: bits per byte of text")
    paths.append(_save(fig, ax, out / "pretrain_bpb.png"))
    fig, ax = _figure()
    xs, ys = _series(sft, "loss", x="step")
    ax.plot(xs, ys, label="train loss (assistant tokens)", marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats per token)", title="Chat finetuning (SFT) loss")
    paths.append(_save(fig, ax, out / "sft_loss.png"))
    return paths


def plot_stages(stages: dict, out: Path) -> Path:
    fig, ax = _figure()
    names = [n for n in stages if isinstance(stages[n].get("seconds"), (int, float))]
    ax.barh(names[::-1], [stages[n]["seconds"] / 60 for n in names[::-1]], color="#4a7ab5")
    ax.set(xlabel="wall-clock time (minutes)", ylabel="stage", title="Where the time went")
    return _save(fig, ax, out / "stages.png")


def machine() -> str:
    import torch

    from lmforge.provenance import cpu_count

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cpu_count()} CPU cores{gpu}; torch {torch.__version__}, {platform.system()} {platform.release()}"


def _chat_md(messages: list[dict], reply: str | None = None) -> list[str]:
    from lmforge.tools.protocol import render_tool_calls_text

    lines = []
    for m in messages:
        text = m.get("content") or ""
        if m.get("tool_calls"):
            text = (text + " " + render_tool_calls_text(m["tool_calls"])).strip()
        lines.append(f"> **{m['role']}**: {text}".replace("\n", " "))
    if reply is not None:
        lines.append(f"> **assistant**: {reply}".replace("\n", " "))
    return lines + [""]


def _last(records: list[dict], key: str):
    """The newest value of `key` (evals are logged on their own steps; a time limit skips the last)."""
    return next((r[key] for r in reversed(records) if isinstance(r.get(key), (int, float))), None)


def _fmt(v, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_report(out: Path, state: dict) -> Path:
    st = state["stages"]
    pre = read_metrics(out / "pretrain" / "metrics.jsonl")
    sft = read_metrics(out / "sft" / "metrics.jsonl")
    plots = plot_losses(pre, sft, out, st["eval"].get("heldout_bpb")) + [plot_stages(st, out)]
    plan, ev = st["plan"], st["eval"]
    pm = {"val_bpb": _last(pre, "val_bpb"), "heldout_bpb": ev.get("heldout_bpb", _last(pre, "heldout_bpb"))}
    total = sum(r.get("seconds", 0) for r in st.values())  # resumed runs: the stages' own time
    loads = [f"{x:.2f}" for x in state.get("load_avg", []) if x is not None]
    L = [f"# Speedrun report card ({state['config']['budget']} budget)", "",
         f"- written {time.strftime('%Y-%m-%d %H:%M')}; the stages took {total / 60:.1f} min of wall-clock time in all",
         f"- machine: {machine()}; device {plan['device']}, training in {plan['train_dtype']}",
         f"- load average (1 min) at each start: {', '.join(loads) or 'n/a'} (the machine may be shared)",
         f"- model: {plan['depth']} layers, d_model {plan['d_model']}, context {plan['seq_len']}, "
         f"{ev['parameters'] / 1e6:.2f} M parameters; tokenizer: BPE with {st['tokenizer']['vocab_size']} tokens", "",
         "## Results", "", "| measure | value |", "|---|---|",
         f"| held-out identity questions answered with the model's name | {ev['identity_ok']}/{len(ev['identity'])} |",
         f"| held-out 3-digit sums answered correctly through the calculator | {ev['arithmetic_ok']}/{len(ev['arithmetic'])} |",
         f"| pretraining: validation bits per byte (last eval) | {_fmt(pm['val_bpb'])} |",
         f"| pretraining: held-out English bits per byte (final model) | {_fmt(pm['heldout_bpb'])} |",
         f"| pretraining: final train loss (nats/token) | {_fmt(st['pretrain']['loss'])} |",
         f"| SFT: final train loss (nats/token) | {_fmt(st['sft']['loss'])} |", "",
         "## Stages", "", "| stage | minutes | load avg (1 min) at its end | what it made |", "|---|---|---|---|"]
    L += [f"| {name} | {r.get('seconds', 0) / 60:.1f} | {r.get('load_avg_end', 'n/a')} | {_stage_what(name, r)} |"
          for name, r in st.items()]
    L += ["", *[f"![{p.stem}]({p.name})" for p in plots], "", "## Sample chats (greedy)", ""]
    for s in ev["samples"]:
        L += _chat_md(s["messages"], s.get("reply"))
    L += ["## Held-out identity questions", ""] + [f"- {'✓' if r['ok'] else '✗'} {r['question']} → {r['reply']!r}" for r in ev["identity"]]
    L += ["", "## Held-out sums", ""] + [f"- {'✓' if r['ok'] else '✗'} {r['question']} (= {r['expected']})"
                                         f"{'' if r['via_calculator'] else ' — calculator not used or given wrong numbers'}"
                                         for r in ev["arithmetic"]]
    L += ["", "## Chat with it", "", "```bash", f"lmforge chat --model {out / 'sft'} --tools calculator", "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path


def _stage_what(name: str, r: dict) -> str:
    if name == "fetch":
        return ", ".join(f"{k}: {v}" for k, v in r["status"].items())
    if name == "tokenizer":
        return f"BPE, {r['vocab_size']} tokens, trained on {r['trained_on_bytes'] / 1e6:.1f} MB"
    if name == "prepare":
        return f"{r['train_tokens'] / 1e6:.2f} M train tokens, {r['val_tokens']:,} validation tokens"
    if name == "plan":
        return (f"measured {r['step_s']:.2f} s per pretraining step, {r['sft_step_s']:.2f} s per SFT step: planned "
                f"{r['pretrain_steps']} + {r['sft_steps']} steps (the trainers run on the clock)")
    if name in ("pretrain", "sft"):
        tok = r["metrics"].get("tokens")
        extra = f", {r['records']} conversations" if name == "sft" else ""
        return f"{r['step']} steps ({r['stopped']}){extra}" + (f", {tok / 1e6:.2f} M tokens" if tok else "")
    if name == "eval":
        return f"{len(r['identity'])} identity + {len(r['arithmetic'])} arithmetic questions"
    return os.path.basename(str(r.get("path", "")))
