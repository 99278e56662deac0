"""The tool adapter lmforge ships (`lmforge/adapters/tools/`): data, training, held-out eval.

    python benchmarks/tool_adapter.py                 # data + train + eval + install the adapter
    python benchmarks/tool_adapter.py --stage eval    # eval the installed adapter again

Stages:
  data   `lmforge.tools.teach`: calculator conversations, search conversations over generated
         notes, Python programs (counting, dates, Fibonacci, sorting...) and plots run in the real
         sandbox, and questions no tool helps with, answered with the base model's own reply
         (with the same tools in its prompt).
         Each record lists the tools a user would offer: all three (mostly in the order
         `--tools calculator,python,search` gives) or a subset holding the needed one.
  train  `lmforge sft --config recipes/sft/tool_adapter.yaml` (LoRA r=8 on attention + MLP).
  eval   the default model as users run it (GGUF blocks, `--quant auto`), all three tools offered,
         held-out questions of every kind, without and with the adapter
         (`lmforge.tools.shipped.tool_adapter`, what `lmforge chat --tools` switches on).
The adapter is written in bf16 to lmforge/adapters/tools/ with this result beside it.
Greedy decoding. Results: benchmarks/results/tool_adapter.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.tool_use import machine_block, train, training_summary  # noqa: E402
from benchmarks.tool_use_search import score_arithmetic, score_search  # noqa: E402
from lmforge.provenance import git_commit  # noqa: E402

RECIPE = ROOT / "recipes" / "sft" / "tool_adapter.yaml"
DEFAULT_RUN = Path("~/.cache/lmforge/runs/tool_adapter").expanduser()
TOOLS = "calculator,python,search"
PLAIN_TRAIN = [
    "What is the capital of Italy?", "Write a haiku about the sea.", "Give me three tips for sleeping better.",
    "Who wrote Romeo and Juliet?", "What is photosynthesis?", "Translate 'thank you' into French.",
    "Tell me a fun fact about cats.", "What colour is the sky on a clear day?", "How are you today?",
    "Suggest a name for a pet goldfish.", "What is the boiling point of water in Celsius?",
    "Write one sentence about autumn.", "What does a bee make?", "Who painted the Mona Lisa?",
    "What is the largest planet in the solar system?", "Explain what a noun is.", "Hi!",
    "What language is spoken in Brazil?", "Recommend a book for a long train ride.", "What is a synonym for happy?",
    "Why do leaves change colour in the fall?", "What is the opposite of cold?", "Describe a rainbow in one sentence.",
    "What do you call a baby dog?", "Can you tell me a short joke?", "What is the main ingredient of guacamole?",
    "What is the tallest mountain on Earth?", "How many legs does a spider have?", "What is the capital of Japan?",
    "Thank you for your help!", "What is the capital of Canada?", "Who discovered penicillin?",
    "What is the freezing point of water in Fahrenheit?", "Name three fruits.", "What is the capital of Egypt?",
    "Write a two-line poem about rain.", "What does DNA stand for?", "Who was the first person on the moon?",
    "What is the capital of Australia?", "Give me a tip for staying focused.", "What gas do plants breathe in?",
    "What is the largest ocean?", "Describe a cat in one sentence.", "What is the plural of mouse?",
    "Who wrote Pride and Prejudice?", "What is the capital of Russia?", "How many continents are there?",
    "What is the main language of Mexico?", "What is the sun?", "Suggest a healthy breakfast.",
    "What is the capital of the United Kingdom?", "Who invented the telephone?", "What colour are bananas?",
    "What do bees collect from flowers?", "Good morning!", "What is an adjective?", "Where do penguins live?",
    "What is the capital of China?", "Tell me about the Eiffel Tower.", "What is a group of wolves called?",
]
PLAIN_HELDOUT = [
    "What is the capital of France?", "Write a short poem about the moon.", "Who wrote Hamlet?",
    "What is gravity?", "Give me two tips for studying.", "What is the capital of Spain?", "Hello, who are you?",
    "What animal is known as the king of the jungle?", "Translate 'good morning' into Spanish.",
    "What is the chemical symbol for gold?", "Describe the ocean in one sentence.", "What do cows drink?",
    "Name a primary colour.", "What season comes after winter?", "What is the capital of Germany?",
    "Tell me something interesting about octopuses.", "What is a verb?", "Who was Albert Einstein?",
    "What instrument has 88 keys?", "Say something kind.",
]


def tool_set(rng: random.Random, needed: str | None) -> str:
    """The tools a record offers: mostly all three in --tools order, else shuffled or a subset."""
    names = TOOLS.split(",")
    u = rng.random()
    if u < 0.5:
        return TOOLS
    if u < 0.75 or needed is None:
        rng.shuffle(names)
        return ",".join(names)
    others = [n for n in names if n != needed]
    return ",".join(sorted({needed, *rng.sample(others, rng.randint(0, 2))}, key=names.index))


def base_replies(asks: list[tuple[str, list[dict]]], max_new_tokens: int = 200) -> list[tuple[str, list[dict], str]]:
    """(question, tool schemas, the default model's own greedy reply with those tools in the
    prompt): the adapter learns to leave these questions as the base model answers them. Replies
    the budget cut short, or that call a tool, are left out."""
    import lmforge
    from lmforge.engine import SamplingParams, generate_text

    lm = lmforge.load(None, quant="auto", device="cpu")
    prompts = [lm.encode_chat([{"role": "user", "content": q}], tools=t) for q, t in asks]
    outs = generate_text(lm.model, lm.tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return [(q, t, r["text"].strip()) for (q, t), r in zip(asks, outs)
            if r["finish_reason"] == "stop" and "<tool_call>" not in r["text"]]


def make_data(data_dir: Path, args) -> dict:
    from lmforge.tools import search as S
    from lmforge.tools import teach as T

    rng = random.Random(args.train_seed)
    train_docs = T.lookup_corpus(90, seed=args.train_seed)
    held_docs = T.lookup_corpus(45, seed=args.heldout_seed, avoid=T.corpus_names(train_docs))
    paths = {"train_notes": data_dir / "notes", "train_index": data_dir / "notes_index.sqlite",
             "heldout_notes": data_dir / "heldout_notes", "heldout_index": data_dir / "heldout_index.sqlite"}
    for p in paths.values():
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    T.write_corpus(train_docs, paths["train_notes"])
    T.write_corpus(held_docs, paths["heldout_notes"])
    S.build_index(paths["train_notes"], paths["train_index"])
    S.build_index(paths["heldout_notes"], paths["heldout_index"])

    def schemas(needed):
        return T.tool_schemas_for(tool_set(rng, needed))

    calc = T.arithmetic_problems(args.n_calc, seed=args.train_seed)
    records = [T.calculator_record(p, tools=schemas("calculator")) for p in calc]
    records += [T.lookup_record(q, paths["train_index"], tools=schemas("search"))
                for q in T.lookup_questions(train_docs, args.n_search, seed=args.train_seed)]
    records += [T.python_record(t, tools=schemas("python")) for t in T.python_tasks(args.n_python, seed=args.train_seed)]
    records += [T.python_record(t, tools=schemas("python"))
                for t in T.python_tasks(args.n_plot, seed=args.train_seed, kinds=T.PLOT_KINDS)]
    plain = base_replies([(q, schemas(None)) for q in PLAIN_TRAIN])
    records += [T.plain_record(q, r, t) for q, t, r in plain]
    rng.shuffle(records)
    seen = {T.problem_key(p) for p in calc}
    held_a = [p for p in T.arithmetic_problems(args.n_heldout * 2, seed=args.heldout_seed) if T.problem_key(p) not in seen][:args.n_heldout]
    return {"train": T.write_jsonl(records, data_dir / "train.jsonl"), "n_records": len(records),
            "held_a": held_a, "held_q": T.lookup_questions(held_docs, args.n_heldout, seed=args.heldout_seed),
            "held_py": T.python_tasks(args.n_heldout, seed=args.heldout_seed),
            "held_plot": T.python_tasks(args.n_heldout_plot, seed=args.heldout_seed, kinds=T.PLOT_KINDS),
            "n_plain": len(plain), **paths}


def _program_output(code: str) -> str:
    """What a held-out program prints, run here (the reference a reply must state)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # noqa: S102 -- our own generated programs
    return buf.getvalue().strip()


