"""How faithfully each CPU mode runs the default model's GGUF: greedy replies against the file's
own numbers (dequantized, fp32) on 100 held-out chat prompts, and decode speed, in one run.

    python benchmarks/default_fidelity.py [--prompts 100] [--tokens 20] [--threads 2] [--modes gguf,fp16]

The prompts are made here from templates (questions about places, things, people and tasks the
tests and demos do not use). A reply "agrees" when its first `--tokens` greedy tokens equal the
fp32 reference's. Writes benchmarks/results/default_fidelity.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import lmforge
from lmforge.engine import SamplingParams, generate_tokens
from lmforge.provenance import run_metadata

RESULT = Path(__file__).parent / "results" / "default_fidelity.json"
SUBJECTS = ["Japan", "Brazil", "the Moon", "volcanoes", "honeybees", "the Roman Empire", "photosynthesis", "jazz",
            "the Pacific Ocean", "chess", "glaciers", "Mount Everest", "the printing press", "penguins", "Canada",
            "the human heart", "electric cars", "Egypt", "rainbows", "the internet"]
ASKS = ["What is the most interesting fact about {}?", "Explain {} to a child in two sentences.",
        "Write a short poem about {}.", "Why do people study {}?", "Give me three words that describe {}."]


def prompts(n: int) -> list[str]:
    return [a.format(s) for a in ASKS for s in SUBJECTS][:n]


def replies(lm, texts: list[str], tokens: int) -> tuple[list[list[int]], float]:
    p = SamplingParams(max_new_tokens=tokens, temperature=0.0, stop_ids=set())
    out, t0, n = [], time.time(), 0
    for t in texts:
        ids = lm.encode_chat([{"role": "user", "content": t}])
        out.append([tok for _, tok in generate_tokens(lm.model, [ids], p)])
        n += len(out[-1])
    return out, n / (time.time() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="", help="only these, by quant or dtype (e.g. gguf,fp16); the reference always runs")
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    texts = prompts(a.prompts)
    modes = {"file (fp32, reference)": ("fp32", "none"), "file's own blocks (gguf, the default)": ("fp32", "gguf"),
             "fp16 weights": ("fp16", "none"), "int8 (re-quantized)": ("fp32", "int8"), "bf16 weights": ("bf16", "none")}
    if a.modes:
        keep = a.modes.split(",")
        modes = {k: v for k, v in modes.items() if k.startswith("file (") or v[1] in keep or v[0] in keep}
    res, ref = {}, None
    for name, (dtype, quant) in modes.items():
        lm = lmforge.load(None, dtype=dtype, quant=quant, device="cpu")
        got, tps = replies(lm, texts, a.tokens)
        ref = ref or got
        same = sum(g == r for g, r in zip(got, ref))
        tok_same = sum(x == y for g, r in zip(got, ref) for x, y in zip(g, r)) / max(1, sum(len(r) for r in ref))
        france = lm.chat("What is the capital of France?", max_new_tokens=24)
        res[name] = {"dtype": dtype, "quant": quant, "replies_equal_to_reference": same / len(texts),
                     "tokens_equal_to_reference": tok_same, "tokens_per_s": tps, "load1": os.getloadavg()[0],
                     "capital_of_france": france}
        print(f"{name:26s} replies equal {same / len(texts):6.1%}  tokens equal {tok_same:6.1%}  "
              f"{tps:6.1f} tok/s (load {os.getloadavg()[0]:.2f})  France: {france!r}", flush=True)
    out = {**run_metadata(), "prompts": len(texts), "tokens": a.tokens, "threads": a.threads, "modes": res}
    Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
