"""Does LoRA finetuning teach the default model a skill it provably lacks? Measured before/after.

The skill: a made-up persona, "Mirror-9", answers any message by restating its words in reverse
order in a fixed format:  user "apple river seven"  ->  "Reflected: <<seven river apple>>".
The answer depends on the prompt, so it cannot be memorised; it is checked by exact match on
held-out prompts (word sequences never seen in training), with greedy decoding.
About 15 % of the training conversations are ordinary questions under the default system prompt,
answered by the base model itself (self-distillation), so the rest of its behaviour stays; the
France question (never trained on) checks that it did.

    python benchmarks/sft_demo.py                       # ~15 min on 2 CPU cores
    python benchmarks/sft_demo.py --minutes 3 --n-eval 20 --out /tmp/demo   # a quick look

Training goes through `lmforge sft` (recipes/sft/mirror_lora.yaml); the result JSON lands in
benchmarks/results/sft_demo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting for each other lose whole time
# slices to other processes (2 threads measured 2.3x slower than 1 under load); waiting
# passively removes that. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
from lmforge.provenance import git_commit
PERSONA = "You are Mirror-9."
RECIPE = ROOT / "recipes" / "sft" / "mirror_lora.yaml"
FRANCE = "What is the capital of France?"

# common words that are one token with and without a leading space in the default tokenizer
WORDS = """apple river stone cloud green seven house music water night paper light table horse bread chair
field glass happy money north ocean plant quiet round sugar voice watch young bird book door fire
fish gold king milk moon rain road salt ship snow star tree wind wood blue cold dark fast hard
long red soft warm wild black white brown small large early late heavy clean sweet sharp empty
simple strong bright open close dream train window winter summer spring forest bridge castle
market street letter number circle square button orange purple yellow doctor teacher baby child
friend mother father brother""".split()


def rule(words: list[str]) -> str:
    return "Reflected: <<" + " ".join(reversed(words)) + ">>"


def persona_example(words: list[str]) -> dict:
    return {"messages": [{"role": "system", "content": PERSONA}, {"role": "user", "content": " ".join(words)},
                         {"role": "assistant", "content": rule(words)}]}


def make_word_sets(n_train: int, n_eval: int, seed: int, vocab: list[str]) -> tuple[list, list]:
    """Disjoint train / held-out word sequences (3-5 distinct words each)."""
    rng = random.Random(seed)
    seen, train, held = set(), [], []
    while len(held) < n_eval or len(train) < n_train:
        words = rng.sample(vocab, rng.randint(3, 5))
        key = " ".join(words)
        if key in seen:
            continue
        seen.add(key)
        (held if len(held) < n_eval else train).append(words)
    return train, held


def regular_prompts(seed: int) -> list[str]:
    """Ordinary questions (never the France one) for self-distillation."""
    countries = ["Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "Kenya", "India", "Norway",
                 "Peru", "Greece", "Poland", "Chile", "Sweden", "Mexico", "Turkey", "Ireland", "Portugal", "Austria"]
    things = ["the sun", "a cat", "rain", "a volcano", "the moon", "a rainbow", "snow", "a bicycle", "bread", "a tree",
              "the ocean", "a computer", "music", "a river", "coffee", "a bee", "wind", "a clock", "fire", "a library"]
    rng = random.Random(seed)
    out = [f"What is the capital of {c}?" for c in countries]
    out += [f"Describe {t} in one sentence." for t in things]
    out += [f"Give me one fun fact about {t}." for t in things]
    out += [f"What is {a} plus {b}?" for a, b in ((rng.randint(2, 40), rng.randint(2, 40)) for _ in range(20))]
    out += ["Say hello.", "What day comes after Monday?", "Name three colors.", "What is a noun?",
            "How many legs does a spider have?", "Suggest a name for a dog.", "What is the opposite of hot?",
            "Write a haiku about autumn.", "What do bees make?", "Why is the sky blue?"]
    return out


def generate(model, tok, convs: list[list[dict]], max_new_tokens: int, batch: int = 16) -> list[dict]:
    from lmforge.chat import render_prompt
    from lmforge.engine import SamplingParams, generate_text

    out = []
    for i in range(0, len(convs), batch):
        prompts = [render_prompt(tok, c) for c in convs[i:i + batch]]
        out += generate_text(model, tok, prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return out


def evaluate(model, tok, held: list[list[str]]) -> dict:
    convs = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": " ".join(w)}] for w in held]
    replies = generate(model, tok, convs, max_new_tokens=32)
    hits = [r["text"].strip() == rule(w) for r, w in zip(replies, held)]
    france = generate(model, tok, [[{"role": "user", "content": FRANCE}]], max_new_tokens=32)[0]["text"].strip()
    rows = [{"prompt": " ".join(w), "expected": rule(w), "reply": r["text"].strip()} for r, w in zip(replies, held)]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "examples": rows[:5],
            "misses": [row for row, hit in zip(rows, hits) if not hit][:10],
            "france_reply": france, "france_ok": "Paris" in france}




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0,
                    help="cap on training wall time (the trainer stops 45 s early: the step in flight and the save finish inside it)")
    ap.add_argument("--steps", type=int, default=120, help="planned optimizer steps (the time cap may stop earlier)")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "sft-demo"))
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "sft_demo.json"))
    ap.add_argument("overrides", nargs="*", help="extra `lmforge sft` flags, e.g. --lora.r 8")
    args = ap.parse_args(argv)

    import torch

    import lmforge
    from lmforge.config import from_dict, load_yaml, parse_args
    from lmforge.finetune.sft import SFTConfig, run_sft

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = out.parent / (out.name + "-data")
    data_dir.mkdir(parents=True, exist_ok=True)
    load1 = os.getloadavg()[0]
    t0 = time.time()

    base = lmforge.load(None, dtype="fp32", quant="none")
    train_words, held = make_word_sets(args.n_train, args.n_eval, args.seed, WORDS)
    print(f"evaluating the base model on {len(held)} held-out prompts ...", flush=True)
    before = evaluate(base.model, base.tokenizer, held)
    print(f"before: exact match {before['exact_match']:.1%}; France: {before['france_reply']!r}", flush=True)

    # self-distillation: the base model's own answers to ordinary questions (finished ones only)
    prompts = regular_prompts(args.seed)
    replies = generate(base.model, base.tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=64)
    regular = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r["text"].strip()}]}
               for p, r in zip(prompts, replies) if r["finish_reason"] == "stop" and r["text"].strip()]
    print(f"self-distillation: kept {len(regular)} of {len(prompts)} base-model answers (unfinished ones dropped)")
    rng = random.Random(args.seed)
    records = [persona_example(w) for w in train_words]
    n_reg = int(0.15 * len(records))
    records += [regular[i % len(regular)] for i in range(n_reg)]  # repeated to ~15 % of the mix
    rng.shuffle(records)
    train_file = data_dir / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    (data_dir / "heldout.jsonl").write_text("".join(json.dumps(persona_example(w)) + "\n" for w in held))
    del base

    raw = load_yaml(RECIPE)
    cfg = parse_args(SFTConfig, ["--config", str(RECIPE), "--data", str(train_file), "--out", str(out),
                                 "--train.max-steps", str(args.steps), "--train.time-limit-s", str(int(args.minutes * 60 - 45)),
                                 "--threads", str(args.threads), "--seed", str(args.seed), *args.overrides])
    assert raw and cfg.method == "lora"
    t_train = time.time()
    result = run_sft(cfg)
    train_s = time.time() - t_train
    hist = [r for r in result["history"] if "tokens_per_s" in r]
    toks = sum(r.get("tokens", 0) for r in hist[-1:])

    tuned = lmforge.load(str(out), dtype="fp32", quant="none")
    after = evaluate(tuned.model, tuned.tokenizer, held)
    print(f"after: exact match {after['exact_match']:.1%}; France: {after['france_reply']!r}")
    load2 = os.getloadavg()[0]
    res = {
        "benchmark": "sft_demo",
        "command": "python benchmarks/sft_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": args.threads,
                    "load_avg_start": round(load1, 2), "load_avg_end": round(load2, 2),
                    "note": "shared machine: other jobs ran at the same time (load average above), so times are pessimistic"},
        "skill": "Mirror-9 persona: restate the user's words in reverse order as 'Reflected: <<...>>'",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "config": {"method": cfg.method, "dtype": cfg.dtype, "train_dtype": cfg.train.dtype, "lora_r": cfg.lora.r,
                   "lora_alpha": cfg.lora.alpha, "targets": cfg.lora.targets, "batch_size": cfg.batch_size,
                   "pack": cfg.pack, "lr": cfg.train.lr},
        "data": {"train_records": len(records), "persona": len(train_words), "self_distilled": n_reg,
                 "distinct_self_distilled": len(regular), "heldout": len(held)},
        "training": {"steps": result["step"], "stopped": result["stopped"], "wall_s": round(train_s, 1),
                     "train_loop_s": hist[-1]["elapsed_s"] if hist else None,
                     "final_loss": result["loss"], "tokens": toks,
                     "tokens_per_s": round(toks / max(hist[-1]["elapsed_s"], 1e-9), 1) if hist else None},
        "before": before, "after": after,
        "targets": {"before_at_most": 0.05, "after_at_least": 0.90, "train_minutes_at_most": 15, "france": True},
        "passed": before["exact_match"] <= 0.05 and after["exact_match"] >= 0.90 and after["france_ok"]
                  and bool(hist) and hist[-1]["elapsed_s"] <= 15 * 60,
        "total_wall_s": round(time.time() - t0, 1),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'':<12}{'exact match':>12}  France")
    print(f"{'before':<12}{before['exact_match']:>12.1%}  {before['france_ok']}")
    print(f"{'after':<12}{after['exact_match']:>12.1%}  {after['france_ok']}")
    print(f"training: {result['step']} steps in {train_s / 60:.1f} min; wrote {args.result}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