def score_python(tasks: list, convs: list[list[dict]]) -> dict:
    from benchmarks.tool_use_search import _calls, _final, _malformed

    hits = called = n_calls = n_malformed = 0
    rows = []
    for t, new in zip(tasks, convs):
        calls, results = _calls(new)
        n_calls += len(calls)
        n_malformed += _malformed(calls, results)
        py = [c for c in calls if c["function"]["name"] == "python"]
        called += bool(py)
        if t.plot:  # the program ran and drew: a figure came back
            ok = any("figure" in (results.get(c["id"]) or "").lower() for c in py)
        else:
            want = _program_output(t.code)
            ok = want.replace(" ", "") in _final(new).replace(" ", "")
        hits += ok
        rows.append({"question": t.question, "correct": ok, "messages": new})
    n = len(tasks)
    return {"n": n, "accuracy": hits / n, "correct": hits, "called_python_rate": called / n, "tool_calls": n_calls,
            "malformed_calls": n_malformed, "examples": rows[:2], "misses": [r for r in rows if not r["correct"]][:5]}


def score_plain(questions: list[str], convs: list[list[dict]]) -> dict:
    from benchmarks.tool_use_search import _calls, _final

    no_call = sum(not _calls(new)[0] for new in convs)
    paris = next((_final(new) for q, new in zip(questions, convs) if "France" in q), "")
    return {"n": len(questions), "answered_without_a_tool_rate": no_call / len(questions),
            "capital_of_france_reply": paris, "says_paris": "Paris" in paris,
            "examples": [{"question": q, "messages": new} for q, new in list(zip(questions, convs))[:4]]}


