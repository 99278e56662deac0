"""Prefill and decode speed on the default model: lmforge's modes against `transformers` (and
llama.cpp when a build of llama-cpp-python is at hand), same machine, same run, same threads.

    python benchmarks/decode.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128]
                                [--repeat 3] [--cases all|quick|NAME,NAME] [--llama-python PATH]

Cases (each in its own process, so peak memory is its own):
- lmforge  {fp32, bf16, fp16, int8, int4, gguf} x {plain, fast, spec-ngram, spec-self}
  (fp32..int4 load an fp32 copy of the model; gguf runs the original Q4_1 file's blocks with
  the native kernels, `--quant gguf`)
  plain = the general batched engine (`LMFORGE_FAST=0`), fast = the static-cache decoder,
  layers = the same without the one-call native step (`LMFORGE_NATIVE_STEP=0`: the kernels
  called layer by layer from PyTorch; gguf weights only),
  spec-* = fast + speculative decoding with prompt-lookup or a layer-skipping self-draft.
- lmforge/auto/default: what `lmforge chat/generate` run with no flags (the default GGUF,
  `--quant auto --draft auto`, through the engine), marked "*" in the table.
- transformers fp32 and bf16 (`generate`, greedy, KV cache).
- llama.cpp on the original Q4_1 GGUF and on lmforge's q8_0 export, when available.
- NAME@chat: the same on a short prompt that nothing in the reply copies from ("Write a short
  story about a robot." in the chat template), where prompt lookup rarely has a match.

Prefill tokens/s: prompt tokens / time to the first new token. Decode tokens/s: the other new
tokens / the time after the first. Greedy, no stop tokens: exactly --new-tokens each time.
The prompt asks for a summary of held-out prose (tests/data/heldout_prose.txt), so prompt
lookup has something to copy. The bound column is the memory-bandwidth limit: measured read
bandwidth / bytes of weights one decode step must read. Medians over --repeat runs.
Writes benchmarks/results/decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from lmforge.provenance import git_commit
RESULT = ROOT / "benchmarks" / "results" / "decode.json"
TEXT = ROOT / "tests" / "data" / "heldout_prose.txt"
DTYPES = ("fp32", "bf16", "fp16", "int8", "int4", "gguf")  # gguf: the Q4_1 file's own blocks
MODES = ("plain", "fast", "spec-ngram", "spec-self", "layers")  # layers: gguf only, see below
CHAT_PROMPT = "Write a short story about a robot."
DEFAULT = {"engine": "lmforge", "weights": "auto", "mode": "default"}  # the CLI's defaults


def all_cases(quick: bool) -> list[dict]:
    cases = []
    for d in DTYPES:
        for m in MODES:
            if m == "layers" and d != "gguf":  # the one-call step exists for GGUF blocks only
                continue
            if quick and (m == "spec-self" or (m == "plain" and d not in ("fp32", "int8"))):
                continue
            cases.append({"engine": "lmforge", "weights": d, "mode": m})
    cases.append(dict(DEFAULT))
    cases.append({"engine": "transformers", "weights": "fp32", "mode": "generate"})
    # the non-repetitive chat prompt: the default against its parts and the reference
    for c in ({"engine": "lmforge", "weights": "int8", "mode": "fast"}, {"engine": "lmforge", "weights": "int8", "mode": "spec-ngram"},
              {"engine": "lmforge", "weights": "gguf", "mode": "fast"}, {"engine": "lmforge", "weights": "gguf", "mode": "layers"},
              {"engine": "lmforge", "weights": "gguf", "mode": "spec-ngram"},
              DEFAULT, {"engine": "transformers", "weights": "fp32", "mode": "generate"},
              {"engine": "llama.cpp", "weights": "q4_1 (original gguf)", "mode": "generate"}):
        cases.append({**c, "prompt": "chat"})
    if not quick:
        cases.append({"engine": "transformers", "weights": "bf16", "mode": "generate"})
    cases.append({"engine": "llama.cpp", "weights": "q4_1 (original gguf)", "mode": "generate"})
    cases.append({"engine": "llama.cpp", "weights": "q8_0 (lmforge export)", "mode": "generate"})
    return cases


def case_name(c: dict) -> str:
    return f"{c['engine']}/{c['weights'].split(' ')[0]}/{c['mode']}" + ("@chat" if c.get("prompt") == "chat" else "")


def is_default(c: dict) -> bool:
    return all(c.get(k) == v for k, v in DEFAULT.items())


# -- measurements shared by workers -------------------------------------------------------
def read_bandwidth(threads: int) -> float:
    """Bytes/s reading a 512 MiB fp32 tensor (best of 5): the roof for weight streaming."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes_per_token(cfg, weights: str) -> int:
    """Bytes of weights read by one decode step: every linear layer and the output head."""
    per = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 1}[weights]
    lin = cfg.n_layers * (cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
                          + cfg.n_heads * cfg.head_dim * cfg.d_model + 3 * cfg.d_model * cfg.d_ff)
    head = cfg.vocab_size * cfg.d_model
    norms = (2 * cfg.n_layers + 1) * cfg.d_model * 4
    return (lin + head) * per + norms


