#!/usr/bin/env python3
"""Every lmforge stage end to end on one device, in one go: works?, tokens/s, MFU, peak memory.

    python benchmarks/gpu_check.py --device cuda                     # < 6 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --small              # the same stages, tiny, on a CPU
    python benchmarks/gpu_check.py --table-from results/gpu_check.json   # print a saved table again

Everything is built in a temporary work folder from what the repository ships or generates (no
download, no default model): English-like text (README, docs, the calibration chat, principles,
plus seeded generated sentences with made-up names and numbers; tests/data/heldout_prose.txt is
kept out for eval) -> `lmforge tokenizer train` (BPE, 8k on cuda) -> `lmforge data prepare` ->
`lmforge pretrain` (a recipe written here: 8 layers x 512, bf16, torch.compile on cuda; a
0.9M-parameter model on a CPU) -> every later stage starts from that run folder:
- `sft` full / LoRA / QLoRA on generated chat JSONL (arithmetic answers, "repeat after me");
- `rm train` and `dpo` (LoRA) on generated arithmetic preference pairs. A base model has no chat
  template and these commands refuse it (see base_error in the JSON); the stage then runs again
  from the sft-full model (ChatML), as the README's pipeline does, and says so;
- `rl` (GRPO, LoRA, exact-answer reward) on generated {"prompt", "answer"} arithmetic tasks;
- `eval` (bits/byte of held-out prose + a multiple-choice JSONL), `inspect` (logit lens and
  attention PNGs), `generate` (64 tokens, streamed), `chat` (two lines on stdin; sft-full),
  `serve` (sft-full, continuous batching: 1 and 32 concurrent streaming clients, 64 tokens each,
  total tokens/s and TTFT p50), `merge` (the sft-lora adapter) and `convert` (the base run -> HF
  folder, loaded back with transformers).

Each stage is a subprocess of the real CLI (`python -m lmforge.cli.main ...`) with a timeout and
its own log; on cuda all stages share a budget (340 s) and run in an order that leaves the long
ones last (skipped, not overrun, when time is short). A stage "works" when it exits 0 and its
expected output exists. tokens/s of a training stage is the median `tokens_per_s` of its
metrics.jsonl steps after the first; MFU = tokens/s x 6 x params / 989e12 (H100/H200 dense
bf16; "-" on a CPU); peak memory is the `peak_mem_gb` the trainer logs on CUDA (else "-"; the
JSON also keeps nvidia-smi's highest reading while the stage ran). Commands that reject
`--device` are run again without it (noted in the row). If the compiled pretraining run fails
for a compiler reason it is run once more without torch.compile, so later stages still run.

Writes `<out-dir>/gpu_check.json` (default benchmarks/results/gpu_check_<device>.json) with the
machine, the git commit, the load average and every row; the logs of failed stages are copied to
`<out-dir>/logs/`. Exit status 0 when every stage works.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = {"cuda": 989e12}  # dense bf16, H100 SXM / H200
STAGES = ["tokenizer", "prepare", "pretrain", "sft-full", "sft-lora", "sft-qlora", "rm", "dpo", "rl", "eval",
          "inspect", "generate", "chat", "serve", "merge", "convert"]


# -- sizes ----------------------------------------------------------------------------------------
def sizes(device: str, small: bool) -> dict:
    """Everything that scales with the machine. cuda: a real tokens/s; small/cpu: minutes on 2 cores."""
    if device == "cuda" and not small:
        return dict(corpus_mb=4.0, vocab=8192, depth=8, aspect=64, head_dim=64, kv_heads=4, seq_len=512, batch=32,
                    pt_steps=80, pt_compile=True, pt_dtype="bf16", sft_n=640, sft_steps=30, sft_batch=16,
                    pair_n=320, pref_steps=30, pref_batch=8, rl_n=256, rl_val=32, rl_steps=8, rl_group=8,
                    rl_prompts=8, eval_limit=40, serve_clients=32, gen_tokens=64, budget=340,
                    timeouts=dict(tokenizer=60, prepare=60, pretrain=150, sft=60, rm=60, dpo=60, rl=75, eval=50,
                                  inspect=50, generate=45, chat=45, serve=90, merge=45, convert=60))
    return dict(corpus_mb=1.0, vocab=8192 if device == "cuda" else 4096, depth=2, aspect=64, head_dim=32, kv_heads=2,
                seq_len=256, batch=8, pt_steps=40, pt_compile=False, pt_dtype="bf16" if device == "cuda" else "fp32",
                sft_n=160, sft_steps=6, sft_batch=8, pair_n=96, pref_steps=6, pref_batch=4, rl_n=64, rl_val=8,
                rl_steps=3, rl_group=4, rl_prompts=2, eval_limit=12, serve_clients=32, gen_tokens=64, budget=0,
                timeouts=dict(tokenizer=120, prepare=120, pretrain=300, sft=240, rm=240, dpo=240, rl=300, eval=180,
                              inspect=120, generate=120, chat=120, serve=300, merge=120, convert=120))


# -- generated data -------------------------------------------------------------------------------
NOUNS = ("house river city garden road window table letter teacher doctor farmer sailor child mother father brother "
         "sister friend king queen soldier merchant village mountain forest island bridge tower market school church "
         "ship harbour lamp clock book song story morning evening winter summer autumn spring field valley horse dog "
         "cat bird wolf fox bread water fire stone wind rain snow sea shore door kitchen library engine machine "
         "train station letter paper window garden painter writer baker miner captain student neighbour stranger "
         "lighthouse orchard wheel candle mirror map coin basket boat cart hill lake meadow storm cloud star moon sun "
         "road path gate wall roof floor chair bed cup knife rope net").split()
ADJS = ("old young small large quiet loud bright dark warm cold long short green red white black blue golden silver "
        "heavy light early late happy tired careful strange simple narrow wide deep empty busy gentle patient honest "
        "ancient modern hidden distant broken clean dusty wooden frozen sudden slow quick").split()
VERBS = ("sees finds carries follows builds paints remembers opens closes watches repairs visits leaves reaches "
         "crosses counts writes reads sells buys keeps loses guards cleans measures draws lifts pulls pushes "
         "mends fills empties gathers plants").split()
ADVS = ("slowly quickly carefully quietly again often rarely always never suddenly gently patiently early late "
        "together alone").split()
PLACES = ("by the sea", "in the morning", "at night", "near the old bridge", "before the winter", "after the storm",
          "in the market", "on the hill", "under the tower", "across the river", "behind the school", "at the harbour")
CONNECT = ("because", "although", "while", "when", "after", "before", "until", "and then", "but", "so")
SYLL = ("ka ri to mel an sor vin da lu pe hal ost ren gri mo tay bel cor un ves li na por eth ska dun fer "
        "il zo ha qui bra tel om sav ju nek rho wen").split()


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLL) for _ in range(rng.randint(2, 3))).capitalize()


def _sentence(rng: random.Random, names: list[str]) -> str:
    def np_():
        r = rng.random()
        if r < 0.25:
            return rng.choice(names)
        return f"{rng.choice(('the', 'a', 'my', 'our', 'their', 'this'))} " + \
            (f"{rng.choice(ADJS)} " if rng.random() < 0.6 else "") + rng.choice(NOUNS)

    kind = rng.random()
    if kind < 0.55:
        s = f"{np_()} {rng.choice(VERBS)} {np_()}"
        if rng.random() < 0.5:
            s += f" {rng.choice(PLACES)}"
        if rng.random() < 0.3:
            s += f" {rng.choice(CONNECT)} {np_()} {rng.choice(VERBS)} {np_()} {rng.choice(ADVS)}"
    elif kind < 0.7:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        s = f"{np_()} {rng.choice(('counts', 'sells', 'buys', 'carries', 'finds'))} {a} {rng.choice(NOUNS)}s and " \
            f"{b} more, so there are {a + b} in all"
    elif kind < 0.8:
        s = f"in {rng.randint(1700, 2024)} {rng.choice(names)} {rng.choice(VERBS)} {np_()} {rng.choice(PLACES)}"
    elif kind < 0.9:
        s = f"what is {rng.randint(10, 99)} + {rng.randint(10, 99)}"
        a, b = (int(x) for x in s.split()[2::2])
        s += f"? it is {a + b}"
    else:
        s = f"{np_()} was {rng.choice(ADJS)} and {rng.choice(ADJS)}, {rng.choice(ADVS)} {rng.choice(('waiting', 'working', 'singing', 'walking', 'thinking'))}"
    return s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?" if s.startswith("what") else "."))


def shipped_text() -> list[tuple[str, str]]:
    """(name, text) of prose the repository ships (the held-out prose stays out: eval uses it)."""
    out = []
    for p in [ROOT / "README.md", ROOT / "lmforge" / "quant_calibration.txt", *sorted((ROOT / "docs").glob("*.md")),
              *sorted((ROOT / "lmforge" / "align" / "principles").glob("*.yaml"))]:
        try:
            out.append((p.name, p.read_text(encoding="utf-8")))
        except OSError:
            pass
    return out


def write_corpus(root: Path, mb: float, seed: int = 0) -> Path:
    """A folder of .txt documents: the shipped prose once, then generated documents up to `mb` MB."""
    rng = random.Random(seed)
    d = root / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, text in shipped_text():
        (d / f"shipped_{name}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode())
    names = sorted({_name(rng) for _ in range(9000)})
    target = int(mb * 1e6)
    with open(d / "generated.jsonl", "w", encoding="utf-8") as f:  # one document per line
        while total < target:
            cast = rng.sample(names, 12)  # a document keeps returning to its own few names
            paras = [" ".join(_sentence(rng, cast) for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(2, 6))]
            doc = "\n\n".join(paras) + "\n"
            f.write(json.dumps({"text": doc}) + "\n")
            total += len(doc)
    return d


ARITH = "What is {a} + {b}? Answer with the number only."


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_task_data(root: Path, s: dict, seed: int = 0) -> dict:
    """SFT chat JSONL, preference pairs, RL tasks, eval items, serve/generate prompts."""
    rng = random.Random(seed + 1)
    d = root / "taskdata"
    d.mkdir(parents=True, exist_ok=True)
    sft = []
    for i in range(s["sft_n"]):
        if i % 2 == 0:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            msgs = [{"role": "user", "content": ARITH.format(a=a, b=b)}, {"role": "assistant", "content": str(a + b)}]
        else:
            words = [rng.choice(NOUNS) for _ in range(rng.randint(3, 6))]
            msgs = [{"role": "user", "content": "Repeat after me: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(words)}]
        if i % 5 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        sft.append({"messages": msgs})
    pairs = []
    for _ in range(s["pair_n"]):
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        right = a + b
        wrong = right + rng.choice((-10, -1, 1, 10))
        pairs.append({"prompt": ARITH.format(a=a, b=b), "chosen": str(right), "rejected": str(wrong)})
    rl, seen = [], set()
    while len(rl) < s["rl_n"] + s["rl_val"]:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rl.append({"prompt": ARITH.format(a=a, b=b), "answer": str(a + b)})
    mc = []
    for i in range(40):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        choices = sorted({a + b, a + b + 1, a + b - 10, a + b + 10})
        mc.append({"input": f"What is {a} + {b}? It is", "choices": [f" {c}" for c in choices],
                   "answer": choices.index(a + b)})
    heldout = ROOT / "tests" / "data" / "heldout_prose.txt"
    ppl = d / "heldout.txt"
    if heldout.exists():
        shutil.copy(heldout, ppl)
    else:  # generated prose with other names and another seed
        r2 = random.Random(seed + 99)
        ppl.write_text(" ".join(_sentence(r2, [_name(r2) for _ in range(20)]) for _ in range(60)) + "\n")
    return {
        "sft": _write_jsonl(d / "sft.jsonl", sft),
        "pairs": _write_jsonl(d / "pairs.jsonl", pairs),
        "rl": _write_jsonl(d / "rl_train.jsonl", rl[:s["rl_n"]]),
        "rl_val": _write_jsonl(d / "rl_val.jsonl", rl[s["rl_n"]:]),
        "mc": _write_jsonl(d / "arith_mc.jsonl", mc),
        "ppl": ppl,
    }


def write_pretrain_recipe(path: Path, s: dict, device: str, data_dir: Path, out: Path) -> Path:
    lines = [
        "# written by benchmarks/gpu_check.py",
        "model:",
        f"  depth: {s['depth']}",
        f"  aspect_ratio: {s['aspect']}",
        f"  head_dim: {s['head_dim']}",
        f"  n_kv_heads: {s['kv_heads']}",
        "data:",
        f"  dir: {json.dumps(str(data_dir))}",
        f"  batch_size: {s['batch']}",
        f"  seq_len: {s['seq_len']}",
        # (no val eval under torch.compile: eval mode + no_grad would compile the model a second time)
        f"  eval_tokens: {0 if s['pt_compile'] else s['seq_len'] * s['batch']}",
        "train:",
        f"  lr: {0.003 if s['depth'] >= 6 else 0.006}",
        f"  warmup_steps: {max(2, s['pt_steps'] // 10)}",
        f"  max_steps: {s['pt_steps']}",
        "  min_lr_ratio: 0.1",
        "  weight_decay: 0.1",
        f"  dtype: {s['pt_dtype']}",
        f"  compile: {'true' if s['pt_compile'] else 'false'}",
        f"  device: {device}",
        "  log_every: 1",
        "  eval_every: 0",
        "  save_every: 0",
        "  keep_last: 1",
        f"out: {json.dumps(str(out))}",
        # no sample on CUDA: decoding through the compiled model recompiles per length (minutes)
        'sample_prompt: "The"',
        f"sample_tokens: {0 if s['pt_compile'] else 16}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- running one CLI command ----------------------------------------------------------------------
class GpuMemPoller:
    """The highest `nvidia-smi` memory.used (GiB, whole device) while a stage runs; None without it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._t = None

    def __enter__(self):
        if self.enabled:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
                if out:
                    v = float(out[0]) / 1024
                    self.peak = v if self.peak is None else max(self.peak, v)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        if self._t is not None:
            self._t.join(timeout=6)


