"""Cold start: seconds from the command to the first generated token, lmforge against llama.cpp.

    python benchmarks/cold_start.py [--repeat 5] [--threads 2] [--llama-python PATH]

lmforge: `lmforge generate --prompt Q --max-new-tokens 1` (a new process each time: the
interpreter, torch, the default GGUF, the tokenizer, the prompt's prefill, one token, exit).
llama.cpp: a new Python process with llama-cpp-python loading the same GGUF and generating one
token of the same chat prompt (so both include an interpreter's start). The first lmforge run
on a machine also builds the native kernels: measured once with an empty $LMFORGE_HOME and
reported apart. Best and median of --repeat runs, file caches warm, load average beside them.
Writes benchmarks/results/cold_start.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmforge.provenance import run_metadata  # noqa: E402

RESULT = Path(__file__).parent / "results" / "cold_start.json"
QUESTION = "What is the capital of France?"
LLAMA = r"""
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=512, verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": sys.argv[3]}], max_tokens=1, temperature=0)
print(out["choices"][0]["message"]["content"])
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.strip()[-400:]}")
    return dt, r.stdout.strip()


def summary(times: list[float]) -> dict:
    return {"best_s": min(times), "median_s": statistics.median(times), "runs_s": [round(t, 3) for t in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=os.environ.get("LMFORGE_LLAMA_PYTHON", "/work/venv-llama/bin/python"))
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    from lmforge.loading.resolve import default_model_path

    gguf = str(default_model_path())
    exe = str(Path(sys.executable).with_name("lmforge"))
    cmd = [exe, "generate", "--prompt", QUESTION, "--max-new-tokens", "1", "--threads", str(a.threads)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as home:  # the very first run: builds the kernels
        first, _ = timed(cmd, dict(os.environ, LMFORGE_HOME=home))
    timed(cmd)  # caches warm, kernels built
    runs = [timed(cmd) for _ in range(a.repeat)]
    res = {"lmforge": {**summary([t for t, _ in runs]), "first_token": runs[0][1], "first_run_on_a_machine_s": first}}
    if Path(a.llama_python).exists():
        lcmd = [a.llama_python, "-c", LLAMA, gguf, str(a.threads), QUESTION]
        timed(lcmd)
        lruns = [timed(lcmd) for _ in range(a.repeat)]
        res["llama.cpp (llama-cpp-python)"] = {**summary([t for t, _ in lruns]), "first_token": lruns[0][1]}
    out = {**run_metadata(), "threads": a.threads, "question": QUESTION, "gguf": gguf,
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()], "results": res}
    print(f"load {out['load_average_before']} -> {out['load_average_after']}")
    print("| engine | best s | median s | first token |")
    print("|---|---:|---:|---|")
    for name, r in res.items():
        print(f"| {name} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['first_token']!r} |")
    print(f"lmforge's first run on a machine (builds the native kernels): {first:.2f} s")
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
