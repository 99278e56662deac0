"""Code tasks: the unbiased pass@k estimator against brute force, and HumanEval-format problems
run in the tools sandbox."""
from __future__ import annotations

import itertools
import json
from math import comb

import pytest

from lmforge.eval.code import pass_at_k, program_for, score_code


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Every k-subset of n samples (c of them passing), counted."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(200, 0, 10) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


PROBLEMS = [
    {"id": "p/add", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
    {"id": "p/loop", "prompt": "def spin():\n", "entry_point": "spin", "test": "def check(f):\n    f()\n"},
]


def _sandbox_or_skip():
    from lmforge.tools.sandbox import sandbox_available

    ok, why = sandbox_available()
    if not ok:
        pytest.skip(f"sandbox unavailable here: {why}")


def test_score_code_in_the_sandbox():
    _sandbox_or_skip()
    completions = [["    return a + b\n", "    return a - b\n", "    return a + b\n"],
                   ["    while True:\n        pass\n"] * 3]
    metrics, per = score_code(PROBLEMS, completions, ks=[1, 2], timeout_s=2.0)
    assert per[0]["passed"] == 2 and per[1]["passed"] == 0
    assert per[1]["samples"][0]["result"] in ("timed out", "cpu time limit")
    assert metrics["pass@1"][0] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["pass@2"][0] == pytest.approx((1 - comb(1, 2) / comb(3, 2)) / 2)
    assert "AssertionError" in per[0]["samples"][1]["error"]
    assert program_for("P", "C", "T", "f").endswith("check(f)\n")


def test_humaneval_task_through_the_eval_loop(tmp_path):
    """A backend that answers with the canonical solutions scores pass@1 = 1 (and 0 when wrong)."""
    _sandbox_or_skip()
    from lmforge.eval.runner import EvalSettings, evaluate

    rows = [{"task_id": p["id"], "prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"],
             "canonical_solution": "    return a + b\n"} for p in PROBLEMS[:1]]
    rows.append({"task_id": "p/mul", "prompt": "def mul(a, b):\n", "entry_point": "mul",
                 "test": "def check(f):\n    assert f(3, 4) == 12\n", "canonical_solution": "    return a * b\n"})
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    answers = {r["prompt"]: r["canonical_solution"] for r in rows}

    class Canned:
        kind = "canned"

        def __init__(self, right=True):
            self.right = right

        def generate(self, prompts, max_tokens, stop=None, chat=False, temperature=0.0, seed=None, progress=None):
            assert "\ndef " in stop and max_tokens == 384
            return [answers[p] if self.right else "    return None\n" for p in prompts]

    run, samples = evaluate(settings=EvalSettings(tasks=str(path)), backend=Canned(), model_id="canned", progress=False)
    assert run["results"][0]["metric"] == "pass@1" and run["results"][0]["value"] == 1.0
    run, _ = evaluate(settings=EvalSettings(tasks=str(path)), backend=Canned(False), model_id="canned", progress=False)
    assert run["results"][0]["value"] == 0.0
