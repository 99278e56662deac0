"""Summarize a pretraining run folder into a result JSON (command, commit, machine, tokens/s,
loss curve, final bits per byte, last sample) for benchmarks/results/.

    python benchmarks/pretrain_result.py runs/cpu-1h --command "lmforge pretrain --config recipes/pretrain/cpu-1h.yaml" \
        --out benchmarks/results/pretrain_cpu_1h.json [--note "..."]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from lmforge.train.trainer import read_metrics


def summarize(run: Path, command: str, note: str = "") -> dict:
    from lmforge.tokenizer_train import run_metadata

    recs = read_metrics(run / "metrics.jsonl")
    if not recs:
        raise SystemExit(f"no metrics in {run}")
    train_recs = [r for r in recs if "tokens_per_s" in r]
    evals = [r for r in recs if "heldout_bpb" in r or "val_bpb" in r]
    last = recs[-1]
    final_eval = evals[-1] if evals else {}
    samples = (run / "samples.jsonl").read_text().splitlines() if (run / "samples.jsonl").exists() else []
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    elapsed = last.get("elapsed_s") or 0.0
    meta = run_metadata()
    meta["command"] = command
    return {
        **meta,
        "note": note,
        "load_average_1min_at_summary": round(os.getloadavg()[0], 2),
        "config": cfg,
        "steps": last["step"],
        "tokens": last.get("tokens"),
        "train_seconds": elapsed,
        # wall-clock average (evals, samples and checkpoints included) and the median of the logged
        # training-only rates
        "tokens_per_s_wall": round(last.get("tokens", 0) / elapsed, 1) if elapsed else None,
        "tokens_per_s_train_median": round(sorted(r["tokens_per_s"] for r in train_recs)[len(train_recs) // 2], 1),
        "final": {k: final_eval.get(k) for k in ("step", "loss", "val_loss", "val_bpb", "heldout_loss", "heldout_bpb")},
        "curve": [{k: r[k] for k in ("step", "loss", "lr", "tokens_per_s", "val_loss", "val_bpb", "heldout_bpb") if k in r}
                  for r in train_recs],
        "last_sample": json.loads(samples[-1]) if samples else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--command", required=True, help="the command that produced the run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    res = summarize(Path(args.run), args.command, args.note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    f = res["final"]
    print(f"{res['steps']} steps, {res['tokens']:,} tokens in {res['train_seconds']:.0f} s ({res['tokens_per_s_wall']} tok/s wall, {res['tokens_per_s_train_median']} training); "
          f"final loss {f.get('loss')}, val_bpb {f.get('val_bpb')}, heldout_bpb {f.get('heldout_bpb')} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
