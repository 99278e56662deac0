"""Teaching tool use: generated conversations with checkable answers, for SFT and for eval.

    problems = arithmetic_problems(500, seed=1)              # [ArithmeticProblem]
    records = [calculator_record(p) for p in problems]       # {"messages": [...], "tools": [...]}
    write_jsonl(records, "train.jsonl")                      # lmforge sft --data train.jsonl

A calculator conversation is OpenAI chat format, the same shape `LM.chat_with_tools` produces:

    user       "What is 48213 * 9127?"  (many phrasings: "times", "the product of", "minus" ...)
    assistant  tool_calls: calculator {"expression": "48213*9127"}
    tool       "440040051"                (computed by lmforge's own calculator, never by hand)
    assistant  "48213 * 9127 = 440040051."

Every record carries `tools` (the calculator's schema), so the SFT renderer puts exactly the
system prompt that `chat_with_tools` renders at inference (`render_tools_system_prompt`) in
front of it: training and inference prompts are identical, token for token.

Fact look-up conversations (second priority) use the `search` tool over a tiny generated corpus
of made-up facts (so the model cannot know them): `fact_corpus(seed)` writes the files,
`fact_record` gives user question -> search call -> real search result -> answer.

Problems are drawn from a seeded `random.Random`, so train and held-out sets come from disjoint
seeds; `problem_key` lets a caller drop any held-out problem that a train seed also drew.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

OPS = ("+", "-", "*")
# (template, ops it fits). {a} and {b} are the operands as digits.
PHRASINGS: list[tuple[str, str]] = [
    ("What is {a} {op} {b}?", "+-*"),
    ("what is {a} {op} {b}?", "+-*"),
    ("What's {a} {op} {b}?", "+-*"),
    ("Compute {a} {op} {b}.", "+-*"),
    ("Calculate {a} {op} {b}.", "+-*"),
    ("{a} {op} {b} = ?", "+-*"),
    ("{a} {op} {b}", "+-*"),
    ("How much is {a} {op} {b}?", "+-*"),
    ("Please work out {a} {op} {b}.", "+-*"),
    ("What is {a} times {b}?", "*"),
    ("What is {a} multiplied by {b}?", "*"),
    ("What is the product of {a} and {b}?", "*"),
    ("Multiply {a} by {b}.", "*"),
    ("What is {a} x {b}?", "*"),
    ("What is {a} plus {b}?", "+"),
    ("What is the sum of {a} and {b}?", "+"),
    ("Add {a} and {b}.", "+"),
    ("What do you get if you add {b} to {a}?", "+"),
    ("What is {a} minus {b}?", "-"),
    ("Subtract {b} from {a}.", "-"),
    ("What is {b} subtracted from {a}?", "-"),
    ("What is {a} take away {b}?", "-"),
]
ANSWERS = [
    "{a} {op} {b} = {r}.",
    "{a} {op} {b} = {r}",
    "The answer is {r}.",
    "{r}",
    "It is {r}.",
]


@dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    op: str
    b: int
    question: str
    answer_template: str

    @property
    def expression(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]


def problem_key(p: ArithmeticProblem) -> tuple[int, str, int]:
    return (p.a, p.op, p.b)


def _operand(rng: random.Random, lo_digits: int = 3, hi_digits: int = 5) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def arithmetic_problems(n: int, seed: int, ops: str = "+-*", min_digits: int = 3, max_digits: int = 5) -> list[ArithmeticProblem]:
    """`n` problems with `min_digits`..`max_digits`-digit operands, seeded, varied phrasings."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(ops)
        a, b = _operand(rng, min_digits, max_digits), _operand(rng, min_digits, max_digits)
        fits = [t for t, o in PHRASINGS if op in o]
        out.append(ArithmeticProblem(a, op, b, rng.choice(fits).format(a=a, b=b, op=op), rng.choice(ANSWERS)))
    return out


def calculator_schemas() -> list[dict]:
    """The calculator's OpenAI tool schema, exactly as `chat_with_tools(tools="calculator")` lists it."""
    from lmforge.tools import get_tools

    return [t.schema() for t in get_tools("calculator")]


