"""Load test of `lmforge serve`: N concurrent streaming clients on loopback.

For each client count (default 1, 8, 32) every client sends `--rounds` streaming chat requests
one after another (each exactly `--max-tokens` tokens: `ignore_eos`), and we measure total
completion tokens/s over the wall time, time to first token (p50/p99) and errors. The 1-client
figure is the reference: the batching gain is tokens/s(N) / tokens/s(1), both measured in this
run on the same server. The server runs as its own process (`lmforge serve`) so the clients do
not share its interpreter; everything stays on 127.0.0.1.

    python benchmarks/serve_load.py                       # default model, fp32
    python benchmarks/serve_load.py --clients 1,8 --max-tokens 32 --threads 1
    python benchmarks/serve_load.py --url http://127.0.0.1:8000   # an already running server
    python benchmarks/serve_load.py --llama-server /path/to/llama-server   # + llama.cpp's server, same run

With `--llama-server`, llama.cpp's server then runs the same levels on the same GGUF (the
default model's file unless --model names another), with `-np` = the largest client count,
`-t` = --threads and the same context per slot, and the table gives lmforge / llama-server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
from lmforge.provenance import git_commit
TOPICS = ["the sea", "a library", "mountains", "a robot", "autumn", "a city at night", "bread", "a river", "the moon",
          "a garden", "trains", "music", "a storm", "winter", "a market", "the desert"]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(c: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, key: str | None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", "ttft": None, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = ev["error"]["message"]
                    break
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                elif ttft is None and ev["choices"] and ev["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "ttft": ttft, "tokens": tokens, "latency": time.perf_counter() - t0}


async def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int, key: str | None) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as c:
        before = (await c.get(url + "/health")).json()

        async def client(k):
            return [await one_request(c, url, model, k * rounds + r, max_tokens, key) for r in range(rounds)]

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(client(k) for k in range(clients))) for x in xs]
        wall = time.perf_counter() - t0
        after = (await c.get(url + "/health")).json()
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    rows = after.get("decode_rows", 0) - before.get("decode_rows", 0)
    return {
        "clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "ttft_p99_s": round(percentile(ttfts, 0.99), 3), "errors": sum(1 for r in results if r["error"]),
        "error_examples": [r["error"] for r in results if r["error"]][:3],
        "mean_decode_batch": round(rows / steps, 2) if steps else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, slots: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--slots", str(slots), "--ctx", str(args.ctx), "--dtype", args.dtype, "--threads", str(args.threads),
           "--log_level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), port)


def start_llama_server(args, slots: int) -> tuple[subprocess.Popen, str]:
    from lmforge.loading.resolve import resolve_model_path

    port = free_port()
    cmd = [args.llama_server, "-m", str(resolve_model_path(args.model)), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(args.ctx * slots), "-t", str(args.threads or os.cpu_count()), "--log-disable"]
    lib = str(Path(args.llama_server).resolve().parent)  # its shared libraries lie beside it in a build folder
    env = {**os.environ, "LD_LIBRARY_PATH": lib + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")}
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env), port)


def wait_ready(proc: subprocess.Popen, port: int) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 300 s")




def measure(args, levels: list[int], start, model: str | None = None) -> tuple[dict, list[dict]]:
    """Start a server (`start()` -> (process or None, url)), warm it up, run every level."""
    proc, url = start()
    try:
        info = httpx.get(url + "/health", timeout=10).json()
        model = model or info["model"]
        info["model"] = model
        # warm-up: first-call costs (allocation, lazy init) are not part of any level
        asyncio.run(run_level(url, model, 1, 1, 4, args.api_key))
        rows = []
        for n in levels:
            rows.append(asyncio.run(run_level(url, model, n, args.rounds, args.max_tokens, args.api_key)))
            r = rows[-1]
            print(f"{n:>3} clients: {r['tokens_per_s']:8.2f} tok/s  ttft p50 {r['ttft_p50_s']:.2f}s p99 {r['ttft_p99_s']:.2f}s  "
                  f"errors {r['errors']}  mean batch {r['mean_decode_batch']}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return info, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0 = torch's default)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary: measured after lmforge, same levels")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    load_before = os.getloadavg()
    info, rows = measure(args, levels, lambda: start_server(args, slots=max(levels)) if args.url is None else (None, args.url))
    model = info["model"]
    ref_rows = None
    if args.llama_server:
        _, ref_rows = measure(args, levels, lambda: start_llama_server(args, max(levels)), model="any-name")
    load_after = os.getloadavg()
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["gain_vs_1_client"] = round(r["tokens_per_s"] / base, 2) if base else None
    print(f"\n{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'gain':>5} {'ttft p50':>8} {'ttft p99':>8} {'errors':>6} {'batch':>5}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['completion_tokens']:>7} {r['wall_s']:>7.1f} {r['tokens_per_s']:>8.2f} "
              f"{r['gain_vs_1_client'] or 0:>5.2f} {r['ttft_p50_s']:>8.2f} {r['ttft_p99_s']:>8.2f} {r['errors']:>6} {r['mean_decode_batch'] or 0:>5}")
    result = {
        "benchmark": "serve_load",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
                    "note": "shared 2-core VM; other jobs were running (see load averages)"},
        "server": {"model": model, "dtype": args.dtype, "threads": args.threads, "slots": info.get("slots"), "ctx": info.get("ctx"),
                   "url": "in-run subprocess" if args.url is None else args.url},
        "workload": {"max_tokens": args.max_tokens, "rounds": args.rounds, "ignore_eos": True, "temperature": 0.7, "stream": True},
        "reference": "tokens/s with 1 client, same server, same run",
        "results": rows,
    }
    if ref_rows is not None:
        result["llama_server"] = {"binary": args.llama_server, "flags": f"-np {max(levels)} -c {args.ctx * max(levels)} -t {args.threads}",
                                  "results": ref_rows}
        print(f"\n{'clients':>7} {'lmforge tok/s':>13} {'llama-server':>12} {'ratio':>6} {'ttft p50':>9} {'llama ttft':>10}")
        for a, b in zip(rows, ref_rows):
            a["ratio_vs_llama_server"] = round(a["tokens_per_s"] / b["tokens_per_s"], 2) if b["tokens_per_s"] else None
            print(f"{a['clients']:>7} {a['tokens_per_s']:>13.2f} {b['tokens_per_s']:>12.2f} {a['ratio_vs_llama_server'] or 0:>6.2f} "
                  f"{a['ttft_p50_s']:>9.2f} {b['ttft_p50_s']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