def memory_mb() -> dict:
    """This process's peak and current resident memory (VmHWM/VmRSS: unlike ru_maxrss they
    restart at exec, so a worker does not inherit the driver's peak)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key = "peak_rss_mb" if line.startswith("VmHWM") else "rss_mb"
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# -- workers ------------------------------------------------------------------------------
def run_lmforge(case, ids, args) -> dict:

    torch.set_num_threads(args.threads)
    if case["mode"] == "plain":
        os.environ["LMFORGE_FAST"] = "0"
    if case["mode"] == "layers":
        os.environ["LMFORGE_NATIVE_STEP"] = "0"
    import lmforge
    from lmforge.engine import SamplingParams, generate_tokens
    from lmforge.fast.speculative import SpecStats, generate_speculative

    w = case["weights"]
    t = time.perf_counter()
    if w == "auto":  # the CLI's default model and settings (ModelArgs)
        lm = lmforge.load(args.source_gguf, dtype="fp32", quant="auto")
        w = getattr(lm.model, "quant", "none")
        w = "fp32" if w == "none" else w
    elif w == "gguf":
        lm = lmforge.load(args.source_gguf, dtype="fp32", quant="gguf")
    else:
        lm = lmforge.load(args.model_dir, dtype="fp32" if w in ("int8", "int4") else w, quant=w if w in ("int8", "int4") else "none")
    load_s = time.perf_counter() - t
    spec = case["mode"].startswith("spec-")
    draft = {"spec-ngram": "ngram", "spec-self": args.self_draft}.get(case["mode"])
    # the default mode goes through the engine with the CLI's --draft default, as a user's run does
    engine_draft = "auto" if case["mode"] == "default" else "none"

    def once(prompt, n):
        p = SamplingParams(max_new_tokens=n, stop_ids=set(), draft=engine_draft)
        st = SpecStats()
        if spec:
            gen = generate_speculative(lm.model, prompt, p, draft=draft, k=args.draft_k, stats=st)
        else:
            gen = generate_tokens(lm.model, [prompt], p)
        t0 = time.perf_counter()
        first, count, toks = None, 0, []
        with torch.inference_mode():
            for _, tok in gen:
                count += 1
                toks.append(tok)
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        return {"prefill_tok_s": len(prompt) / (first - t0), "decode_tok_s": (count - 1) / (end - first), "new_tokens": count,
                "acceptance": st.acceptance if spec else None, "tokens_per_target_call": st.tokens / max(st.target_calls, 1) if spec else None,
                "ids": toks}

    once(ids[:32], 4)  # warm-up: builds the fast decoder, fills caches
    runs = [once(ids, args.new_tokens) for _ in range(args.repeat)]
    out = {k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "decode_tok_s")}
    out["runs_decode_tok_s"] = [round(r["decode_tok_s"], 2) for r in runs]
    out["new_tokens"] = runs[0]["new_tokens"]
    if spec:
        out["acceptance"] = statistics.median(r["acceptance"] for r in runs)
        out["tokens_per_target_call"] = statistics.median(r["tokens_per_target_call"] for r in runs)
    out["first_ids"] = runs[0]["ids"][:16]
    out["load_s"] = load_s
    out["resolved_weights"] = w
    out["weight_bytes_per_token"] = model_bytes_per_token(lm.model)
    return out


def model_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every linear layer (float weights, int8 values
    with their scales, or GGUF blocks) and the output head."""
    from lmforge.native.linear import BlockLinear
    from lmforge.quant import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, BlockLinear):
            total += m.blocks.numel()
        elif isinstance(m, QuantLinear):
            total += m.q.numel() + 4 * m.scale.numel()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def run_transformers(case, ids, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["weights"]]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    load_s = time.perf_counter() - t
    x = torch.tensor([ids])

    def once(x, n):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(x, use_cache=True)
            t1 = time.perf_counter()
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            t2 = time.perf_counter()
        prefill = t1 - t0
        return {"prefill_tok_s": x.shape[1] / prefill, "decode_tok_s": (n - 1) / max(t2 - t1 - prefill, 1e-9), "ids": out[0, x.shape[1]:].tolist()}

    once(x[:, :32], 4)
    runs = [once(x, args.new_tokens) for _ in range(args.repeat)]
    out = {k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "decode_tok_s")}
    out["runs_decode_tok_s"] = [round(r["decode_tok_s"], 2) for r in runs]
    out["first_ids"] = runs[0]["ids"][:16]
    out["load_s"] = load_s
    return out