def calculator_record(p: ArithmeticProblem, call_id: str = "call_0") -> dict:
    """One SFT record: question, calculator call, the calculator's real result, the answer."""
    from lmforge.tools.calculator import calculate

    result = calculate(p.expression)
    if result != str(p.result):  # the tool and the problem must agree, or the data teaches lies
        raise AssertionError(f"calculator gave {result} for {p.expression}, expected {p.result}")
    call = {"id": call_id, "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": p.expression})}}
    answer = p.answer_template.format(a=p.a, b=p.b, op=p.op, r=result)
    return {
        "messages": [
            {"role": "user", "content": p.question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer},
        ],
        "tools": calculator_schemas(),
    }


# -- checking answers ---------------------------------------------------------------------------
_INT = re.compile(r"-?\d[\d,]*")


def integers_in(text: str) -> list[int]:
    """Integers written in `text`; thousands separators (440,040,051) are accepted."""
    out = []
    for m in _INT.finditer(text or ""):
        s = m.group(0).rstrip(",")
        if "," in s and not re.fullmatch(r"-?\d{1,3}(,\d{3})+", s):
            out += [int(x) for x in s.split(",") if x.strip("-")]  # "12,34" is two numbers, not 1234
            continue
        out.append(int(s.replace(",", "")))
    return out


def answer_is_correct(text: str, expected: int) -> bool:
    """The exact integer appears in the reply (as a whole number, not inside a longer one)."""
    return expected in integers_in(text)


# -- fact look-up with the search tool (second priority) ----------------------------------------
_SYLL = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "dun", "bri", "zo", "pel", "mar", "qui", "fen", "gal", "thu"]
FACT_KINDS = [
    ("capital", "The capital of {x} is {y}.", "What is the capital of {x}?"),
    ("river", "The longest river in {x} is the {y}.", "What is the longest river in {x}?"),
    ("founder", "{x} was founded by {y}.", "Who founded {x}?"),
]


@dataclass(frozen=True)
class Fact:
    kind: str
    subject: str
    value: str
    sentence: str
    question: str


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 3))).capitalize()


def make_facts(n: int, seed: int) -> list[Fact]:
    """`n` made-up facts about made-up places (unique subjects per kind)."""
    rng = random.Random(seed)
    facts, seen = [], set()
    while len(facts) < n:
        kind, sent, q = rng.choice(FACT_KINDS)
        x, y = _name(rng), _name(rng)
        if (kind, x) in seen:
            continue
        seen.add((kind, x))
        facts.append(Fact(kind, x, y, sent.format(x=x, y=y), q.format(x=x)))
    return facts


def write_fact_corpus(facts: list[Fact], folder: str | Path, per_file: int = 10) -> Path:
    """The facts as small text files (one fact per line) for `lmforge.tools.search.build_index`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(facts), per_file):
        (folder / f"facts_{i // per_file:03d}.txt").write_text("\n".join(f.sentence for f in facts[i:i + per_file]) + "\n")
    return folder


def search_schemas(index: str | Path) -> list[dict]:
    from lmforge.tools import get_tools

    return [t.schema() for t in get_tools("search", index=str(index))]


def fact_record(f: Fact, index: str | Path, call_id: str = "call_0") -> dict:
    """Question -> search call -> the real search result over `index` -> answer naming the value."""
    from lmforge.tools import get_tools
    from lmforge.tools.protocol import execute_tool_call

    tools = get_tools("search", index=str(index))
    query = f.question.rstrip("?").replace("What is the ", "").replace("Who founded ", "founder ")
    call = {"id": call_id, "type": "function", "function": {"name": "search", "arguments": json.dumps({"query": query, "k": 2})}}
    result = execute_tool_call(call, tools)["content"]
    answer = f.sentence if f.value in result else "I could not find that in your documents."
    return {
        "messages": [
            {"role": "user", "content": f.question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer},
        ],
        "tools": [t.schema() for t in tools],
    }


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