def evaluate(lm, data: dict, args, label: str) -> dict:
    from lmforge.tools import get_tools
    from lmforge.tools.teach import tool_loops_batched

    tools = get_tools(TOOLS, index=str(data["heldout_index"]))

    def run(questions):
        return tool_loops_batched(lm, questions, tools, args.max_new_tokens, args.max_steps, args.batch,
                                  log=lambda s: print(f"  {label}{s}", flush=True))

    t0 = time.time()
    out = {"arithmetic": score_arithmetic(data["held_a"], run([p.question for p in data["held_a"]])),
           "search": score_search(data["held_q"], run([q.question for q in data["held_q"]])),
           "python": score_python(data["held_py"], run([t.question for t in data["held_py"]])),
           "plots": score_python(data["held_plot"], run([t.question for t in data["held_plot"]])),
           "no_tool_questions": score_plain(PLAIN_HELDOUT, run(PLAIN_HELDOUT))}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def install(run: Path) -> Path:
    """The run's adapter, in bf16, into lmforge/adapters/tools/."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmforge.loading.load import adapter_folder

    src = adapter_folder(run)
    dest = ROOT / "lmforge" / "adapters" / "tools"
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "adapter_config.json", dest / "adapter_config.json")
    return dest


def summary_line(name: str, r: dict) -> str:
    return (f"{name:10s} arithmetic {r['arithmetic']['accuracy']:.2f}  search (fact+file) {r['search']['correct_rate']:.2f}  "
            f"python {r['python']['accuracy']:.2f}  plots {r['plots']['accuracy']:.2f}  "
            f"no-tool questions answered directly {r['no_tool_questions']['answered_without_a_tool_rate']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["all", "data", "train", "eval"], default="all")
    ap.add_argument("--run", default=str(DEFAULT_RUN))
    ap.add_argument("--n-calc", type=int, default=50)
    ap.add_argument("--n-search", type=int, default=50)
    ap.add_argument("--n-python", type=int, default=40)
    ap.add_argument("--n-plot", type=int, default=24)
    ap.add_argument("--n-heldout", type=int, default=24, help="held-out questions per kind")
    ap.add_argument("--n-heldout-plot", type=int, default=10)
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--heldout-seed", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--max-steps", type=int, default=2, help="tool rounds per question")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--skip-base", action="store_true", help="reuse the base model's result from the last run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tool_adapter.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run).expanduser()
    data_dir = run.parent / (run.name + "_data")
    load0 = os.getloadavg()[0]
    t0 = time.time()
    data = make_data(data_dir, args)
    print(f"data: {data['n_records']} records in {data['train']} ({time.time() - t0:.0f} s)", flush=True)
    if args.stage == "data":
        return 0
    train_wall = None
    if args.stage in ("all", "train"):
        train_wall = train(data["train"], run, args.minutes, args.threads, RECIPE)
        dest = install(run)
        print(f"adapter installed in {dest}", flush=True)
        if args.stage == "train":
            return 0

    import lmforge
    from lmforge.tools.shipped import tool_adapter

    lm = lmforge.load(None, quant="auto", device="cpu")
    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    base = old.get("base") if args.skip_base and old.get("base") else evaluate(lm, data, args, "base ")
    with tool_adapter(lm.model) as on:
        if not on:
            raise SystemExit("the shipped adapter did not attach (is lmforge/adapters/tools/ there?)")
        tuned = evaluate(lm, data, args, "adapter ")
    adapter_file = ROOT / "lmforge" / "adapters" / "tools" / "adapter_model.safetensors"
    result = {
        "command": "python benchmarks/tool_adapter.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": machine_block(args.threads, load0),
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (the default GGUF Q4_1, run as its own blocks)",
        "train_command": f"lmforge sft --config {RECIPE.relative_to(ROOT)} --data {data['train']} --out {run}",
        "adapter": {"path": "lmforge/adapters/tools/", "bytes": adapter_file.stat().st_size if adapter_file.exists() else None},
        "data": {"records": data["n_records"], "calculator": args.n_calc, "search": args.n_search, "python": args.n_python,
                 "plots": args.n_plot, "no_tool": data["n_plain"], "train_seed": args.train_seed,
                 "heldout_seed": args.heldout_seed, "tools_offered_at_eval": TOOLS},
        "training": training_summary(run) | ({"wall_seconds": round(train_wall, 1)} if train_wall else {}),
        "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens, "max_tool_rounds": args.max_steps},
        "base": base,
        "adapter_on": tuned,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    shutil.copy(out_path, ROOT / "lmforge" / "adapters" / "tools" / "result.json")
    print()
    print(summary_line("base", base))
    print(summary_line("adapter", tuned))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