LLAMA_WORKER = r"""
import json, resource, statistics, sys, time
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["gguf"], n_ctx=a["n_ctx"], n_threads=a["threads"], n_threads_batch=a["threads"], n_batch=512, verbose=False)
ids = a["ids"]
def once(prompt, n):
    llm.reset()
    t0 = time.perf_counter(); first = None; toks = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        toks.append(tok)
        if first is None: first = time.perf_counter()
        if len(toks) >= n: break
    end = time.perf_counter()
    return {"prefill_tok_s": len(prompt) / (first - t0), "decode_tok_s": (len(toks) - 1) / (end - first), "ids": toks}
once(ids[:32], 4)
runs = [once(ids, a["new_tokens"]) for _ in range(a["repeat"])]
out = {k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "decode_tok_s")}
out["runs_decode_tok_s"] = [round(r["decode_tok_s"], 2) for r in runs]
out["first_ids"] = runs[0]["ids"][:16]
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"): out["peak_rss_mb"] = int(line.split()[1]) / 1024
    if line.startswith("VmRSS:"): out["rss_mb"] = int(line.split()[1]) / 1024
print("RESULT " + json.dumps(out))
"""


def llama_python(explicit: str | None) -> str | None:
    for py in (explicit, os.environ.get("LMFORGE_LLAMA_PYTHON"), sys.executable, "/work/venv-llama/bin/python"):
        if py and Path(py).exists() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return py
    return None


def worker_main(spec: str) -> None:
    job = json.loads(spec)
    args = argparse.Namespace(**job["args"])
    case, ids = job["case"], job["ids"]
    fn = run_lmforge if case["engine"] == "lmforge" else run_transformers
    out = fn(case, ids, args)
    out.update(memory_mb())
    print("RESULT " + json.dumps(out))


# -- driver -------------------------------------------------------------------------------
def prepare(args, tmp: Path) -> tuple[list[int], dict]:
    """The default model as an fp32 HF folder (fast to load in every worker), and the prompt."""
    import torch

    import lmforge
    from lmforge.loading import default_model_path, save_hf

    torch.set_num_threads(args.threads)
    src = default_model_path()
    lm = lmforge.load(src, dtype="fp32", quant="none")
    save_hf(lm.model, lm.tokenizer, tmp / "model")
    text = TEXT.read_text()
    full = lm.encode_chat([{"role": "user", "content": "Summarize the following text, quoting its key sentences.\n\n" + text}])
    tail = lm.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    ids = full[: args.prompt_tokens - len(tail)] + tail  # the text cut to fit, then the turn ends
    extra = {"source_gguf": str(src), "cfg": lm.model.cfg, "chat_ids": lm.encode_chat([{"role": "user", "content": CHAT_PROMPT}])}
    if args.llama_cases:
        from lmforge.export.gguf import write_gguf

        extra["q8_0"] = str(write_gguf(lm.model, lm.tokenizer, tmp / "smollm2-q8_0.gguf", "q8_0"))
    return ids, extra


