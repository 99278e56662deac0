"""Tokens/s of `lmforge data prepare` against plain `tokenizers.Tokenizer.encode_batch` on the same text.

    python benchmarks/data_prepare_speed.py [--data DIR] [--tokenizer PATH] [--mb 12] [--repeats 3]

Without --data it writes >= `--mb` MB of English (the docstrings of the installed Python packages,
one document per module) to a temporary folder; without --tokenizer it trains a 32k byte-level
BPE on that text. Then, alternating, `--repeats` times each:

  (a) `lmforge data prepare` end to end through its Python entry point (lmforge.cli.main.main):
      tokenizer loading, reading, tokenizing, the split, shards and manifest;
  (b) the reference: one `Tokenizer.encode_batch` call over the same documents, already in
      memory (tokenization only).

Tokens count the EOS after every document in both. Each trial is listed with the 1-minute load
average when it started (on a busy machine both numbers move with it); the summary takes the
best trial of each. The issue's bar: (a)/(b) >= 0.8. Writes benchmarks/results/data_prepare_speed.json.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).parent / "results" / "data_prepare_speed.json"
TARGET = 0.8
DOCSTRING = re.compile(r'"""(.*?)"""', re.S)  # triple-quoted strings: docstrings, mostly (an AST walk is 20x slower)


def write_corpus(out: Path, min_bytes: int) -> None:
    """One .txt document per installed module: its docstrings, in sorted path order."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    stdlib, purelib = (Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib"))
    # the standard library, then this environment's packages: not the base interpreter's (one holds a 4 MB JSON string)
    stdlib_files = [p for p in sorted(stdlib.rglob("*.py")) if not p.is_relative_to(stdlib / "site-packages")]
    for src in stdlib_files + sorted(purelib.rglob("*.py")):
        try:
            text = "\n\n".join(inspect.cleandoc(d) for d in DOCSTRING.findall(src.read_text("utf-8")) if d.strip())
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        (out / f"{total:012d}.txt").write_text(text + "\n")  # names sort in writing order
        total += len(text.encode("utf-8")) + 1
        if total >= min_bytes:
            return
    raise SystemExit(f"only {total / 1e6:.1f} MB of docstrings found; pass --data")


def time_prepare(data: Path, tokenizer: Path, out: Path) -> tuple[float, int]:
    """(seconds, tokens) of `lmforge data prepare` in this process; its progress bar is hidden."""
    from lmforge.cli.main import main

    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["data", "prepare", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out)])
    dt = time.perf_counter() - t
    if code:
        raise SystemExit(f"lmforge data prepare failed: {err.getvalue().strip().splitlines()[-1]}")
    m = json.loads((out / "manifest.json").read_text())
    return dt, m["train"]["tokens"] + m["val"]["tokens"]


def time_encode_batch(backend, texts: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    enc = backend.encode_batch(texts, add_special_tokens=False)
    dt = time.perf_counter() - t
    return dt, sum(len(e.ids) for e in enc) + len(texts)


def trial(name: str, fn) -> dict:
    load = os.getloadavg()[0]
    seconds, tokens = fn()
    row = {"what": name, "seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds), "load1": round(load, 2)}
    print(f"  {name:<14} {seconds:7.2f} s  {row['tokens_per_s']:>10,} tok/s  load {load:.2f}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a folder or file of documents (default: generated docstrings)")
    ap.add_argument("--tokenizer", help="tokenizer.json or a folder with one (default: a 32k BPE trained on the data)")
    ap.add_argument("--mb", type=float, default=12, help="MB of text to generate without --data")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()

    from lmforge.provenance import run_metadata

    meta = run_metadata()  # before tokenizers starts threads: git runs in a child process
    from tokenizers import Tokenizer

    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer_train import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data).expanduser() if args.data else tmp / "corpus"
        if not args.data:
            t = time.perf_counter()
            write_corpus(data, int(args.mb * 1e6))
            print(f"wrote {data} in {time.perf_counter() - t:.0f} s")
        texts = [d.text for d in iter_documents([data])]
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"{len(texts):,} documents, {nbytes / 1e6:.1f} MB, largest {max(map(len, texts)) / 1e3:.0f} k characters")
        tok_path = Path(args.tokenizer).expanduser() if args.tokenizer else tmp / "tok"
        if not args.tokenizer:
            t = time.perf_counter()
            train_bpe(texts, vocab_size=args.vocab_size).save(tok_path)
            print(f"trained a {args.vocab_size} BPE in {time.perf_counter() - t:.0f} s")
        tj = tok_path if tok_path.suffix == ".json" else tok_path / "tokenizer.json"
        backend = Tokenizer.from_file(str(tj))

        rows = []
        for _ in range(args.repeats):  # alternating, so a change in load hits both alike
            rows.append(trial("encode_batch", lambda: time_encode_batch(backend, texts)))
            rows.append(trial("data prepare", lambda: time_prepare(data, tok_path, tmp / "out")))

    best = {w: max((r for r in rows if r["what"] == w), key=lambda r: r["tokens_per_s"]) for w in ("data prepare", "encode_batch")}
    ratio = best["data prepare"]["tokens_per_s"] / best["encode_batch"]["tokens_per_s"]
    print(f"\n{'':<14} {'tokens/s':>10}  {'load1':>5}\n" + "\n".join(
        f"{w:<14} {r['tokens_per_s']:>10,}  {r['load1']:>5.2f}" for w, r in best.items()))
    print(f"ratio prepare / encode_batch: {ratio:.2f} (target >= {TARGET})")
    result = {
        **meta,
        "data": str(args.data or f"generated: docstrings of installed Python modules, >= {args.mb} MB"),
        "tokenizer": str(args.tokenizer or f"byte-level BPE, vocab {args.vocab_size}, trained on the data"),
        "documents": len(texts),
        "bytes": nbytes,
        "cpus_visible": os.cpu_count(),
        "tokens_per_s": {w: r["tokens_per_s"] for w, r in best.items()},
        "load1": {w: r["load1"] for w, r in best.items()},
        "ratio": round(ratio, 3),
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "trials": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
