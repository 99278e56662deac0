"""Two tools in one adapter: calculator for arithmetic, `search` for facts in the user's own files.

    python benchmarks/tool_use_search.py                     # data + train + eval (all stages)
    python benchmarks/tool_use_search.py --stage eval --parts base    # the base model only
    python benchmarks/tool_use_search.py --stage eval --parts tuned   # reuse the base result

Stages:
  data   `lmforge.tools.teach`: a training folder of small notes about made-up places, people
         and projects (names from random syllables, random numbers) and a held-out folder whose
         entities never occur in the training one; each folder indexed as `lmforge index build`
         does. Training records: look-up conversations (question -> search call -> the real
         search result -> answer with the fact and "(source: FILE)") mixed with calculator
         conversations; every record lists both tools. Held-out: questions about held-out files,
         and arithmetic problems from another seed.
  train  `lmforge sft --config recipes/sft/tool_use_search.yaml` (LoRA r=16 on attention + MLP,
         12-minute cap).
  eval   with both tools offered (`chat_with_tools(tools="calculator,search")`, the held-out index):
         (a) look-up questions, base model and finetuned: the share that called search, whose
             query named the entity, whose final reply states the fact, and that states it AND
             cites the file holding it (and no other file) -- `teach.lookup_check`;
         (b) held-out arithmetic, finetuned: the exact integer in the final reply;
         (c) malformed tool calls (unparsable, or refused by the tool: `Error: ...` results)
             over all calls the model wrote.
Greedy decoding, bf16. Results: benchmarks/results/tool_use_search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

# Spinning OpenMP threads lose whole time slices on a shared machine; wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lmforge.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.tool_use import machine_block, train, training_summary  # noqa: E402

RECIPE = ROOT / "recipes" / "sft" / "tool_use_search.yaml"
DEFAULT_RUN = Path("~/.cache/lmforge/runs/tool_use_search").expanduser()
TOOLS = "calculator,search"




def make_data(data_dir: Path, args) -> dict:
    """Corpora, indexes, train.jsonl and the held-out sets; returns what eval needs."""
    from lmforge.tools import search as S
    from lmforge.tools import teach as T

    train_docs = T.lookup_corpus(args.train_docs, seed=args.train_seed)
    held_docs = T.lookup_corpus(args.heldout_docs, seed=args.heldout_seed, avoid=T.corpus_names(train_docs))
    paths = {"train_notes": data_dir / "notes", "train_index": data_dir / "notes_index.sqlite",
             "heldout_notes": data_dir / "heldout_notes", "heldout_index": data_dir / "heldout_index.sqlite"}
    for p in paths.values():  # regenerate from scratch: the folders are a pure function of the seeds
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    T.write_corpus(train_docs, paths["train_notes"])
    T.write_corpus(held_docs, paths["heldout_notes"])
    S.build_index(paths["train_notes"], paths["train_index"])
    S.build_index(paths["heldout_notes"], paths["heldout_index"])

    schemas = T.tool_schemas_for(TOOLS)
    lookups = T.lookup_questions(train_docs, args.n_search, seed=args.train_seed)
    records = [T.lookup_record(q, paths["train_index"], tools=schemas) for q in lookups]
    calc = T.arithmetic_problems(args.n_calc, seed=args.train_seed)
    records += [T.calculator_record(p, tools=schemas) for p in calc]
    random.Random(args.train_seed).shuffle(records)
    train = T.write_jsonl(records, data_dir / "train.jsonl")

    held_q = T.lookup_questions(held_docs, args.n_heldout_search, seed=args.heldout_seed)
    seen = {T.problem_key(p) for p in calc}
    held_a = [p for p in T.arithmetic_problems(args.n_heldout_arith * 2, seed=args.heldout_seed)
              if T.problem_key(p) not in seen][:args.n_heldout_arith]
    T.write_jsonl([{"question": q.question, "value": q.value, "file": q.doc.relpath, "reference": q.answer} for q in held_q],
                  data_dir / "heldout_search.jsonl")
    train_text = " ".join(d.text for d in train_docs).lower()
    # 0 by construction (no shared made-up word); checked here, not assumed
    leaked = sum(re.search(rf"\b{re.escape(d.subject.lower())}\b", train_text) is not None for d in held_docs)
    return {"train": train, "held_q": held_q, "held_a": held_a, "n_train_docs": len(train_docs), "leaked": leaked,
            "n_heldout_docs": len(held_docs), **paths}


def _final(new: list[dict]) -> str:
    last = new[-1] if new else {}
    return (last.get("content") or "") if last.get("role") == "assistant" and not last.get("tool_calls") else ""


def _calls(new: list[dict]) -> tuple[list[dict], dict]:
    results = {m.get("tool_call_id"): m.get("content") or "" for m in new if m["role"] == "tool"}
    return [c for m in new if m["role"] == "assistant" for c in (m.get("tool_calls") or [])], results


def _malformed(calls: list[dict], results: dict) -> int:
    return sum(1 for c in calls if not c["function"]["name"] or results.get(c["id"], "").startswith("Error:"))


def score_search(questions: list, convs: list[list[dict]]) -> dict:
    """Look-up conversations against their facts and files (`teach.lookup_check`)."""
    from lmforge.tools.teach import lookup_check

    n = len(questions)
    counts = dict.fromkeys(["searched", "query_names_entity", "used_calculator", "fact", "cited", "correct"], 0)
    n_calls = n_malformed = 0
    rows = []
    for q, new in zip(questions, convs):
        calls, results = _calls(new)
        n_calls += len(calls)
        n_malformed += _malformed(calls, results)
        searches = [c for c in calls if c["function"]["name"] == "search"]
        counts["searched"] += bool(searches)
        counts["used_calculator"] += any(c["function"]["name"] == "calculator" for c in calls)
        if searches:
            try:
                query = json.loads(searches[0]["function"]["arguments"]).get("query", "")
            except (json.JSONDecodeError, AttributeError):
                query = ""
            counts["query_names_entity"] += q.doc.subject.lower() in str(query).lower()
        check = lookup_check(_final(new), q.value, q.doc.relpath)
        for key in ("fact", "cited", "correct"):
            counts[key] += check[key]
        rows.append({"question": q.question, "value": q.value, "file": q.doc.relpath, **check, "messages": new})
    out = {"n": n, **{f"{k}_rate": round(v / n, 4) for k, v in counts.items()}, **counts,
           "tool_calls": n_calls, "malformed_calls": n_malformed, "malformed_rate": n_malformed / n_calls if n_calls else 0.0}
    out["examples"] = rows[:3]
    out["misses"] = [r for r in rows if not r["correct"]][:6]
    return out


def score_arithmetic(problems: list, convs: list[list[dict]]) -> dict:
    from lmforge.tools.teach import answer_is_correct

    hits, n_calls, n_malformed, n_search, n_nocall = 0, 0, 0, 0, 0
    rows = []
    for p, new in zip(problems, convs):
        calls, results = _calls(new)
        n_calls += len(calls)
        n_malformed += _malformed(calls, results)
        n_search += any(c["function"]["name"] == "search" for c in calls)
        n_nocall += not calls
        ok = answer_is_correct(_final(new), p.result)
        hits += ok
        rows.append({"question": p.question, "expected": p.result, "correct": ok, "messages": new})
    return {"n": len(problems), "accuracy": hits / len(problems), "correct": hits, "tool_calls": n_calls,
            "malformed_calls": n_malformed, "malformed_rate": n_malformed / n_calls if n_calls else 0.0,
            "problems_using_search": n_search, "problems_without_a_call": n_nocall,
            "examples": rows[:2], "misses": [r for r in rows if not r["correct"]][:5]}


def run_search_eval(lm, data: dict, args) -> dict:
    from lmforge.tools import get_tools
    from lmforge.tools.teach import tool_loops_batched

    tools = get_tools(TOOLS, index=str(data["heldout_index"]))
    t0 = time.time()
    convs = tool_loops_batched(lm, [q.question for q in data["held_q"]], tools, args.max_new_tokens, args.max_steps,
                               args.batch, log=lambda s: print(s, flush=True))
    out = score_search(data["held_q"], convs)
    out["seconds"] = round(time.time() - t0, 1)
    return out, convs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["all", "data", "train", "eval"], default="all")
    ap.add_argument("--parts", choices=["both", "base", "tuned"], default="both",
                    help="eval parts to run now; the base result is kept in the data folder and reused by 'tuned'")
    ap.add_argument("--run", default=str(DEFAULT_RUN), help="run folder of the finetune (outside the repo)")
    ap.add_argument("--model", default=None, help="base model (default: the default model); a tiny one for a dry run")
    ap.add_argument("--sft-args", default="", help="extra `lmforge sft` flags (a dry run: '--train.max-steps 2')")
    ap.add_argument("--train-docs", type=int, default=90)
    ap.add_argument("--heldout-docs", type=int, default=45)
    ap.add_argument("--n-search", type=int, default=100, help="look-up conversations in the training set")
    ap.add_argument("--n-calc", type=int, default=60, help="calculator conversations in the training set")
    ap.add_argument("--n-heldout-search", type=int, default=45)
    ap.add_argument("--n-heldout-arith", type=int, default=50)
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--heldout-seed", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=12.0, help="training time cap")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", help="eval dtype of both models (bf16 is 2x faster on this CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=3, help="tool rounds per question")
    ap.add_argument("--batch", type=int, default=25, help="conversations decoded together")
    ap.add_argument("--check", type=int, default=3, help="look-up questions also run one by one through LM.chat_with_tools")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tool_use_search.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run).expanduser()
    data_dir = run.parent / (run.name + "_data")
    load0 = os.getloadavg()[0]
    data = make_data(data_dir, args)
    print(f"data: {args.n_search} look-up + {args.n_calc} calculator records in {data['train']}; "
          f"{len(data['held_q'])} held-out questions over {data['n_heldout_docs']} held-out files; "
          f"{len(data['held_a'])} held-out arithmetic problems", flush=True)
    if args.stage == "data":
        return 0
    train_wall = None
    if args.stage in ("all", "train"):
        train_wall = train(data["train"], run, args.minutes, args.threads, RECIPE, args.model, args.sft_args.split())
        if args.stage == "train":
            return 0

    import lmforge

    cached = data_dir / f"base_search_{args.dtype}_{len(data['held_q'])}.json"
    if args.parts == "tuned" and cached.exists():
        base = json.loads(cached.read_text())
        print(f"(a) base model: reused {cached}", flush=True)
    else:
        print("(a) base model, both tools offered, look-up questions", flush=True)
        lm = lmforge.load(args.model, dtype=args.dtype)
        base, _ = run_search_eval(lm, data, args)
        cached.write_text(json.dumps(base, indent=1, ensure_ascii=False) + "\n")
        del lm
        print(f"  base: searched {base['searched_rate']:.3f}, correct+cited {base['correct_rate']:.3f}", flush=True)
        if args.parts == "base":
            return 0

    tuned = lmforge.load(str(run), dtype=args.dtype)
    print("(a) finetuned model, look-up questions", flush=True)
    after, after_convs = run_search_eval(tuned, data, args)
    print(f"  finetuned: searched {after['searched_rate']:.3f}, correct+cited {after['correct_rate']:.3f}", flush=True)
    # a few questions one at a time through LM.chat_with_tools: the batched loop must agree
    from lmforge.tools import get_tools
    from lmforge.tools.teach import tool_loops_batched

    tools = get_tools(TOOLS, index=str(data["heldout_index"]))
    tc = time.time()
    check = [tuned.chat_with_tools([{"role": "user", "content": q.question}], tools, max_steps=args.max_steps,
                                   max_new_tokens=args.max_new_tokens) for q in data["held_q"][:args.check]]
    same = sum(a == b for a, b in zip(check, after_convs))
    after["chat_with_tools_check"] = {"questions": len(check), "identical_to_batched_loop": same,
                                      "seconds": round(time.time() - tc, 1)}
    print(f"  chat_with_tools on {len(check)}: {same} identical to the batched loop", flush=True)

    print("(b) finetuned model, held-out arithmetic, both tools offered", flush=True)
    ta = time.time()
    convs = tool_loops_batched(tuned, [p.question for p in data["held_a"]], tools, args.max_new_tokens, args.max_steps,
                               args.batch, log=lambda s: print(s, flush=True))
    arith = score_arithmetic(data["held_a"], convs)
    arith["seconds"] = round(time.time() - ta, 1)

    calls = after["tool_calls"] + arith["tool_calls"]
    malformed = after["malformed_calls"] + arith["malformed_calls"]
    summary = training_summary(run)
    if train_wall is not None:
        summary["wall_seconds"] = round(train_wall, 1)
    result = {
        "command": "python benchmarks/tool_use_search.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": machine_block(args.threads, load0),
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (default, GGUF Q4_1 dequantized)",
        "eval_dtype": args.dtype,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "train_command": f"lmforge sft --config {RECIPE.relative_to(ROOT)} --data {data['train']} --out {run}",
        "run_folder": str(run),
        "data": {"train_records": args.n_search + args.n_calc, "lookup_records": args.n_search, "calculator_records": args.n_calc,
                 "train_files": data["n_train_docs"], "heldout_files": data["n_heldout_docs"],
                 "heldout_questions": len(data["held_q"]), "heldout_arithmetic": len(data["held_a"]),
                 "train_seed": args.train_seed, "heldout_seed": args.heldout_seed,
                 "heldout_entities_in_training_files": data["leaked"],
                 "index_build": f"lmforge index build --data {data['heldout_notes']} --out {data['heldout_index']}",
                 "tools_offered": TOOLS},
        "training": summary,
        "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens, "max_tool_rounds": args.max_steps},
        "search_correct_and_cited_base": base["correct_rate"],
        "search_correct_and_cited_finetuned": after["correct_rate"],
        "search_called_base": base["searched_rate"],
        "search_called_finetuned": after["searched_rate"],
        "arithmetic_accuracy_finetuned": arith["accuracy"],
        "malformed_tool_call_rate_finetuned": malformed / calls if calls else 0.0,
        "malformed_tool_call_rate_base": base["malformed_rate"],
        "search_base": base,
        "search_finetuned": after,
        "arithmetic_finetuned": arith,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print()
    print(f"{'held-out look-up questions':30s} {'searched':>9s} {'fact':>7s} {'fact+cite':>10s} {'malformed':>10s}")
    for name, r in (("base model", base), ("finetuned", after)):
        print(f"{name:30s} {r['searched_rate']:9.3f} {r['fact_rate']:7.3f} {r['correct_rate']:10.3f} {r['malformed_rate']:10.3f}")
    print(f"held-out arithmetic (finetuned): {arith['correct']}/{arith['n']} = {arith['accuracy']:.3f}; "
          f"malformed calls {arith['malformed_calls']}/{arith['tool_calls']}; used search: {arith['problems_using_search']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
