"""Checkable tasks for alignment demos and tests: arithmetic with an exact answer.

    train = arithmetic_problems(2000, seed=0, split="train")    # [{"prompt", "answer", "a", "b", "op"}]
    held  = arithmetic_problems(200, seed=1, split="heldout")    # never the same (a, b, op) as train
    pairs = arithmetic_preferences(500, seed=0)                   # {"prompt", "chosen", "rejected"}

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


def perturb(answer: int, rng: random.Random) -> int:
    """A plausible wrong answer: off by one or ten, or two digits swapped."""
    s = str(answer)
    choice = rng.random()
    if choice < 0.35 or len(s.lstrip("-")) < 2:
        wrong = answer + rng.choice([-1, 1, -2, 2])
    elif choice < 0.7:
        wrong = answer + rng.choice([-10, 10])
    else:
        digits = list(s.lstrip("-"))
        i = rng.randrange(len(digits) - 1)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
        wrong = int(("-" if answer < 0 else "") + "".join(digits))
    return wrong if wrong != answer else answer + 1


def answer_text(a: int, b: int, op: str, result: int, style: int = 0) -> str:
    styles = (f"{result}", f"{a} {op} {b} = {result}", f"The answer is {result}.")
    return styles[style % len(styles)]


def arithmetic_preferences(n: int, seed: int = 0, digits: int = 2, ops: str = "+", split: str = "train",
                           digits_b: int = 0) -> list[dict]:
    """Preference pairs: the correct answer is chosen, a perturbed one rejected (same wording)."""
    rng = random.Random(f"pref:{seed}:{split}")
    out = []
    for p in arithmetic_problems(n, seed, digits, ops, split, digits_b=digits_b):
        right = int(p["answer"])
        wrong = perturb(right, rng)
        style = rng.randrange(3)
        out.append({"prompt": p["prompt"], "chosen": answer_text(p["a"], p["b"], p["op"], right, style),
                    "rejected": answer_text(p["a"], p["b"], p["op"], wrong, style)})
    return out


def sft_records(problems: list[dict], style: int = 0) -> list[dict]:
    """Chat SFT records answering each problem correctly."""
    return [{"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": answer_text(p["a"], p["b"], p["op"], int(p["answer"]), style)}]}
            for p in problems]
