"""Checkable tasks for alignment demos and tests: arithmetic with an exact answer.

    train = arithmetic_problems(2000, seed=0, split="train")    # [{"prompt", "answer", "a", "b", "op"}]
    held  = arithmetic_problems(200, seed=1, split="heldout")    # never the same (a, b, op) as train
    pairs = arithmetic_preferences(500, seed=0)                   # {"prompt", "chosen", "rejected", "meta"}

The split is by a hash of the problem, so train and held-out problems never overlap whatever the
seeds and sizes. `extract_answer` reads the number a reply ends with, the way the `exact` reward,
self-consistency voting and the benchmarks all read it.
"""
from __future__ import annotations

import hashlib
import random
import re

from lmforge.errors import LmforgeError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TEMPLATE = "What is {a} {op} {b}? Answer with the number only."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _is_heldout(a: int, b: int, op: str, heldout_share: float) -> bool:
    h = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return h[0] / 256.0 < heldout_share


def _range(digits: int) -> tuple[int, int]:
    return (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits - 1


def arithmetic_problems(n: int, seed: int = 0, digits: int = 2, ops: str = "+", split: str = "train",
                        heldout_share: float = 0.2, template: str = TEMPLATE, digits_b: int = 0) -> list[dict]:
    """`n` problems, the first operand of `digits` digits, the second of `digits_b` (default the
    same; no leading zeros); split "train" | "heldout" | "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    digits_b = digits_b or digits
    rng = random.Random(f"{seed}:{split}:{digits}:{ops}" + (f":{digits_b}" if digits_b != digits else ""))
    lo, hi = _range(digits)
    lo_b, hi_b = _range(digits_b)
    space = (hi - lo + 1) * (hi_b - lo_b + 1) * len(ops)
    if split != "all" and space <= 200_000:
        # a small space: say at once when the split has fewer problems than asked (not loop forever)
        have = sum(_is_heldout(a, b, op, heldout_share) == (split == "heldout")
                   for a in range(lo, hi + 1) for b in range(lo_b, hi_b + 1) for op in ops)
        if n > have:
            raise LmforgeError(f"the {split} split has only {have} distinct problems with {digits}- and {digits_b}-digit "
                               f"operands; asked for {n} (use per_problem > 1 for more pairs, or more digits)")
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000 and len(seen) >= space * 0.5:
            raise LmforgeError(f"cannot draw {n} distinct {split} problems with {digits}-digit operands (use fewer or more digits)")
        a, b, op = rng.randint(lo, hi), rng.randint(lo_b, hi_b), rng.choice(ops)
        if (a, b, op) in seen:
            continue
        if split != "all" and _is_heldout(a, b, op, heldout_share) != (split == "heldout"):
            continue
        seen.add((a, b, op))
        out.append({"prompt": template.format(a=a, b=b, op=op), "answer": str(OPS[op](a, b)), "a": a, "b": b, "op": op})
    return out


def extract_answer(text: str) -> str | None:
    """The last number in `text` (commas dropped), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    s = found[-1].replace(",", "")
    if "." in s and s.rstrip("0").endswith("."):
        s = s.rstrip("0").rstrip(".")
    return s


def is_correct(text: str, answer: str) -> bool:
    got = extract_answer(text)
    return got is not None and got == str(answer)


# Wrong answers a reward model must tell from the right one. By construction "ones" and "swap"
# change the ones digit, so the ones column finds them, while "tens" and "carry" keep the ones
# digit right and need the tens column with its carry (HARD_PERTURBATIONS). Measured
# (benchmarks/results/reward_model.json) the order is the other way round for a small RM: every
# kind that moves the value by 9 or more is found ~99% of the time, "ones" (off by 1) ~61%: it
# learns the size of the sum sooner than its last digit. Report accuracy per kind.
PERTURBATIONS = ("ones", "tens", "swap", "carry")
HARD_PERTURBATIONS = ("tens", "carry")


def _digit_step(answer: int, place: int, rng: random.Random) -> int:
    """`answer` with its digit at 10**place moved up or down by one (staying a digit, no new leading zero)."""
    mag = abs(answer)
    d = (mag // 10 ** place) % 10
    leading = mag < 10 ** (place + 1)
    steps = [s for s in (-1, 1) if 0 <= d + s <= 9 and not (leading and place > 0 and d + s == 0)]
    wrong = mag + rng.choice(steps) * 10 ** place
    return -wrong if answer < 0 else wrong


def perturb(answer: int, rng: random.Random, kind: str | None = None, a: int | None = None, b: int | None = None,
            op: str = "+") -> tuple[int, str]:
    """(a plausible wrong answer, its kind) for the right `answer` of `a op b`.

    kinds: "ones" (the ones digit off by one), "tens" (the tens digit off by one, i.e. off by 10),
    "swap" (the last two digits swapped), "carry" (for +: the carry into the tens column forgotten,
    or one added where there is none). `kind` None draws one uniformly. Too-short answers or equal
    digits fall back to a kind that applies (the returned kind says which was used)."""
    kind = kind or rng.choice(PERTURBATIONS)
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r} (choose from {', '.join(PERTURBATIONS)})")
    mag = abs(answer)
    if kind == "swap":
        s = str(mag)
        if len(s) >= 2 and s[-1] != s[-2] and not (len(s) == 2 and s[-1] == "0"):
            wrong = int(s[:-2] + s[-1] + s[-2]) * (-1 if answer < 0 else 1)
            return wrong, kind
        kind = "tens"
    if kind == "carry":
        if op == "+" and a is not None and b is not None and a >= 0 and b >= 0:
            carried = (a % 10) + (b % 10) >= 10
            return answer - 10 if carried else answer + 10, kind
        kind = "tens"
    if kind == "tens" and mag < 10:
        kind = "ones"
    wrong = _digit_step(answer, 1 if kind == "tens" else 0, rng)
    return (wrong if wrong != answer else answer + 1), kind


def answer_text(a: int, b: int, op: str, result: int, style: int = 0) -> str:
    styles = (f"{result}", f"{a} {op} {b} = {result}", f"The answer is {result}.")
    return styles[style % len(styles)]


def arithmetic_preferences(n: int, seed: int = 0, digits: int = 2, ops: str = "+", split: str = "train",
                           digits_b: int = 0, kinds: str | tuple | list | None = None, per_problem: int = 1) -> list[dict]:
    """`n` preference pairs: the correct answer chosen, a perturbed one rejected (same wording).

    `kinds` (names from PERTURBATIONS, a list or comma-separated; default all) picks the wrong
    answers; `per_problem` pairs share a problem, each with another kind while kinds last (so a
    small problem space still gives thousands of pairs); each record's `meta` says its kind."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = list(kinds or PERTURBATIONS)
    for k in kinds:
        if k not in PERTURBATIONS:
            raise LmforgeError(f"unknown perturbation {k!r} (choose from {', '.join(PERTURBATIONS)})")
    if per_problem < 1:
        raise LmforgeError("per_problem must be >= 1")
    rng = random.Random(f"pref:{seed}:{split}")
    out = []
    for p in arithmetic_problems(-(-n // per_problem), seed, digits, ops, split, digits_b=digits_b):
        right = int(p["answer"])
        order = rng.sample(kinds, len(kinds))
        for j in range(min(per_problem, n - len(out))):
            wrong, kind = perturb(right, rng, order[j % len(order)], p["a"], p["b"], p["op"])
            style = rng.randrange(3)
            out.append({"prompt": p["prompt"], "chosen": answer_text(p["a"], p["b"], p["op"], right, style),
                        "rejected": answer_text(p["a"], p["b"], p["op"], wrong, style),
                        "meta": {"kind": kind, "a": p["a"], "b": p["b"], "op": p["op"], "answer": right, "wrong": wrong}})
    return out


def sft_records(problems: list[dict], style: int = 0) -> list[dict]:
    """Chat SFT records answering each problem correctly."""
    return [{"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": answer_text(p["a"], p["b"], p["op"], int(p["answer"]), style)}]}
            for p in problems]
