"""Thinking slower: accuracy against N for best-of-N (reward-model reranking) and self-consistency
(majority vote), next to pass@N, on held-out addition problems.

    python benchmarks/best_of_n.py --rm runs/rm-arith                                # the default model as policy
    python benchmarks/best_of_n.py --policy runs/sft/checkpoints/step-000300 --rm R  # any lmforge model
    python benchmarks/best_of_n.py --digits-b 1                                      # trains the reward model first

Without --rm, a reward model is trained first with `lmforge rm train` and the recipe
recipes/rm/arithmetic.yaml (the default model + LoRA on correct vs perturbed sums; see
benchmarks/reward_model.py for its own measurement), unless --rm-backbone policy asks for the
policy as its backbone. Held-out problems come from the split the reward model never trains on.
For each, N_max answers are sampled (temperature 1, one batched call), and for N = 1, 2, 4, ...
the first N are used: pass@N (any correct), vote@N (the majority answer), best-of-N (the reward
model's top). Writes benchmarks/results/best_of_n.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rl_arithmetic import git_commit, machine  # noqa: E402


def train_rm(policy: str | None, out: Path, args) -> tuple[str, dict]:
    from lmforge.align.reward_model import RMConfig, run_rm
    from lmforge.config import from_dict, load_yaml

    raw = load_yaml(args.rm_recipe)
    raw.update(out=str(out), seed=args.seed)
    raw.setdefault("task", {})["digits_b"] = args.digits_b
    if args.rm_backbone == "policy":
        raw["model"] = policy
    if args.rm_steps:
        raw.setdefault("train", {})["max_steps"] = args.rm_steps
    cfg = from_dict(RMConfig, raw)
    t0 = time.time()
    res = run_rm(cfg, progress=False)
    return str(out), {"heldout": res["heldout"], "steps": res["step"], "wall_s": round(time.time() - t0, 1),
                      "recipe": args.rm_recipe, "backbone": cfg.model or "default", "method": cfg.method, "lr": cfg.train.lr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="model to sample from (default: the default model)")
    ap.add_argument("--rm", default="", help="a trained reward model (default: train one)")
    ap.add_argument("--rm-recipe", default=str(ROOT / "recipes" / "rm" / "arithmetic.yaml"), help="recipe to train one")
    ap.add_argument("--rm-backbone", choices=("recipe", "policy"), default="recipe",
                    help="the recipe's backbone (the default model) or the policy")
    ap.add_argument("--rm-steps", type=int, default=0, help="override the recipe's train.max_steps")
    ap.add_argument("--n-problems", type=int, default=100)
    ap.add_argument("--digits-b", type=int, default=1, help="digits of the second operand (0 = 2)")
    ap.add_argument("--n-max", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/lmforge-best-of-n")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "best_of_n.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.align.reward_model import load_reward_model, score_conversations
    from lmforge.align.system2 import majority
    from lmforge.align.tasks import arithmetic_problems, extract_answer
    from lmforge.chat import render_prompt
    from lmforge.engine import SamplingParams, generate_text
    from lmforge.loading import load_model

    info = {"benchmark": "best_of_n", "command": " ".join(sys.argv), "commit": git_commit(), "machine": machine(),
            "policy": args.policy or "default", "reward_model_path": args.rm or "trained below",
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    rm_path = args.rm
    if not rm_path:
        rm_path, info["reward_model"] = train_rm(args.policy, Path(args.out) / "rm", args)
    elif (Path(rm_path) / "rm_eval.json").exists():  # a run folder of `lmforge rm train`: its held-out numbers
        info["reward_model"] = json.loads((Path(rm_path) / "rm_eval.json").read_text())
    rm, rm_tok = load_reward_model(rm_path)
    model, tok = load_model(args.policy)
    held = arithmetic_problems(args.n_problems, args.seed + 7, 2, "+", "heldout", digits_b=args.digits_b)
    Ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.n_max]
    tallies = {k: [0] * len(Ns) for k in ("pass", "vote", "best_of_n")}
    greedy = 0
    for i, p in enumerate(held):
        msgs = [{"role": "user", "content": p["prompt"]}]
        ids = render_prompt(tok, msgs)
        g = generate_text(model, tok, [ids], SamplingParams(max_new_tokens=args.max_new_tokens))[0]["text"]
        greedy += extract_answer(g) == p["answer"]
        outs = generate_text(model, tok, [ids] * args.n_max, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                                             temperature=args.temperature, seed=args.seed * 1000 + i))
        texts = [o["text"] for o in outs]
        answers = [extract_answer(t) for t in texts]
        ok = [a == p["answer"] for a in answers]
        scores = score_conversations(rm, rm_tok, [msgs + [{"role": "assistant", "content": t}] for t in texts], batch_size=32)
        for j, n in enumerate(Ns):
            tallies["pass"][j] += any(ok[:n])
            tallies["vote"][j] += majority(answers[:n])[0] == p["answer"]
            best = max(range(n), key=lambda k: scores[k])
            tallies["best_of_n"][j] += ok[best]
    P = len(held)
    curves = {k: {str(n): v[j] / P for j, n in enumerate(Ns)} for k, v in tallies.items()}
    info.update(task=f"2-digit + {args.digits_b or 2}-digit addition (held-out)", problems=P, n_max=args.n_max, temperature=args.temperature, greedy_accuracy=greedy / P, curves=curves,
                wall_s=round(time.time() - t0, 1))
    info["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(info, indent=1) + "\n")
    if "reward_model" in info:
        print(f"reward model held-out pairwise accuracy: {info['reward_model']['heldout']['accuracy']:.3f}")
    print(f"greedy accuracy {greedy / P:.3f} on {P} held-out problems")
    print(f"{'N':>4}{'pass@N':>9}{'vote@N':>9}{'best-of-N':>11}")
    for n in Ns:
        print(f"{n:>4}{curves['pass'][str(n)]:>9.3f}{curves['vote'][str(n)]:>9.3f}{curves['best_of_n'][str(n)]:>11.3f}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