def run_case(case, ids, args, extra, llama_py) -> dict | None:
    if case.get("prompt") == "chat":
        ids = extra["chat_ids"]
    if case["engine"] == "llama.cpp":
        if llama_py is None:
            return None
        gguf = extra["source_gguf"] if case["weights"].startswith("q4_1") else extra.get("q8_0")
        spec = {"gguf": gguf, "ids": ids, "threads": args.threads, "new_tokens": args.new_tokens, "repeat": args.repeat,
                "n_ctx": len(ids) + args.new_tokens + 8}
        cmd = [llama_py, "-c", LLAMA_WORKER, json.dumps(spec)]
    else:
        job = {"case": case, "ids": ids, "args": {k: v for k, v in vars(args).items() if k != "cases_list"}}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        print(f"  {case_name(case)} failed: {res.stderr.strip()[-600:]}", file=sys.stderr)
        return {"error": res.stderr.strip()[-300:]}
    return json.loads(line[len("RESULT "):])




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="all", help="all | quick | comma-separated names like lmforge/int8/fast")
    ap.add_argument("--self-draft", default="self", help="draft spec for spec-self (e.g. self:0-14,28,29)")
    ap.add_argument("--draft-k", type=int, default=4)
    ap.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    cases = all_cases(args.cases == "quick")
    if args.cases not in ("all", "quick"):
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if case_name(c) in wanted]
    llama_py = llama_python(args.llama_python) if any(c["engine"] == "llama.cpp" for c in cases) else None
    args.llama_cases = llama_py is not None
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        ids, extra = prepare(args, tmp)
        args.model_dir = str(tmp / "model")
        args.source_gguf = extra["source_gguf"]
        bw = read_bandwidth(args.threads)
        cfg = extra["cfg"]
        rows = []
        for c in cases:
            t = time.perf_counter()
            r = run_case(c, ids, args, extra, llama_py)
            if r is None:
                continue
            row = {"case": case_name(c), **c, **r, "default": is_default(c), "wall_s": round(time.perf_counter() - t, 1),
                   "load_avg_1min": round(os.getloadavg()[0], 2)}
            wb = r.get("weight_bytes_per_token") if c["engine"] == "lmforge" and "error" not in r else None
            if c["engine"] == "transformers":
                wb = weight_bytes_per_token(cfg, c["weights"])
            if wb:
                row["bandwidth_bound_tok_s"] = bw / wb
            rows.append(row)
            if "error" not in r:
                print(f"  {row['case']:32s} prefill {r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.1f} tok/s  (load {row['load_avg_1min']})", flush=True)
    refs = {p: next((r for r in rows if r["engine"] == "transformers" and r["weights"] == "fp32" and r.get("prompt") == p
                     and "error" not in r), None) for p in (None, "chat")}
    for r in rows:
        ref = refs.get(r.get("prompt"))
        if ref and "error" not in r:  # each prompt against transformers on the same prompt
            r["decode_vs_transformers"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["prefill_vs_transformers"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
    ok = [r for r in rows if "error" not in r and r["engine"] == "lmforge" and r.get("prompt") is None]
    best = max(ok, key=lambda r: r["decode_tok_s"]) if ok else None
    default = {p: next((r for r in rows if r["default"] and r.get("prompt") == p and "error" not in r), None) for p in (None, "chat")}
    llama_chat = find(rows, "llama.cpp/q4_1/generate@chat")
    gguf_chat = find(rows, "lmforge/gguf/fast@chat")
    result = {
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, python {platform.python_version()}",
        "threads": args.threads,
        "prompt_tokens": len(ids),
        "chat_prompt": CHAT_PROMPT,
        "chat_prompt_tokens": len(extra["chat_ids"]),
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "read_bandwidth_gb_s": bw / 1e9,
        "fastest_lmforge": best and best["case"],
        "fastest_decode_vs_transformers_fp32": best and best.get("decode_vs_transformers"),
        "default_mode": "lmforge chat/generate with no flags: --dtype fp32 --quant auto --draft auto",
        "default_decode_vs_transformers_fp32": default[None] and default[None].get("decode_vs_transformers"),
        "default_decode_vs_transformers_fp32_chat_prompt": default["chat"] and default["chat"].get("decode_vs_transformers"),
        "default_decode_vs_llama_cpp_chat_prompt": ratio(default["chat"], llama_chat),
        "gguf_fast_decode_vs_llama_cpp_chat_prompt": ratio(gguf_chat, llama_chat),
        "rows": rows,
    }
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")


def find(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["case"] == name and "error" not in r), None)


def ratio(a: dict | None, b: dict | None) -> float | None:
    """a's decode speed over b's: both measured in this run."""
    return a["decode_tok_s"] / b["decode_tok_s"] if a and b else None


def print_table(res: dict) -> None:
    print(f"\nthreads={res['threads']} prompt={res['prompt_tokens']} (@chat: {res.get('chat_prompt_tokens')}) new={res['new_tokens']} "
          f"read bandwidth {res['read_bandwidth_gb_s']:.1f} GB/s, load {res['load_average_before']} -> {res['load_average_after']}")
    print("* = the default (lmforge chat/generate with no flags); vs HF fp32 compares the same prompt")
    for key in ("default_decode_vs_llama_cpp_chat_prompt", "gguf_fast_decode_vs_llama_cpp_chat_prompt"):
        if res.get(key):
            print(f"{key}: {res[key]:.2f}x")
    hdr = f"| {'case':34s} | prefill tok/s | decode tok/s | vs HF fp32 | bound tok/s | accept | RSS MB (peak) |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['case']:34s} | error |")
            continue
        acc = f"{r['acceptance']:.2f}" if r.get("acceptance") is not None else "-"
        bound = f"{r['bandwidth_bound_tok_s']:.0f}" if r.get("bandwidth_bound_tok_s") else "-"
        vs = f"{r['decode_vs_transformers']:.2f}x" if r.get("decode_vs_transformers") else "-"
        name = r["case"] + (" *" if r.get("default") else "")
        print(f"| {name:34s} | {r['prefill_tok_s']:13.1f} | {r['decode_tok_s']:12.1f} | {vs:>10s} | {bound:>11s} | {acc:>6s} | {r.get('rss_mb', 0):6.0f} ({r['peak_rss_mb']:5.0f}) |")


if __name__ == "__main__":
    main()
