"""Code tasks (HumanEval format): run each completion's tests in the tools sandbox; pass@k.

A program is `prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`, run by
`lmforge.tools.sandbox.run_python` (fresh namespaces, rlimits, seccomp, no network) with a
timeout; it passes when it exits 0 within the limits.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c pass,
pass@k = 1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from lmforge.errors import LmforgeError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n passes."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (got {n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program_for(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_tests(programs: list[str], timeout_s: float = 10.0, workers: int = 2,
              progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run programs in the sandbox, a few at a time; one dict per program (passed, why)."""
    from lmforge.tools.sandbox import run_python

    def one(code: str) -> dict:
        r = run_python(code, timeout_s=timeout_s, memory_mb=512)
        why = "passed" if r.ok else ("timed out" if r.timed_out else (r.killed_reason or f"exit {r.exit_code}"))
        tail = (r.stderr or "").strip().splitlines()[-1:] if not r.ok else []
        return {"passed": bool(r.ok), "result": why, "error": tail[0][:300] if tail else ""}

    out: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in pool.map(one, programs):
            out.append(res)
            if progress is not None:
                progress(1)
    return out


def score_code(problems: list[dict], completions: list[list[str]], ks: list[int], timeout_s: float = 10.0,
               workers: int = 2, progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """problems: dicts with prompt, test, entry_point (and id); completions[i]: n samples for
    problem i. Returns ({"pass@k": mean, ...}, per-problem records)."""
    if len(problems) != len(completions):
        raise LmforgeError("one list of completions per problem is required")
    programs, owner = [], []
    for i, (p, comps) in enumerate(zip(problems, completions)):
        for c in comps:
            programs.append(program_for(p["prompt"], c, p["test"], p["entry_point"]))
            owner.append(i)
    results = run_tests(programs, timeout_s=timeout_s, workers=workers, progress=progress)
    per = [{"id": p.get("id", str(i)), "n": len(completions[i]), "passed": 0, "samples": []} for i, p in enumerate(problems)]
    for i, comp_res in zip(owner, results):
        per[i]["passed"] += comp_res["passed"]
        per[i]["samples"].append(comp_res)
    metrics = {}
    for k in ks:
        vals = [pass_at_k(r["n"], r["passed"], k) for r in per]
        metrics[f"pass@{k}"] = (float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0)
    for i, r in enumerate(per):
        for j, c in enumerate(completions[i]):
            r["samples"][j]["completion"] = c
    return metrics, per