def _kill_group(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, n: int = 3) -> list[str]:
    """The last n non-empty lines; a progress bar glued in front of an error message is cut off."""
    lines = []
    for ln in text.replace("\r", "\n").splitlines():
        i = ln.find("error:")
        if i > 0 and ("it/s]" in ln[:i] or "s/it]" in ln[:i]):
            ln = ln[i:]
        if ln.strip():
            lines.append(ln.rstrip())
    return lines[-n:]


class Runner:
    def __init__(self, work: Path, env: dict, deadline: float | None, stage_timeout: float | None):
        self.work, self.env, self.deadline, self.stage_timeout = work, env, deadline, stage_timeout
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def timeout_for(self, default: float) -> float:
        t = float(self.stage_timeout or default)
        if self.deadline is not None:
            t = min(t, self.deadline - time.time())
        return t

    def cli(self, stage: str, args: list[str], timeout: float, device_args: list[str] | None = None,
            stdin: str | None = None, stamps: bool = False) -> dict:
        """Run `python -m lmforge.cli.main ARGS [DEVICE_ARGS]`; if the command rejects --device,
        once more without it. Returns rc, stdout, stderr, seconds, and `no_device` when retried;
        with `stamps`, also (seconds since start, bytes) of every piece of stdout as it arrived."""
        r = self._run(stage, [*args, *(device_args or [])], timeout, stdin, stamps)
        if device_args and r["rc"] != 0 and "unknown option '--device'" in r["stderr"]:
            r2 = self._run(stage, args, timeout - r["seconds"], stdin, stamps)
            r2["no_device"] = True
            r2["seconds"] += r["seconds"]
            return r2
        return r

    def _run(self, stage: str, args: list[str], timeout: float, stdin: str | None, stamps: bool = False) -> dict:
        cmd = [sys.executable, "-m", "lmforge.cli.main", *args]
        out_f, err_f = self.logs / f"{stage}.stdout.tmp", self.logs / f"{stage}.stderr.tmp"
        t0 = time.time()
        timed_out = False
        pieces: list[tuple[float, int]] = []
        if timeout <= 1:
            return {"rc": None, "stdout": "", "stderr": "no time left in the budget", "seconds": 0.0, "timed_out": True}
        with open(out_f, "wb") as fo, open(err_f, "w") as fe:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE if stamps else fo, stderr=fe,
                                 stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                 env=self.env, cwd=str(self.work), start_new_session=True)
            try:
                if stamps:
                    import select

                    if stdin is not None:
                        p.stdin.write(stdin.encode())
                        p.stdin.close()
                    fd, end = p.stdout.fileno(), t0 + timeout
                    while True:
                        left = end - time.time()
                        if left <= 0:
                            raise subprocess.TimeoutExpired(cmd, timeout)
                        ready, _, _ = select.select([fd], [], [], min(1.0, left))
                        if ready:
                            b = os.read(fd, 1 << 16)
                            if not b:
                                break
                            pieces.append((time.time() - t0, len(b)))
                            fo.write(b)
                    p.wait(timeout=max(1.0, end - time.time()))
                else:
                    p.communicate(input=stdin.encode() if stdin is not None else None, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(p)
                p.wait()
        secs = time.time() - t0
        stdout, stderr = out_f.read_text(errors="replace"), err_f.read_text(errors="replace")
        out_f.unlink(), err_f.unlink()
        self.append_log(stage, f"$ {' '.join(cmd)}\n# rc={p.returncode} seconds={secs:.1f}{' TIMEOUT' if timed_out else ''}\n"
                               f"--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
        return {"rc": p.returncode, "stdout": stdout, "stderr": stderr, "seconds": secs, "timed_out": timed_out,
                "pieces": pieces}

    def append_log(self, stage: str, text: str) -> None:
        with open(self.logs / f"{stage}.log", "a", encoding="utf-8") as f:
            f.write(text)


# -- reading results ------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def train_numbers(run_dir: Path) -> dict:
    """Median tokens/s of the logged steps after the first; highest peak_mem_gb; the trainer's own mfu."""
    recs = [r for r in read_metrics(run_dir) if isinstance(r.get("tokens_per_s"), (int, float))]
    recs.sort(key=lambda r: r.get("step", 0))
    out: dict = {"steps_logged": len(recs)}
    if recs:
        rest = recs[1:] or recs
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rest)
        out["last_loss"] = recs[-1].get("loss")
        out["first_loss"] = recs[0].get("loss")
    mem = [r["peak_mem_gb"] for r in read_metrics(run_dir) if isinstance(r.get("peak_mem_gb"), (int, float))]
    if mem:
        out["peak_mem_gb"] = max(mem)
    mfu = [r["mfu"] for r in recs[1:] or recs if isinstance(r.get("mfu"), (int, float))]
    if mfu:
        out["mfu_trainer"] = statistics.median(mfu)
    return out


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The folder `latest` points to (a run folder's newest complete checkpoint)."""
    latest = run_dir / "latest"
    if not latest.exists():
        return None
    target = latest.read_text().strip() if latest.is_file() else str(latest.resolve())
    p = Path(target)
    if not p.is_absolute():
        p = run_dir / p
    if not p.exists():
        cands = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").exists() else []
        cands = [c for c in cands if not c.name.endswith(".tmp")]
        return cands[-1] if cands else None
    return p


def count_params(folder: Path) -> int | None:
    """Parameters in a folder's *.safetensors, from the headers (no torch)."""
    total, seen = 0, False
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        for k, v in header.items():
            if k == "__metadata__":
                continue
            total += math.prod(v.get("shape", [])) if v.get("shape") else 1
            seen = True
    return total if seen else None


def has_model_files(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


# -- serve load -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one_stream(client, url: str, model: str, i: int, max_tokens: int) -> dict:
    topics = ["the sea", "a library", "mountains", "a robot", "autumn", "a city at night", "bread", "a river"]
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a short paragraph about {topics[i % len(topics)]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage_tokens, chunks, error = None, None, 0, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", "tokens": 0, "ttft": None}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = str(ev["error"].get("message", ev["error"]))
                    break
                if ev.get("usage"):
                    usage_tokens = ev["usage"].get("completion_tokens")
                for ch in ev.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
    except Exception as e:  # httpx errors, bad JSON: count as a failed request
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "ttft": ttft, "tokens": usage_tokens if usage_tokens is not None else chunks,
            "from_usage": usage_tokens is not None, "latency": time.perf_counter() - t0}


async def _level(url: str, model: str, clients: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, trust_env=False) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[_one_stream(c, url, model, i, max_tokens) for i in range(clients)])
        wall = time.perf_counter() - t0
    ok = [r for r in res if not r["error"]]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"clients": clients, "ok": len(ok), "errors": [r["error"] for r in res if r["error"]][:3],
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
            "tokens_from_usage": all(r.get("from_usage") for r in ok) if ok else None}


# -- the check ------------------------------------------------------------------------------------
class Check:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.s = sizes(args.device, args.small)
        self.t_start = time.time()
        budget = args.budget if args.budget is not None else self.s["budget"]
        self.deadline = self.t_start + budget if budget else None
        if args.work_dir:
            self.work = Path(args.work_dir).resolve()
            self.work.mkdir(parents=True, exist_ok=True)
        else:
            self.work = Path(tempfile.mkdtemp(prefix="lmforge_gpu_check_"))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("LMFORGE_HOME", str(self.work / "home"))  # nothing read from or written to ~/.cache
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env = env
        self.runner = Runner(self.work, env, self.deadline, args.stage_timeout)
        self.rows: list[dict] = []
        self.paths: dict = {}
        self.params: int | None = None
        self.only = set(args.stages.split(",")) if args.stages else None
        self.base_refused = ""

    # helpers
    def dev_train(self) -> list[str]:
        return ["--train.device", self.device]

    def dev(self) -> list[str]:
        return ["--device", self.device]

    def row(self, stage: str, **kw) -> dict:
        r = {"stage": stage, "works": False, "seconds": None, "tokens_per_s": None, "mfu": None, "peak_mem_gb": None,
             "note": "", "error": []}
        r.update(kw)
        self.rows.append(r)
        return r

    def finish(self, row: dict, res: dict | None, ok: bool, note: str = "", mem: GpuMemPoller | None = None) -> dict:
        if res is not None:
            row["seconds"] = round((row["seconds"] or 0) + res["seconds"], 1)
            row["rc"] = res["rc"]
            if res.get("no_device"):
                note = (note + "; " if note else "") + "no --device flag: ran on its default device"
                row["no_device_flag"] = True
            if res.get("timed_out"):
                note = (note + "; " if note else "") + "TIMEOUT"
        row["works"] = bool(ok)
        if mem is not None and mem.peak is not None:
            row["smi_mem_gb"] = round(mem.peak, 2)
            if row.get("peak_mem_gb") is None:
                note = (note + "; " if note else "") + f"nvidia-smi max {mem.peak:.2f} GB (whole device)"
        if note:
            row["note"] = (row["note"] + "; " if row["note"] else "") + note
        if not ok and res is not None:
            row["error"] = _tail(res["stderr"]) or _tail(res["stdout"])
        return row

    def mfu(self, tps) -> float | None:
        peak = PEAK_FLOPS.get(self.device)
        if not peak or not tps or not self.params:
            return None
        return tps * 6 * self.params / peak

    def skip(self, stage: str, why: str) -> None:
        self.row(stage, note=f"skipped: {why}", skipped=True)

    def want(self, stage: str) -> bool:
        return self.only is None or stage in self.only

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.deadline - time.time() < 12

    def timeout(self, key: str) -> float:
        return self.runner.timeout_for(self.s["timeouts"][key])

    # stages
    def stage(self, name: str, fn, needs: tuple = ()) -> None:
        if not self.want(name):
            return
        missing = [n for n in needs if not self.paths.get(n)]
        if missing:
            self.skip(name, f"needs {', '.join(missing)}")
            return
        if self.out_of_time():
            self.skip(name, "out of the time budget")
            return
        print(f"[{time.time() - self.t_start:6.1f}s] {name} ...", flush=True)
        try:
            fn(name)
        except Exception as e:  # a bug in this script must not lose the other rows
            r = next((r for r in self.rows if r["stage"] == name), None) or self.row(name)
            r["works"] = False
            r["error"] = [f"gpu_check: {type(e).__name__}: {e}"]
        r = [r for r in self.rows if r["stage"] == name]
        if r:
            r = r[-1]
            print(f"[{time.time() - self.t_start:6.1f}s] {name}: {'ok' if r['works'] else 'FAILED'} "
                  f"({r['seconds'] or 0:.1f}s) {r['note']}" + (f"\n    {r['error'][-1]}" if r["error"] else ""), flush=True)

    def st_tokenizer(self, name):
        corpus = write_corpus(self.work, self.s["corpus_mb"])
        self.paths["corpus"] = corpus
        mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
        out = self.work / "tok"
        row = self.row(name)
        res = self.runner.cli(name, ["tokenizer", "train", "--data", str(corpus), "--vocab-size", str(self.s["vocab"]),
                                     "--out", str(out)], self.timeout("tokenizer"))
        ok = res["rc"] == 0 and (out / "tokenizer.json").exists()
        vocab = None
        if ok:
            try:
                vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
                vocab = len(vocab)
            except Exception:
                vocab = None
            self.paths["tokenizer"] = out
        self.finish(row, res, ok, f"{mb:.1f} MB text, vocab {vocab or '?'}")

    def st_prepare(self, name):
        out = self.work / "prepared"
        row = self.row(name)
        res = self.runner.cli(name, ["data", "prepare", "--data", str(self.paths["corpus"]), "--tokenizer",
                                     str(self.paths["tokenizer"]), "--out", str(out), "--val-fraction", "0.02",
                                     "--workers", str(min(4, os.cpu_count() or 1))], self.timeout("prepare"))
        ok = res["rc"] == 0 and (out / "manifest.json").exists()
        note = ""
        if ok:
            self.paths["prepared"] = out
            try:
                m = json.loads((out / "manifest.json").read_text())
                tr = m.get("train", {}).get("tokens") or m.get("train_tokens") or m.get("splits", {}).get("train", {}).get("tokens")
                if tr:
                    note = f"{tr:,} train tokens"
                    row["tokens"] = tr
            except Exception:
                pass
            if res["seconds"] and row.get("tokens"):
                row["tokens_per_s"] = row["tokens"] / res["seconds"]
                note += " (tokens/s incl. start-up)"
        self.finish(row, res, ok, note)

    def train_row(self, name, run_dir: Path, res: dict, ok: bool, note: str, mem) -> None:
        row = self.row(name)
        nums = train_numbers(run_dir)
        if nums.get("tokens_per_s"):
            row["tokens_per_s"] = nums["tokens_per_s"]
            row["mfu"] = self.mfu(nums["tokens_per_s"])
        if "peak_mem_gb" in nums:
            row["peak_mem_gb"] = nums["peak_mem_gb"]
        row["train"] = nums
        if nums.get("first_loss") is not None and nums.get("last_loss") is not None:
            note = (note + "; " if note else "") + f"loss {nums['first_loss']:.2f}->{nums['last_loss']:.2f}"
        if nums.get("mfu_trainer") is not None:
            note += f"; trainer mfu {nums['mfu_trainer']:.1%}"
        if res.get("base_error"):
            row["base_error"] = res["base_error"]
        return self.finish(row, res, ok, note, mem)

    def st_pretrain(self, name):
        run = self.work / "runs" / "base"
        s = dict(self.s)
        recipe = write_pretrain_recipe(self.work / "pretrain.yaml", s, self.device, self.paths["prepared"], run)
        fallback = ""
        with GpuMemPoller(self.device == "cuda") as mem:
            res = self.runner.cli(name, ["pretrain", "--config", str(recipe)], self.timeout("pretrain"))
            ck = checkpoint_dir(run)
            err = res["stderr"].lower()
            compile_trouble = res.get("timed_out") or any(w in err for w in ("compil", "inductor", "dynamo", "triton", "gcc", "ptxas"))
            if s["pt_compile"] and not (res["rc"] == 0 and ck is not None) and compile_trouble and not self.out_of_time():
                # torch.compile needs a working inductor (triton, a C compiler): without one, train
                # uncompiled so every later stage still has a base model
                first = res
                fallback = "torch.compile run FAILED (" + " ".join(_tail(first["stderr"], 1))[:200] + "): ran without compile"
                shutil.rmtree(run, ignore_errors=True)
                s["pt_compile"] = False
                recipe = write_pretrain_recipe(self.work / "pretrain_nocompile.yaml", s, self.device, self.paths["prepared"], run)
                res = self.runner.cli(name, ["pretrain", "--config", str(recipe)], self.timeout("pretrain"))
                res["seconds"] += first["seconds"]
                ck = checkpoint_dir(run)
        ok = res["rc"] == 0 and ck is not None and has_model_files(ck)
        if ok:
            self.paths["base"] = run
            self.params = count_params(ck)
        note = (f"{s['depth']}L d{s['depth'] * s['aspect']} {((self.params or 0) / 1e6):.1f}M params, "
                f"{s['batch']}x{s['seq_len']}, {s['pt_steps']} steps, {s['pt_dtype']}{', compile' if s['pt_compile'] else ''}")
        if fallback:
            note = fallback + "; " + note
        row = self.train_row(name, run, res, ok, note, mem)
        row["params"] = self.params

    def st_sft(self, name):
        method = name.split("-", 1)[1]
        run = self.work / "runs" / name
        args = ["sft", "--model", str(self.paths["base"]), "--data", str(self.paths["task"]["sft"]), "--method", method,
                "--out", str(run), "--max-seq-len", "128", "--batch-size", str(self.s["sft_batch"]),
                "--train.max-steps", str(self.s["sft_steps"]), "--train.log-every", "1", "--train.warmup-steps", "2",
                "--train.lr", "1e-3" if method != "full" else "3e-4", *self.dev_train()]
        if self.device == "cuda":
            args += ["--train.dtype", "bf16"]
        if method != "full":
            args += ["--lora.r", "8", "--lora.alpha", "16"]
        with GpuMemPoller(self.device == "cuda") as mem:
            res = self.runner.cli(name, args, self.timeout("sft"))
        ck = checkpoint_dir(run)
        if method == "full":
            made = ck is not None and has_model_files(ck)
        else:
            made = ck is not None and (ck / "adapter_config.json").exists() and any(ck.glob("adapter_model*.safetensors"))
        ok = res["rc"] == 0 and made
        if ok:
            self.paths[name] = run
        self.train_row(name, run, res, ok, f"{self.s['sft_steps']} steps x {self.s['sft_batch']}", mem)

    NO_TEMPLATE = "does not render the prompt as a prefix"

    def pref_run(self, name: str, args_for, run: Path, key: str):
        """Run a preference stage from the base; if the base (no chat template) is refused, once more
        from the SFT'd model (ChatML), noting it. Returns (res, note)."""
        with GpuMemPoller(self.device == "cuda") as mem:
            if self.base_refused and self.paths.get("sft-full"):  # known from the stage before: save the time
                res = self.runner.cli(name, args_for(self.paths["sft-full"]), self.timeout(key))
                return res, "from sft-full (the base was refused in " + self.base_refused + ")", mem
            res = self.runner.cli(name, args_for(self.paths["base"]), self.timeout(key))
            note = "from base"
            if res["rc"] != 0 and self.NO_TEMPLATE in res["stderr"] and self.paths.get("sft-full"):
                self.base_refused = name
                shutil.rmtree(run, ignore_errors=True)
                first = res
                res = self.runner.cli(name, args_for(self.paths["sft-full"]), self.timeout(key))
                res["seconds"] += first["seconds"]
                note = "from sft-full: the base (no chat template) was refused, see base_error"
                res["base_error"] = _tail(first["stderr"], 1)
        return res, note, mem

    def st_rm(self, name):
        run = self.work / "runs" / "rm"
        args = lambda model: ["rm", "train", "--model", str(model), "--data", str(self.paths["task"]["pairs"]),
                "--out", str(run), "--method", "lora", "--batch-size", str(self.s["pref_batch"]),
                "--max-seq-len", "96", "--val-fraction", "0.1", "--train.max-steps", str(self.s["pref_steps"]),
                "--train.log-every", "1", "--train.warmup-steps", "2", "--train.eval-every", "0", "--train.lr", "1e-3",
                *self.dev_train(), *(["--train.dtype", "bf16"] if self.device == "cuda" else [])]
        res, how, mem = self.pref_run(name, args, run, "rm")
        ck = checkpoint_dir(run)
        ok = res["rc"] == 0 and ck is not None and has_model_files(ck)
        note = f"{how}; {self.s['pref_steps']} steps, LoRA + score head"
        if (run / "rm_eval.json").exists():
            try:
                acc = json.loads((run / "rm_eval.json").read_text())["heldout"]["accuracy"]
                note += f"; held-out pair acc {acc:.2f}"
            except Exception:
                pass
        self.train_row(name, run, res, ok, note, mem)

    def st_dpo(self, name):
        run = self.work / "runs" / "dpo"
        args = lambda model: [
            "dpo", "--model", str(model), "--data", str(self.paths["task"]["pairs"]), "--out", str(run),
            "--method", "lora", "--batch-size", str(self.s["pref_batch"]), "--max-seq-len", "96",
            "--val-fraction", "0.1", "--train.max-steps", str(self.s["pref_steps"]), "--train.log-every", "1",
            "--train.warmup-steps", "2", "--train.eval-every", "0", *self.dev_train(),
            *(["--train.dtype", "bf16"] if self.device == "cuda" else [])]
        res, how, mem = self.pref_run(name, args, run, "dpo")
        ck = checkpoint_dir(run)
        ok = res["rc"] == 0 and ck is not None and (ck / "adapter_config.json").exists()
        self.train_row(name, run, res, ok, f"{how}; {self.s['pref_steps']} steps, sigmoid, LoRA", mem)

    def st_rl(self, name):
        run = self.work / "runs" / "rl"
        s = self.s
        args = ["rl", "--model", str(self.paths["base"]), "--data", str(self.paths["task"]["rl"]),
                "--val-data", str(self.paths["task"]["rl_val"]), "--reward", "exact", "--out", str(run), "--method", "lora",
                "--grpo.group-size", str(s["rl_group"]), "--grpo.prompts-per-step", str(s["rl_prompts"]),
                "--grpo.max-new-tokens", "8", "--train.max-steps", str(s["rl_steps"]), "--train.log-every", "1",
                "--train.eval-every", "0", "--train.lr", "1e-4", *self.dev_train()]
        if self.device == "cuda":
            args += ["--train.dtype", "bf16"]
        with GpuMemPoller(self.device == "cuda") as mem:
            res = self.runner.cli(name, args, self.timeout("rl"))
        ck = checkpoint_dir(run)
        ok = res["rc"] == 0 and ck is not None and (ck / "adapter_config.json").exists() and (run / "rl_eval.json").exists()
        note = f"GRPO {s['rl_steps']} steps x {s['rl_prompts']}x{s['rl_group']} rollouts"
        try:
            ev = json.loads((run / "rl_eval.json").read_text())
            note += f"; held-out acc {ev['before']['eval_accuracy']:.2f}->{ev['after']['eval_accuracy']:.2f}"
        except Exception:
            pass
        self.train_row(name, run, res, ok, note + "; tokens/s incl. rollouts", mem)

    def st_eval(self, name):
        out = self.work / "eval"
        row = self.row(name)
        t = self.paths["task"]
        with GpuMemPoller(self.device == "cuda") as mem:
            res = self.runner.cli(name, ["eval", "--model", str(self.paths["base"]), "--tasks", f"ppl:{t['ppl']},{t['mc']}",
                                         "--limit", str(self.s["eval_limit"]), "--out", str(out), "--progress", "false",
                                         "--ppl-window", str(self.s["seq_len"])],
                                  self.timeout("eval"), device_args=self.dev())
        ok = res["rc"] == 0 and (out / "results.json").exists()
        note = ""
        if ok:
            note = _eval_summary(out / "results.json")
        self.finish(row, res, ok, note, mem)

    def st_inspect(self, name):
        out = self.work / "inspect"
        row = self.row(name)
        with GpuMemPoller(self.device == "cuda") as mem:
            r1 = self.runner.cli(name, ["inspect", "logit-lens", "--model", str(self.paths["base"]), "--prompt",
                                        "The old man carries the", "--out", str(out)], self.timeout("inspect"),
                                 device_args=self.dev())
            ok1 = r1["rc"] == 0 and (out / "logit_lens.png").exists()
            r2 = self.runner.cli(name, ["inspect", "attention", "--model", str(self.paths["base"]), "--prompt",
                                        "The old man carries the", "--layer", "1", "--out", str(out)], self.timeout("inspect"),
                                 device_args=self.dev())
        pngs = sorted(p.name for p in out.glob("*.png")) if out.exists() else []
        ok2 = r2["rc"] == 0 and any("attention" in p for p in pngs)
        res = dict(r2, seconds=r1["seconds"] + r2["seconds"], no_device=r1.get("no_device") or r2.get("no_device"),
                   timed_out=r1.get("timed_out") or r2.get("timed_out"), stderr=(r1["stderr"] if not ok1 else r2["stderr"]),
                   rc=r1["rc"] if not ok1 else r2["rc"])
        self.finish(row, res, ok1 and ok2, f"logit-lens {'ok' if ok1 else 'FAILED'}, attention {'ok' if ok2 else 'FAILED'}", mem)

    def st_generate(self, name):
        """Streamed generation: decode tokens/s from the first streamed piece to the last (the text's
        tokens counted again with the run's tokenizer); the whole process's rate is kept too."""
        row = self.row(name)
        n = self.s["gen_tokens"]
        with GpuMemPoller(self.device == "cuda") as mem:
            res = self.runner.cli(name, ["generate", "--model", str(self.paths["base"]), "--prompt", "The old man",
                                         "--max-new-tokens", str(n)], self.timeout("generate"),
                                  device_args=self.dev(), stamps=True)
        text = res["stdout"][:-1] if res["stdout"].endswith("\n") else res["stdout"]
        ok = res["rc"] == 0 and len(text) > 0  # whitespace counts: a barely trained model may write only that
        note = "" if ok or res["rc"] != 0 else "no output"
        if ok:
            # tokens: two lower bounds, the larger kept: the text re-tokenized (BPE may merge what the
            # model wrote as several tokens, e.g. runs of spaces) and the number of stdout reads (the
            # CLI writes and flushes each decoded piece; a read may hold several)
            pieces = [t for t, nb in res.get("pieces", []) if nb]
            retok = 0
            try:
                from tokenizers import Tokenizer

                ck = checkpoint_dir(self.paths["base"])
                retok = len(Tokenizer.from_file(str(ck / "tokenizer.json")).encode(text, add_special_tokens=False).ids)
            except Exception as e:  # no tokenizers here: the reads alone
                note = f"(no re-tokenization: {type(e).__name__}) "
            toks = max(retok, len(pieces) - 1 if res["stdout"].endswith("\n") else len(pieces), 1)
            row["completion_tokens_lower_bound"] = toks
            row["process_tokens_per_s"] = round(toks / res["seconds"], 2) if res["seconds"] else None
            row["first_piece_s"] = round(pieces[0], 3) if pieces else None
            span = pieces[-1] - pieces[0] if len(pieces) > 1 else 0
            if span > 0 and toks > 1:
                row["tokens_per_s"] = (toks - 1) / span
                note += (f">={toks} tokens, decode {row['tokens_per_s']:.0f} tok/s (first->last streamed piece); "
                         f"first piece at {pieces[0]:.1f}s (start-up + load + prefill)")
            else:
                row["tokens_per_s"] = row["process_tokens_per_s"]
                note += f">={toks} tokens in one piece: tokens/s over the whole process"
            row["sample"] = text[:120]
        self.finish(row, res, ok, note, mem)

    def chat_model(self) -> Path:
        return self.paths.get("sft-full") or self.paths["base"]

    def st_chat(self, name):
        row = self.row(name)
        model = self.chat_model()
        with GpuMemPoller(self.device == "cuda") as mem:
            res = self.runner.cli(name, ["chat", "--model", str(model), "--max-new-tokens", "24"],
                                  self.timeout("chat"), device_args=self.dev(),
                                  stdin="What is 12 + 7? Answer with the number only.\nRepeat after me: red ship\n")
        replies = res["stdout"].split("\n")
        ok = res["rc"] == 0 and res["stdout"].count("\n") >= 2
        row["replies"] = [r[:80] for r in replies[:2]]
        self.finish(row, res, ok, f"model {model.name}; 2 turns, replies {row['replies']!r}", mem)

    def st_serve(self, name):
        row = self.row(name)
        model = self.chat_model()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        n_clients, n_tok = self.s["serve_clients"], self.s["gen_tokens"]
        cmd = [sys.executable, "-m", "lmforge.cli.main", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--slots", str(n_clients), "--max-queue", str(4 * n_clients), "--log-level", "warning"]
        budget = self.timeout("serve")
        t0 = time.time()
        log_out = self.runner.logs / "serve.server.out"
        log_err = self.runner.logs / "serve.server.err"
        levels, err, no_device = [], None, False

        def start(with_device: bool):
            c = cmd + (self.dev() if with_device else [])
            fo, fe = open(log_out, "a"), open(log_err, "a")
            p = subprocess.Popen(c, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=self.env, cwd=str(self.work),
                                 start_new_session=True)
            fo.close(), fe.close()
            self.runner.append_log(name, f"$ {' '.join(c)}\n")
            return p

        import httpx

        with GpuMemPoller(self.device == "cuda") as mem:
            proc = start(True)
            try:
                model_id = None
                while time.time() - t0 < budget:
                    if proc.poll() is not None:
                        tail = log_err.read_text(errors="replace") if log_err.exists() else ""
                        if not no_device and "unknown option '--device'" in tail:
                            no_device = True
                            proc = start(False)
                            continue
                        err = f"server exited with {proc.returncode}"
                        break
                    try:
                        h = httpx.get(url + "/health", timeout=2, trust_env=False)
                        if h.status_code == 200:
                            model_id = httpx.get(url + "/v1/models", timeout=5, trust_env=False).json()["data"][0]["id"]
                            break
                    except (httpx.HTTPError, KeyError, IndexError, ValueError):
                        pass
                    time.sleep(0.3)
                else:
                    err = "server did not answer /health in time"
                row["startup_s"] = round(time.time() - t0, 1)
                if model_id:
                    asyncio.run(_level(url, model_id, 1, 8))  # warm-up (first CUDA kernels, allocator), not counted
                    for clients in (1, n_clients):
                        if time.time() - t0 > budget:
                            err = "out of time during the load test"
                            break
                        levels.append(asyncio.run(asyncio.wait_for(_level(url, model_id, clients, n_tok),
                                                                   timeout=max(5.0, budget - (time.time() - t0)))))
                    try:
                        row["health"] = httpx.get(url + "/health", timeout=5, trust_env=False).json()
                    except Exception:
                        pass
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
            finally:
                if proc.poll() is None:
                    _kill_group(proc, signal.SIGINT)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        _kill_group(proc)
                        proc.wait()
        secs = time.time() - t0
        server_err = log_err.read_text(errors="replace") if log_err.exists() else ""
        server_out = log_out.read_text(errors="replace") if log_out.exists() else ""
        self.runner.append_log(name, f"# seconds={secs:.1f} levels={json.dumps(levels)}\n--- server stdout\n{server_out}\n"
                                     f"--- server stderr\n{server_err}\n")
        for f in (log_out, log_err):
            f.unlink(missing_ok=True)
        row["levels"] = levels
        big = next((lv for lv in levels if lv["clients"] == n_clients), None)
        one = next((lv for lv in levels if lv["clients"] == 1), None)
        ok = err is None and big is not None and big["ok"] == n_clients and big["tokens"] >= n_clients * n_tok * 0.9
        note = f"model {model.name}"
        if big:
            row["tokens_per_s"] = big["tokens_per_s"]
            row["ttft_p50_s"] = big["ttft_p50_s"]
            note += (f"; {n_clients} clients: {big['tokens_per_s']:.1f} tok/s total, TTFT p50 {_fmt_s(big['ttft_p50_s'])}"
                     f" ({big['ok']}/{n_clients} ok, {big['tokens']} tokens"
                     f"{'' if big['tokens_from_usage'] else ', counted from chunks'})")
            if big["errors"]:
                err = err or f"request errors: {big['errors']}"
        if one:
            note += f"; 1 client: {one['tokens_per_s']:.1f} tok/s, TTFT p50 {_fmt_s(one['ttft_p50_s'])}"
        if row.get("health"):
            note += f"; mean decode batch {row['health'].get('mean_batch')}"
        res = {"rc": 0 if err is None else 1, "seconds": secs, "stderr": (err or "") + "\n" + server_err,
               "stdout": server_out, "no_device": no_device, "timed_out": False}
        self.finish(row, res, ok, note, mem)
        if not ok:
            row["error"] = ([err] if err else []) + _tail(server_err, 2)

    def st_merge(self, name):
        out = self.work / "merged"
        row = self.row(name)
        res = self.runner.cli(name, ["merge", "--model", str(self.paths["sft-lora"]), "--out", str(out)],
                              self.timeout("merge"), device_args=self.dev())
        ok = res["rc"] == 0 and has_model_files(out)
        self.finish(row, res, ok, "LoRA adapter of sft-lora folded into the base")

    def st_convert(self, name):
        out = self.work / "converted"
        row = self.row(name)
        res = self.runner.cli(name, ["convert", "--model", str(self.paths["base"]), "--to", "hf", "--out", str(out)],
                              self.timeout("convert"), device_args=self.dev())
        ok = res["rc"] == 0 and has_model_files(out)
        note = "base run -> HF folder"
        if ok:  # the promise of --to hf: transformers loads it
            code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
                    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                    "x = torch.tensor([[1, 2, 3, 4]]); print('logits', tuple(m(x).logits.shape))")
            t0 = time.time()
            try:
                p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=self.env,
                                   timeout=max(5.0, self.runner.timeout_for(60)))
                good = p.returncode == 0
                self.runner.append_log(name, f"$ transformers load check rc={p.returncode}\n{p.stdout}\n{p.stderr}\n")
                note += "; transformers loads it" if good else f"; transformers load FAILED: {(_tail(p.stderr, 1) or ['?'])[0]}"
                row["transformers_load"] = good
            except subprocess.TimeoutExpired:
                note += "; transformers load check timed out"
            row["seconds"] = round((row["seconds"] or 0) + time.time() - t0, 1)
        self.finish(row, res, ok, note)

    # the whole run
    def machine(self) -> dict:
        code = ("import json, torch, platform; d = {'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),"
                " 'cuda': torch.version.cuda}\n"
                "if torch.cuda.is_available():\n"
                "    p = torch.cuda.get_device_properties(0); d.update(device_name=p.name, device_mem_gb=round(p.total_memory / 2**30, 1),"
                " device_count=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())\n"
                "print(json.dumps(d))")
        info: dict = {}
        try:
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=self.env)
            info = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"torch_error": _tail(p.stderr, 1)}
        except Exception as e:
            info = {"torch_error": f"{type(e).__name__}: {e}"}
        if self.device == "cpu":
            info["device_name"] = platform.processor() or platform.machine()
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=10).stdout.strip() if commit else ""
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", ""
        info.update(git_commit=(commit + (" (with uncommitted changes)" if dirty else "")) or "unknown (no git)",
                    python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                    hostname=socket.gethostname())
        return info

    def run(self) -> dict:
        print(f"gpu_check: device {self.device}{' (small)' if self.args.small else ''}, work dir {self.work}"
              + (f", budget {self.deadline - self.t_start:.0f}s" if self.deadline else ""), flush=True)
        machine = self.machine()
        machine["load_avg_start"] = list(os.getloadavg())
        print(f"machine: {json.dumps(machine)}", flush=True)
        if self.device == "cuda" and not machine.get("cuda_available"):
            self.row("setup", note="torch.cuda.is_available() is False", error=[str(machine.get("torch_error", ""))])
        else:
            self.paths["task"] = write_task_data(self.work, self.s)
            # run order: what everything else needs first, then the cheap stages, the long ones last
            # (if the budget runs out, the last ones are skipped); the table keeps STAGES' order
            self.stage("tokenizer", self.st_tokenizer)
            self.stage("prepare", self.st_prepare, needs=("tokenizer",))
            self.stage("pretrain", self.st_pretrain, needs=("prepared",))
            self.stage("sft-full", self.st_sft, needs=("base",))
            self.stage("sft-lora", self.st_sft, needs=("base",))
            self.stage("generate", self.st_generate, needs=("base",))
            self.stage("chat", self.st_chat, needs=("base",))
            self.stage("serve", self.st_serve, needs=("base",))
            self.stage("merge", self.st_merge, needs=("base", "sft-lora"))
            self.stage("convert", self.st_convert, needs=("base",))
            self.stage("eval", self.st_eval, needs=("base",))
            self.stage("inspect", self.st_inspect, needs=("base",))
            self.stage("sft-qlora", self.st_sft, needs=("base",))
            self.stage("rm", self.st_rm, needs=("base",))
            self.stage("dpo", self.st_dpo, needs=("base",))
            self.stage("rl", self.st_rl, needs=("base",))
            order = {n: i for i, n in enumerate(["setup", *STAGES])}
            self.rows.sort(key=lambda r: order.get(r["stage"], len(order)))
        total = time.time() - self.t_start
        machine["load_avg_end"] = list(os.getloadavg())
        result = {
            "benchmark": "gpu_check",
            "device": self.device,
            "small": bool(self.args.small),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t_start)),
            "total_seconds": round(total, 1),
            "budget_seconds": round(self.deadline - self.t_start) if self.deadline else None,
            "peak_flops": PEAK_FLOPS.get(self.device),
            "mfu_basis": "median tokens/s x 6 x base params / peak_flops, for every training stage (LoRA, QLoRA, "
                         "RM, DPO and RL counted the same way, so an upper estimate for them)",
            "base_params": self.params,
            "sizes": {k: v for k, v in self.s.items() if k != "timeouts"},
            "stage_timeouts": self.s["timeouts"],
            "machine": machine,
            "works": sum(1 for r in self.rows if r["works"]),
            "stages": len(self.rows),
            "rows": self.rows,
        }
        return result


