"""Time to score a 1,000-item multiple-choice task on the default model: lmforge vs transformers.

    python benchmarks/eval_speed.py [--items 1000] [--threads 2] [--task synthetic|NAME]

Same process, same threads, same requests (fp32, the default model's weights in both):
- lmforge: `lmforge.eval.scoring.loglikelihoods` (context once per item, choices packed behind
  it with a block mask; the output head only on continuation positions);
- lmforge, one row per choice (the plain layout, to show what the shared context buys);
- transformers: LlamaForCausalLM on one `context + choice` row per choice, right-padded batches
  of the same token budget, full logits and log-softmax as lm-evaluation-harness's HF backend
  does.
The default task is a deterministic 4-way two-digit addition set (no download); `--task NAME`
takes a BIG-bench multiple-choice task from the cache instead (e.g. arithmetic/2_digit_addition,
1,000 items with 7 choices listed in each prompt). Prints a table and writes
benchmarks/results/eval_speed.json, including the load average: on a shared machine the
absolute times move with the neighbours' work, the ratio much less.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "eval_speed.json"


def synthetic_items(n: int, seed: int = 1234) -> list[tuple[str, list[str], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        s = a + b
        choices = [str(s), str(s + 1), str(s - 10), str(s + 10)]
        rng.shuffle(choices)
        out.append((f"Question: What is {a} plus {b}?\nAnswer: ", choices, choices.index(str(s))))
    return out


def bigbench_items(name: str, n: int) -> list[tuple[str, list[str], int]]:
    from lmforge.eval.sources import load_tasks
    from lmforge.eval.tasks import build_context, select_items

    (task,) = load_tasks(name)
    if task.kind != "multiple_choice":
        raise SystemExit(f"{name} is not a multiple-choice task")
    return [(build_context(task, i, 0, 0), task.items[i].choices, task.items[i].gold[0]) for i in select_items(task, n, 0)]


@torch.inference_mode()
def hf_score(hf, rows: list[tuple[list[int], int]], batch_tokens: int) -> list[float]:
    """Sum of continuation log-probs per row (ids, n_context), the usual HF way."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    i = 0
    while i < len(order):
        T = len(rows[order[i]][0])
        chunk = order[i : i + max(1, batch_tokens // T)]
        i += len(chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, k in enumerate(chunk):
            ids[r, : len(rows[k][0])] = torch.tensor(rows[k][0])
            mask[r, : len(rows[k][0])] = 1
        logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, k in enumerate(chunk):
            w, n_ctx = rows[k]
            tgt = torch.tensor(w[n_ctx:])
            out[k] = float(logp[r, torch.arange(n_ctx - 1, len(w) - 1), tgt].sum())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", default="synthetic")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--skip-unshared", action="store_true", help="skip lmforge's one-row-per-choice run")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from lmforge.eval.scoring import encode_pair, loglikelihoods, score_groups_unshared
    from lmforge.loading import DEFAULT_MODEL_ID, load_model
    from lmforge.loading.hf import config_to_hf

    load0 = os.getloadavg()
    model, tok = load_model(None, dtype="fp32")
    items = synthetic_items(args.items) if args.task == "synthetic" else bigbench_items(args.task, args.items)
    requests = [(ctx, choices) for ctx, choices, _ in items]
    groups = []
    for ctx, choices in requests:
        pairs = [encode_pair(tok, ctx, c) for c in choices]
        groups.append((pairs[0][0], [p[1] for p in pairs]))
    rows = [(ctx + c, len(ctx)) for ctx, conts in groups for c in conts]
    n_choices = sum(len(c) for _, c in requests)
    tok_shared = sum(len(ctx) + sum(len(c) for c in conts) for ctx, conts in groups)
    tok_rows = sum(len(w) for w, _ in rows)
    print(f"{len(items)} items, {n_choices} choices; tokens run: shared context {tok_shared}, one row per choice {tok_rows}; "
          f"threads {torch.get_num_threads()}", flush=True)

    timings = {}
    t = time.perf_counter()
    ours = loglikelihoods(model, tok, requests, batch_tokens=args.batch_tokens)
    timings["lmforge"] = time.perf_counter() - t
    print(f"lmforge: {timings['lmforge']:.1f} s", flush=True)
    if not args.skip_unshared:
        t = time.perf_counter()
        plain = score_groups_unshared(model, groups, batch_tokens=args.batch_tokens)
        timings["lmforge_one_row_per_choice"] = time.perf_counter() - t
        print(f"lmforge, one row per choice: {timings['lmforge_one_row_per_choice']:.1f} s", flush=True)

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.cfg))).eval()
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    hf.tie_weights()
    t = time.perf_counter()
    ref = hf_score(hf, rows, args.batch_tokens)
    timings["transformers"] = time.perf_counter() - t
    print(f"transformers: {timings['transformers']:.1f} s", flush=True)
    load1 = os.getloadavg()

    flat_ours = [s.logprob for sc in ours for s in sc]
    worst = max(abs(a - b) for a, b in zip(flat_ours, ref))
    if not args.skip_unshared:  # the two lmforge layouts must agree too
        worst = max(worst, max(abs(a - s.logprob) for a, s in zip(flat_ours, (s for sc in plain for s in sc))))
    k = 0
    acc_ours = acc_ref = 0
    for (_, choices, gold), sc in zip(items, ours):
        r = ref[k : k + len(choices)]
        k += len(choices)
        acc_ours += max(range(len(sc)), key=lambda j: sc[j].logprob) == gold
        acc_ref += max(range(len(r)), key=r.__getitem__) == gold
    n = len(items)
    table = [("lmforge (shared context)", timings["lmforge"], tok_shared)]
    if "lmforge_one_row_per_choice" in timings:
        table.append(("lmforge (one row per choice)", timings["lmforge_one_row_per_choice"], tok_rows))
    table.append(("transformers (one row per choice)", timings["transformers"], tok_rows))
    print("\n| scorer | seconds | items/s | tokens run | vs transformers |\n|---|---:|---:|---:|---:|")
    for name, sec, toks in table:
        print(f"| {name} | {sec:.1f} | {n / sec:.1f} | {toks} | {timings['transformers'] / sec:.2f}x |")
    print(f"\naccuracy: lmforge {acc_ours / n:.3f}, transformers {acc_ref / n:.3f}; max |Δ log p| = {worst:.2e}")
    print(f"load average: {load0[0]:.1f} before, {load1[0]:.1f} after (other work on this machine)")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    result = {
        "benchmark": "eval_speed", "command": "python " + " ".join(sys.argv), "git_commit": commit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": DEFAULT_MODEL_ID, "dtype": "fp32",
        "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "loadavg_before": load0, "loadavg_after": load1},
        "task": args.task, "items": n, "choices": n_choices, "batch_tokens": args.batch_tokens,
        "tokens_run": {"shared_context": tok_shared, "one_row_per_choice": tok_rows},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "items_per_s": {k: round(n / v, 2) for k, v in timings.items()},
        "speedup_vs_transformers": {k: round(timings["transformers"] / v, 2) for k, v in timings.items()},
        "accuracy": {"lmforge": acc_ours / n, "transformers": acc_ref / n},
        "max_abs_logprob_diff": worst,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
