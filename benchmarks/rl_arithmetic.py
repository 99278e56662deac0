"""Does RL (GRPO) lift a model's held-out accuracy on a checkable task? Measured before/after.

The task: 2-digit addition ("What is 47 + 38? Answer with the number only."), reward 1 when the
last number of the reply is the sum (the `exact` reward). Held-out problems never occur in
training (split by a hash of the problem).

`--stage small` (the bar: +20 points within 30 minutes on 2 CPU cores):
  1. an lmforge model from scratch (4 layers, d_model 128, the default model's tokenizer and
     chat template), taught the format and some addition by `lmforge sft` (full finetuning) on
     only `--sft-problems` labelled problems for `--sft-steps` steps: it learns the format but
     generalizes poorly to unseen sums;
  2. `lmforge rl` (GRPO, full finetuning) on a stream of other, unlabelled problems, with the
     checker as the only signal, for at most `--minutes` (the trainer's time limit);
  held-out greedy accuracy is measured before RL and every `--eval-every` steps.
`--stage default`: the same RL on the default model (SmolLM2-135M-Instruct) with LoRA.

    python benchmarks/rl_arithmetic.py --stage small --minutes 30
    python benchmarks/rl_arithmetic.py --stage default --minutes 60

Writes benchmarks/results/rl_arithmetic_<stage>.json (command, commit, machine and its load,
the accuracy curve) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from lmforge.provenance import git_commit
sys.path.insert(0, str(ROOT))




def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg()}


def make_small_model(out: Path, seed: int) -> Path:
    from lmforge.loading import load_tokenizer, save_hf
    from lmforge.model import Config, Transformer

    tok = load_tokenizer(None)
    cfg = Config(vocab_size=49152, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=128,
                 tie_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    save_hf(Transformer(cfg).init_weights(seed=seed), tok, out)
    return out


def sft_small(model_dir: Path, out: Path, n_problems: int, steps: int, seed: int, save_every: int = 0,
              digits_b: int = 0, lr: float = 1e-3) -> Path:
    from lmforge.align.common import write_jsonl
    from lmforge.align.tasks import arithmetic_problems, sft_records
    from lmforge.config import from_dict
    from lmforge.finetune.sft import SFTConfig, run_sft

    data = write_jsonl(out / "sft_data.jsonl", sft_records(arithmetic_problems(n_problems, seed + 100, 2, "+", "train", digits_b=digits_b)))
    cfg = from_dict(SFTConfig, {
        "model": str(model_dir), "data": str(data), "out": str(out / "run"), "method": "full", "batch_size": 32,
        "max_seq_len": 128, "seed": seed,
        "train": {"lr": lr, "warmup_steps": 20, "max_steps": steps, "schedule": "cosine", "min_lr_ratio": 0.1,
                  "log_every": 20, "weight_decay": 0.0, "save_every": save_every, "keep_last": 0},
    })
    run_sft(cfg, progress=False)
    return out / "run"


def pick_start(run: Path, n_eval: int, seed: int, start_min: float, digits_b: int = 0) -> tuple[Path, list]:
    """Held-out accuracy of every SFT checkpoint; the earliest one reaching `start_min` (else the last)."""
    from lmforge.align.grpo import evaluate_policy
    from lmforge.align.rewards import exact_answer
    from lmforge.align.tasks import arithmetic_problems
    from lmforge.loading import load_model

    held = arithmetic_problems(n_eval, seed + 1, 2, "+", "heldout", digits_b=digits_b)  # the set RL reports on
    table, chosen = [], None
    for ck in sorted((run / "checkpoints").glob("step-*")):
        m, tok = load_model(ck)
        acc = evaluate_policy(m, tok, held, exact_answer, 8, 100)["eval_accuracy"]
        table.append({"checkpoint": ck.name, "heldout_accuracy": acc})
        print(f"SFT {ck.name}: held-out accuracy {acc:.3f}", flush=True)
        if chosen is None and acc >= start_min:
            chosen = ck
    return chosen or sorted((run / "checkpoints").glob("step-*"))[-1], table


def run_rl_stage(model: str, out: Path, method: str, minutes: float, args) -> dict:
    from lmforge.align.grpo import RLConfig, run_rl
    from lmforge.config import from_dict

    cfg = from_dict(RLConfig, {
        "model": model, "out": str(out), "method": method, "reward": "exact", "seed": args.seed,
        "task": {"name": "arithmetic", "n": args.rl_problems, "n_eval": args.n_eval, "digits": 2, "digits_b": args.digits_b,
                 "ops": "+"},
        "eval_batch_size": 100,
        "grpo": {"group_size": args.group_size, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                 "temperature": args.temperature, "beta": args.beta, "clip_eps": 0.2, "updates_per_rollout": args.updates},
        "lora": {"r": 16, "alpha": 32, "targets": ["all-linear"]},
        "train": {"lr": args.lr, "max_steps": args.max_steps, "eval_every": args.eval_every, "log_every": 5,
                  "time_limit_s": minutes * 60, "save_every": 0},
    })
    t0 = time.time()
    res = run_rl(cfg, progress=False)
    from lmforge.train import read_metrics

    curve = [{"step": r["step"], "eval_accuracy": r["eval_accuracy"], "elapsed_s": r.get("elapsed_s", 0.0)}
             for r in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in r]
    return {"config": {k: v for k, v in json.loads(json.dumps(cfg, default=lambda o: o.__dict__)).items()},
            "summary": res["summary"], "curve": curve, "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["small", "default"], default="small")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", default="/tmp/lmforge-rl-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-problems", type=int, default=1000)
    ap.add_argument("--sft-steps", type=int, default=900)
    ap.add_argument("--sft-save-every", type=int, default=100)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--digits-b", type=int, default=0, help="digits of the second operand (0 = 2)")
    ap.add_argument("--rl-problems", type=int, default=5000, help="unlabelled training problems for RL")
    ap.add_argument("--start-min", type=float, default=0.15, help="RL starts from the first SFT checkpoint this accurate")
    ap.add_argument("--from-sft", default="", help="skip stages 1-2: RL from this model folder")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.02)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--updates", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.stage
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = {"benchmark": "rl_arithmetic", "stage": args.stage, "command": " ".join(sys.argv), "commit": git_commit(),
            "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    if args.stage == "small":
        args.lr = args.lr or 3e-5
        if args.from_sft:
            sft = Path(args.from_sft)
            info["sft"] = {"from": str(sft)}
        else:
            base = make_small_model(out / "scratch", args.seed)
            t_sft = time.time()
            run = sft_small(base, out / "sft", args.sft_problems, args.sft_steps, args.seed, args.sft_save_every,
                            args.digits_b, args.sft_lr)
            sft, table = pick_start(run, args.n_eval, args.seed, args.start_min, args.digits_b)
            info["sft"] = {"problems": args.sft_problems, "steps": args.sft_steps, "wall_s": round(time.time() - t_sft, 1),
                           "checkpoints": table, "rl_starts_from": sft.name, "start_min": args.start_min}
        rl = run_rl_stage(str(sft), out / "rl", "full", args.minutes, args)
    else:
        args.lr = args.lr or 2e-4
        rl = run_rl_stage(None, out / "rl", "lora", args.minutes, args)
    info["rl"] = rl
    s = rl["summary"]
    before, after = s["before"]["eval_accuracy"], s["after"]["eval_accuracy"]
    best = max([c["eval_accuracy"] for c in rl["curve"]] + [after])
    info["result"] = {"heldout_items": s["heldout_items"], "accuracy_before": before, "accuracy_after": after,
                      "lift_points": round(100 * (after - before), 1), "best_accuracy": best, "rl_steps": s["steps"],
                      "rl_wall_s": rl["wall_s"], "stopped": s["stopped"], "total_wall_s": round(time.time() - t0, 1)}
    info["machine"]["loadavg_end"] = os.getloadavg()
    path = Path(args.results) / f"rl_arithmetic_{args.stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")
    r = info["result"]
    print(f"\n{'stage':<10}{'before':>8}{'after':>8}{'lift':>8}{'steps':>8}{'RL min':>8}")
    print(f"{args.stage:<10}{r['accuracy_before']:>8.3f}{r['accuracy_after']:>8.3f}{r['lift_points']:>8.1f}{r['rl_steps']:>8}{r['rl_wall_s'] / 60:>8.1f}")
    for c in rl["curve"]:
        print(f"  step {c['step']:>5}  accuracy {c['eval_accuracy']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