def _fmt_s(x) -> str:
    return "-" if x is None else f"{x:.2f}s"


def _eval_summary(path: Path) -> str:
    """"task metric value" of each task's primary metric in an eval results.json."""
    try:
        data = json.loads(path.read_text())
        parts = []
        for t in data.get("tasks", []):
            m = t.get("primary")
            v = (t.get("metrics", {}).get(m) or {}).get("value")
            if isinstance(v, (int, float)):
                parts.append(f"{t.get('task')} {m} {v:.3f} (n={t.get('n')})")
        return "; ".join(parts)
    except (OSError, ValueError, AttributeError):
        return ""


# -- output ---------------------------------------------------------------------------------------
def fmt_table(result: dict) -> str:
    head = ["stage", "works", "seconds", "tokens/s", "MFU", "peak mem", "note"]
    rows = []
    for r in result["rows"]:
        works = "yes" if r["works"] else ("skip" if r.get("skipped") else "NO")
        tps = r.get("tokens_per_s")
        mfu = r.get("mfu")
        mem = r.get("peak_mem_gb")
        note = r.get("note") or ""
        if not r["works"] and r.get("error"):
            note = (note + " | " if note else "") + " / ".join(r["error"])[-300:]
        rows.append([r["stage"], works, "-" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                     "-" if not tps else (f"{tps:,.0f}" if tps >= 100 else f"{tps:.1f}"),
                     "-" if mfu is None else f"{mfu:.1%}", "-" if mem is None else f"{mem:.2f} GB", note])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(6)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head[:6], widths)) + " | note",
             "-+-".join("-" * w for w in widths) + "-+-----"]
    for r in rows:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + " | " + r[6])
    m = result.get("machine", {})
    lines.append("")
    lines.append(f"{result['works']}/{result['stages']} stages work on {result['device']} "
                 f"({m.get('device_name', '?')}, torch {m.get('torch', '?')}) in {result['total_seconds']:.0f}s; "
                 f"load avg {m.get('load_avg_start', ['?'])[0]:.2f} -> {m.get('load_avg_end', ['?'])[0]:.2f}; "
                 f"commit {m.get('git_commit', '?')[:12]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (the CPU sizes) on any device")
    ap.add_argument("--out-dir", default=None, help="writes gpu_check.json (+ logs/ of failed stages) here")
    ap.add_argument("--stage-timeout", type=float, default=None, help="one timeout (s) for every stage instead of the per-stage ones")
    ap.add_argument("--budget", type=float, default=None, help="total seconds for all stages (default 340 on cuda, none on cpu); 0 = none")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of: {','.join(STAGES)} (their inputs must be made too)")
    ap.add_argument("--work-dir", default=None, help="keep the work folder here (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temp work folder")
    ap.add_argument("--table-from", default=None, help="print the table of a saved gpu_check.json and exit")
    args = ap.parse_args(argv)
    if args.table_from:
        print(fmt_table(json.loads(Path(args.table_from).read_text())))
        return 0
    if args.device == "cpu":
        args.small = True
    if args.stages:
        unknown = sorted(set(args.stages.split(",")) - set(STAGES))
        if unknown:
            ap.error(f"unknown stage(s) {', '.join(unknown)}; choose from {','.join(STAGES)}")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        json_path = out_dir / "gpu_check.json"
        log_dir = out_dir / "logs"
    else:
        out_dir = ROOT / "benchmarks" / "results"
        json_path = out_dir / f"gpu_check_{args.device}.json"
        log_dir = out_dir / f"gpu_check_logs_{args.device}"
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    try:
        result = check.run()
    finally:
        pass
    # failed stages: keep their logs
    failed = [r["stage"] for r in result["rows"] if not r["works"] and not r.get("skipped")]
    copied = []
    for st in failed:
        src = check.runner.logs / f"{st}.log"
        if src.exists():
            log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, log_dir / f"{st}.log")
            copied.append(str(log_dir / f"{st}.log"))
    result["failed_logs"] = copied
    result["work_dir"] = str(check.work) if (args.work_dir or args.keep) else None
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(fmt_table(result))
    print(f"\nwrote {json_path}" + (f"; logs of failed stages in {log_dir}" if copied else ""))
    if not (args.work_dir or args.keep):
        shutil.rmtree(check.work, ignore_errors=True)
    return 0 if result["works"] == result["stages"] else 1


if __name__ == "__main__":
    sys.exit(main())
