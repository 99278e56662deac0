"""Teaching tool use: LoRA SFT on calculator conversations, then accuracy with and without tools.

    python benchmarks/tool_use.py                      # data + train + eval (all stages)
    python benchmarks/tool_use.py --stage eval --run ~/.cache/lmforge/runs/tool_use

Stages:
  data   train / held-out arithmetic problems from disjoint seeds (3- to 5-digit operands, + - *,
         varied phrasings), written as chat JSONL by `lmforge.tools.teach` (held-out problems
         that a train seed also drew are dropped).
  train  `lmforge sft --config recipes/sft/tool_use.yaml` (LoRA r=16 on attention + MLP, time cap).
  eval   on the held-out problems:
         (a) the base default model, no tools: is the exact integer in its reply?
         (b) the finetuned model through `LM.chat_with_tools(..., "calculator")`: is the exact
             integer in its final reply, after a calculator call the model itself wrote?
         (c) malformed tool calls: calls that do not parse or that the calculator refuses
             (`Error: ...` results), over all calls the model wrote; plus calls with a valid but
             wrong expression, and problems answered without any call.
Greedy decoding. Results: benchmarks/results/tool_use.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Spinning OpenMP threads lose whole time slices on a shared machine; wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
from lmforge.provenance import git_commit
RECIPE = ROOT / "recipes" / "sft" / "tool_use.yaml"
DEFAULT_RUN = Path("~/.cache/lmforge/runs/tool_use").expanduser()
DEMO_QUESTION = "what is 48213 * 9127?"




def make_data(data_dir: Path, n_train: int, n_heldout: int, train_seed: int, heldout_seed: int) -> tuple[Path, list]:
    from lmforge.tools.teach import arithmetic_problems, calculator_record, problem_key, write_jsonl

    train = arithmetic_problems(n_train, seed=train_seed)
    seen = {problem_key(p) for p in train}
    held = [p for p in arithmetic_problems(n_heldout * 2, seed=heldout_seed) if problem_key(p) not in seen][:n_heldout]
    path = write_jsonl([calculator_record(p) for p in train], data_dir / "train.jsonl")
    write_jsonl([calculator_record(p) for p in held], data_dir / "heldout.jsonl")
    return path, held


def train(data: Path, run: Path, minutes: float, threads: int, recipe: Path = RECIPE, model: str | None = None,
          extra: list[str] = ()) -> float:
    """`lmforge sft` on `data` with `recipe`, capped at `minutes`; returns the wall time."""
    cmd = [sys.executable, "-m", "lmforge.cli.main", "sft", "--config", str(recipe), "--data", str(data), "--out", str(run),
           "--threads", str(threads), "--train.time_limit_s", str(int(minutes * 60))]
    cmd += (["--model", model] if model else []) + list(extra)
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def training_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    out = {"steps": steps[-1]["step"] if steps else 0, "first_loss": steps[0]["loss"] if steps else None,
           "last_loss": steps[-1]["loss"] if steps else None}
    if steps and "elapsed_s" in steps[-1]:
        out["train_seconds"] = steps[-1]["elapsed_s"]
        out["tokens"] = steps[-1].get("tokens")
    return out


def machine_block(threads: int, load_start: float) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": threads,
            "load_average_1min_start": round(load_start, 2), "load_average_1min_end": round(os.getloadavg()[0], 2),
            "note": "shared machine: other jobs ran at the same time, so times are pessimistic"}


def eval_no_tools(lm, held: list, max_new_tokens: int, batch: int) -> dict:
    """The model answers the bare question (its own default system prompt, no tools)."""
    from lmforge.engine import SamplingParams, generate_text
    from lmforge.tools.teach import answer_is_correct

    replies = []
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for i in range(0, len(held), batch):
        prompts = [lm.encode_chat([{"role": "user", "content": p.question}]) for p in held[i:i + batch]]
        replies += [r["text"] for r in generate_text(lm.model, lm.tokenizer, prompts, params)]
        print(f"  no tools: {len(replies)}/{len(held)}", flush=True)
    hits = [answer_is_correct(r, p.result) for r, p in zip(replies, held)]
    rows = [{"question": p.question, "expected": p.result, "reply": r} for p, r in zip(held, replies)]
    return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "n": len(hits), "examples": rows[:5],
            "misses": [r for r, h in zip(rows, hits) if not h][:5]}


def tool_conversations_batched(lm, questions: list[str], max_new_tokens: int, max_steps: int, batch: int) -> list[list[dict]]:
    """`chat_with_tools(..., "calculator")` for many questions at once (`teach.tool_loops_batched`:
    the same prompt, greedy, calls run as `run_tool_loop` runs them). Batching only changes speed;
    `main` checks it against `LM.chat_with_tools` on a sample."""
    from lmforge.tools import get_tools
    from lmforge.tools.teach import tool_loops_batched

    return tool_loops_batched(lm, questions, get_tools("calculator"), max_new_tokens, max_steps, batch,
                              log=lambda s: print("  with tools," + s[1:], flush=True))


def score_tool_conversations(held: list, convs: list[list[dict]]) -> dict:
    from lmforge.tools.teach import answer_is_correct

    hits, rows = [], []
    n_calls = n_malformed = n_wrong_expr = n_no_call = 0
    for p, new in zip(held, convs):
        final = new[-1]["content"] if new and new[-1]["role"] == "assistant" and not new[-1].get("tool_calls") else ""
        results = {m.get("tool_call_id"): m["content"] for m in new if m["role"] == "tool"}
        calls = [c for m in new if m["role"] == "assistant" for c in (m.get("tool_calls") or [])]
        n_calls += len(calls)
        if not calls:
            n_no_call += 1
        for c in calls:
            res = results.get(c["id"], "")
            if not c["function"]["name"] or res.startswith("Error:"):
                n_malformed += 1
            elif res.strip() != str(p.result):
                n_wrong_expr += 1
        hits.append(bool(final) and answer_is_correct(final, p.result))
        rows.append({"question": p.question, "expected": p.result, "messages": new})
    return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "n": len(hits),
            "tool_calls": n_calls, "malformed_calls": n_malformed,
            "malformed_rate": n_malformed / n_calls if n_calls else 0.0,
            "valid_calls_wrong_expression": n_wrong_expr, "problems_without_a_call": n_no_call,
            "examples": rows[:3], "misses": [r for r, h in zip(rows, hits) if not h][:8]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["all", "data", "train", "eval"], default="all")
    ap.add_argument("--run", default=str(DEFAULT_RUN), help="run folder of the finetune (outside the repo)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-heldout", type=int, default=100)
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--heldout-seed", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=18.0, help="training time cap")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", help="eval dtype of both models (bf16 is 2x faster on this CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-steps", type=int, default=3, help="tool rounds per problem")
    ap.add_argument("--train-log", default="", help="log of a training run started separately (to read its time)")
    ap.add_argument("--batch", type=int, default=25, help="conversations decoded together")
    ap.add_argument("--check", type=int, default=10, help="problems also run one by one through LM.chat_with_tools")
    ap.add_argument("--parts", choices=["both", "no-tools", "tools"], default="both",
                    help="eval parts to run now; the no-tools result is kept in the data folder and reused by 'tools'")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tool_use.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run).expanduser()
    data_dir = run.parent / (run.name + "_data")
    load0 = os.getloadavg()[0]
    data, held = make_data(data_dir, args.n_train, args.n_heldout, args.train_seed, args.heldout_seed)
    print(f"data: {args.n_train} train records in {data}; {len(held)} held-out problems", flush=True)
    if args.stage == "data":
        return 0
    train_wall = None
    if args.stage in ("all", "train"):
        train_wall = train(data, run, args.minutes, args.threads)
        if args.stage == "train":
            return 0

    import lmforge

    t0 = time.time()
    cached = data_dir / f"no_tools_{args.dtype}_{len(held)}.json"
    if args.parts == "tools" and cached.exists():
        a = json.loads(cached.read_text())
        print(f"(a) base model, no tools: reused {cached}", flush=True)
    else:
        base = lmforge.load(None, dtype=args.dtype)
        print("(a) base model, no tools", flush=True)
        a = eval_no_tools(base, held, args.max_new_tokens, batch=20)
        a["seconds"] = round(time.time() - t0, 1)
        cached.write_text(json.dumps(a, indent=1) + "\n")
        del base
        if args.parts == "no-tools":
            print(f"no tools: {a['correct']}/{a['n']} = {a['accuracy']:.3f}; kept in {cached}")
            return 0
    tuned = lmforge.load(str(run), dtype=args.dtype)
    demo = tuned.chat_with_tools([{"role": "user", "content": DEMO_QUESTION}], "calculator", max_steps=args.max_steps,
                                 max_new_tokens=args.max_new_tokens)
    print("demo:", json.dumps(demo, ensure_ascii=False), flush=True)
    print("(b) finetuned model, calculator, batched tool loop", flush=True)
    tb = time.time()
    convs = tool_conversations_batched(tuned, [p.question for p in held], args.max_new_tokens, args.max_steps, args.batch)
    b = score_tool_conversations(held, convs)
    b["seconds"] = round(time.time() - tb, 1)
    # the same problems one at a time through LM.chat_with_tools: the batched loop must agree
    tc = time.time()
    check = [tuned.chat_with_tools([{"role": "user", "content": p.question}], "calculator", max_steps=args.max_steps,
                                   max_new_tokens=args.max_new_tokens) for p in held[:args.check]]
    same = sum(a_ == b_ for a_, b_ in zip(check, convs))
    sb = score_tool_conversations(held[:args.check], check)
    b["chat_with_tools_check"] = {"problems": args.check, "identical_conversations": same, "accuracy": sb["accuracy"],
                                  "malformed_rate": sb["malformed_rate"], "seconds": round(time.time() - tc, 1)}
    print(f"  chat_with_tools on the first {args.check}: {same} identical conversations, accuracy {sb['accuracy']:.3f}",
          flush=True)
    eval_s = time.time() - t0

    summary = training_summary(run)
    if train_wall is not None:
        summary["wall_seconds"] = round(train_wall, 1)
    result = {
        "command": "python benchmarks/tool_use.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": machine_block(args.threads, load0),
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (default, GGUF Q4_1 dequantized)",
        "eval_dtype": args.dtype,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "train_command": (f"OMP_WAIT_POLICY=PASSIVE lmforge sft --config {RECIPE.relative_to(ROOT)} --data {data} --out {run}"
                          + ("" if args.stage == "eval" else f" --threads {args.threads} --train.time_limit_s {int(args.minutes * 60)}")),
        "run_folder": str(run),
        "data": {"train_records": args.n_train, "train_seed": args.train_seed, "heldout_problems": len(held),
                 "heldout_seed": args.heldout_seed, "operands": "3 to 5 digits", "ops": "+ - *"},
        "training": summary,
        "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens, "max_tool_rounds": args.max_steps},
        "accuracy_without_tools": a["accuracy"],
        "accuracy_with_tools_finetuned": b["accuracy"],
        "malformed_tool_call_rate": b["malformed_rate"],
        "no_tools": a,
        "with_tools": b,
        "demo": {"question": DEMO_QUESTION, "expected": 48213 * 9127, "messages": demo},
        "eval_seconds": round(eval_s, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print()
    print(f"{'':38s} {'accuracy':>9s}")
    print(f"{'base model, no tools':38s} {a['accuracy']:9.3f}  ({a['correct']}/{a['n']})")
    print(f"{'finetuned, calculator (chat_with_tools)':38s} {b['accuracy']:9.3f}  ({b['correct']}/{b['n']})")
    print(f"malformed tool calls: {b['malformed_calls']}/{b['tool_calls']} = {b['malformed_rate']:.3f}; "
          f"valid calls with a wrong expression: {b['valid_calls_wrong_expression']}; "
          f"problems without a call: {b['problems_without_a_call']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
