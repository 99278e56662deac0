"""Teaching tool use: generated conversations with checkable answers, for SFT and for eval.

    problems = arithmetic_problems(500, seed=1)              # [ArithmeticProblem]
    records = [calculator_record(p) for p in problems]       # {"messages": [...], "tools": [...]}
    write_jsonl(records, "train.jsonl")                      # lmforge sft --data train.jsonl

A calculator conversation is OpenAI chat format, the same shape `LM.chat_with_tools` produces:

    user       "What is 48213 * 9127?"  (many phrasings: "times", "the product of", "minus" ...)
    assistant  tool_calls: calculator {"expression": "48213*9127"}
    tool       "440040051"                (computed by lmforge's own calculator, never by hand)
    assistant  "48213 * 9127 = 440040051."

Every record carries `tools` (the tools' schemas), so the SFT renderer puts exactly the system
prompt that `chat_with_tools` renders at inference (`render_tools_system_prompt`) in front of it:
training and inference prompts are identical, token for token.

Document look-up conversations use the `search` tool over a generated folder of small notes
about made-up places, people and projects (names built from random syllables, random numbers:
nothing a model can know):

    docs = lookup_corpus(90, seed=1)                  # [Doc]: places/kalomira.md, people/...
    write_corpus(docs, "notes/"); build_index("notes/", "index.sqlite")
    qs = lookup_questions(docs, 120, seed=1)          # [LookupQuestion]: one fact of one file
    rec = lookup_record(q, "index.sqlite", tools=...)

    user       "Who is the mayor of Kalomira?"
    assistant  tool_calls: search {"query": "Kalomira mayor", "k": 3}
    tool       the real search result over the index: "[1] places/kalomira.md, line 1 ...: # Kalomira ..."
    assistant  "The mayor of Kalomira is Dunsel Marov (source: places/kalomira.md)."

`lookup_check` scores a reply: the fact is there, and the file that holds it is cited (and no
other file). A held-out corpus (`lookup_corpus(..., avoid=train names)`) has entities that no
training file mentions, so a model can only answer by searching.

Problems are drawn from a seeded `random.Random`, so train and held-out sets come from disjoint
seeds; `problem_key` lets a caller drop any held-out problem that a train seed also drew.
`tool_loops_batched` runs many tool conversations at once (for eval) exactly as
`run_tool_loop` runs one.
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


def calculator_record(p: ArithmeticProblem, call_id: str = "call_0", tools: list[dict] | None = None) -> dict:
    """One SFT record: question, calculator call, the calculator's real result, the answer.
    `tools`: the schemas the prompt lists (default: the calculator's alone)."""
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
        "tools": tools if tools is not None else calculator_schemas(),
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


# -- document look-up with the search tool ------------------------------------------------------
_SYLL = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "dun", "bri", "zo", "pel", "mar", "qui", "fen", "gal", "thu",
         "nor", "esk", "vi", "da", "rul", "om", "tan", "ceb", "ly", "sor", "haz", "pim", "ule", "grot"]
_JOBS = ["botanist", "carpenter", "pilot", "librarian", "glassblower", "surveyor", "beekeeper", "cartographer",
         "violin maker", "translator", "geologist", "baker", "watchmaker", "archivist", "ferry captain"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
QUESTION_PREFIXES = ["", "", "According to my notes, ", "Look in my documents: ", "Search my files: ", "In my notes, "]
CITE = "(source: {path})"
NAME_ATTRIBUTES = {"mayor", "river", "home", "lead"}  # values that are made-up names


@dataclass(frozen=True)
class Attribute:
    """One fact a document of some kind states, and how to ask for it and answer it."""

    name: str
    line: str  # the document's line, "{v}" the value
    questions: tuple[str, ...]  # "{x}" the subject
    query_word: str  # the search query is "<subject> <query_word>"
    answer: str  # "{x}" subject, "{v}" value; the citation is appended


# kind -> (folder, title lines, attributes). Every document states all attributes of its kind.
LOOKUP_KINDS: dict[str, tuple[str, str, tuple[Attribute, ...]]] = {
    "place": ("places", "# {x}\n{x} is a small town.", (
        Attribute("population", "Population: {v}.", ("What is the population of {x}?", "How many people live in {x}?"),
                  "population", "{x} has a population of {v}"),
        Attribute("founded", "Founded in {v}.", ("When was {x} founded?", "In what year was {x} founded?"),
                  "founded", "{x} was founded in {v}"),
        Attribute("mayor", "Mayor: {v}.", ("Who is the mayor of {x}?", "Who is {x}'s mayor?"), "mayor",
                  "The mayor of {x} is {v}"),
        Attribute("river", "It lies on the {v} river.", ("Which river is {x} on?", "What river flows through {x}?"),
                  "river", "{x} lies on the {v} river"),
    )),
    "person": ("people", "# {x}", (
        Attribute("job", "Occupation: {v}.", ("What does {x} do for a living?", "What is {x}'s job?"), "occupation",
                  "{x} works as a {v}"),
        Attribute("born", "Born in {v}.", ("When was {x} born?", "What year was {x} born in?"), "born",
                  "{x} was born in {v}"),
        Attribute("home", "Lives in {v}.", ("Where does {x} live?", "Which town does {x} live in?"), "lives",
                  "{x} lives in {v}"),
        Attribute("badge", "Employee number: {v}.", ("What is {x}'s employee number?", "What employee number does {x} have?"),
                  "employee number", "{x}'s employee number is {v}"),
    )),
    "project": ("projects", "# Project {x}", (
        Attribute("budget", "Budget: {v} euros.", ("What is the budget of project {x}?", "How much money does project {x} have?"),
                  "budget", "The budget of project {x} is {v} euros"),
        Attribute("lead", "Project lead: {v}.", ("Who leads project {x}?", "Who is the lead of project {x}?"), "lead",
                  "Project {x} is led by {v}"),
        Attribute("deadline", "Deadline: {v}.", ("When is the deadline of project {x}?", "What is project {x}'s deadline?"),
                  "deadline", "The deadline of project {x} is {v}"),
        Attribute("room", "Meeting room: {v}.", ("Which room does project {x} meet in?", "Where does project {x} meet?"),
                  "meeting room", "Project {x} meets in room {v}"),
    )),
}


@dataclass(frozen=True)
class Doc:
    kind: str
    subject: str
    relpath: str  # inside the corpus folder, as the search tool cites it
    facts: tuple[tuple[str, str], ...]  # (attribute name, value)

    @property
    def text(self) -> str:
        folder, title, attrs = LOOKUP_KINDS[self.kind]
        values = dict(self.facts)
        return "\n".join([title.format(x=self.subject)] + [a.line.format(v=values[a.name]) for a in attrs]) + "\n"

    def names(self) -> set[str]:
        """The made-up words of the document (its subject and the names it states), lower-cased,
        for keeping a held-out corpus apart from a training one."""
        named = [v for k, v in self.facts if k in NAME_ATTRIBUTES]
        return {w.lower() for w in re.findall(r"[A-Za-z]+", " ".join([self.subject, *named]))}


@dataclass(frozen=True)
class LookupQuestion:
    doc: Doc
    attribute: str
    value: str
    question: str
    query: str
    answer: str  # the reference reply, citation included


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(rng.randint(lo, hi))).capitalize()


def lookup_corpus(n_docs: int, seed: int, avoid: set[str] | frozenset[str] = frozenset()) -> list[Doc]:
    """`n_docs` notes (places, people, projects in turn) about made-up entities, seeded.

    Every made-up word (subject, names, rivers, towns) is new within the corpus and absent from
    `avoid` (the lower-cased words of another corpus), and every value is stated once, so each
    fact lives in exactly one file. People live in, and projects are led by, entities of the same
    corpus where there are some, so searches also return neighbouring files.
    """
    rng = random.Random(seed)
    used = {w.lower() for w in avoid}
    values_used: set[str] = set()

    def fresh_word() -> str:
        while True:
            w = _word(rng)
            if w.lower() not in used:
                used.add(w.lower())
                return w

    def fresh(make) -> str:
        while True:
            v = make()
            if v not in values_used:
                values_used.add(v)
                return v

    kinds = list(LOOKUP_KINDS)
    docs: list[Doc] = []
    places: list[str] = []
    people: list[str] = []
    for i in range(n_docs):
        kind = kinds[i % len(kinds)]
        if kind == "place":
            x = fresh_word()
            facts = {"population": fresh(lambda: str(rng.randint(1200, 980000))),
                     "founded": fresh(lambda: str(rng.randint(1100, 1950))),
                     "mayor": f"{fresh_word()} {fresh_word()}", "river": fresh_word()}
            places.append(x)
        elif kind == "person":
            x = f"{fresh_word()} {fresh_word()}"
            home = rng.choice(places) if places and rng.random() < 0.7 else fresh_word()
            facts = {"job": rng.choice(_JOBS), "born": fresh(lambda: str(rng.randint(1940, 2004))),
                     "home": home, "badge": fresh(lambda: str(rng.randint(10000, 99999)))}
            people.append(x)
        else:
            x = fresh_word()
            lead = rng.choice(people) if people and rng.random() < 0.7 else f"{fresh_word()} {fresh_word()}"
            facts = {"budget": fresh(lambda: str(rng.randint(20, 9000) * 1000)), "lead": lead,
                     "deadline": fresh(lambda: f"{rng.choice(_MONTHS)} {rng.randint(2027, 2039)}"),
                     "room": fresh(lambda: f"{rng.choice('ABCDEFGH')}{rng.randint(100, 499)}")}
        folder = LOOKUP_KINDS[kind][0]
        slug = x.lower().replace(" ", "_")
        docs.append(Doc(kind, x, f"{folder}/{slug}.md", tuple(facts.items())))
    return docs


def corpus_names(docs: list[Doc]) -> set[str]:
    return set().union(*(d.names() for d in docs)) if docs else set()


def write_corpus(docs: list[Doc], folder: str | Path) -> Path:
    """The notes as Markdown files under `folder` (for `lmforge index build --data folder`)."""
    folder = Path(folder)
    for d in docs:
        path = folder / d.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(d.text, encoding="utf-8")
    return folder


def lookup_questions(docs: list[Doc], n: int, seed: int) -> list[LookupQuestion]:
    """`n` questions, each about one fact of one document (distinct (doc, attribute) pairs while
    they last), with varied phrasings and prefixes; the reference answer cites the file."""
    rng = random.Random(seed)
    pairs = [(d, a) for d in docs for a in LOOKUP_KINDS[d.kind][2]]
    rng.shuffle(pairs)
    # one question per document first, then the rest: the set covers as many files as it can
    seen, first, rest = set(), [], []
    for d, a in pairs:
        (rest if d.relpath in seen else first).append((d, a))
        seen.add(d.relpath)
    out = []
    for d, a in (first + rest)[:n]:
        q = rng.choice(a.questions).format(x=d.subject)
        prefix = rng.choice(QUESTION_PREFIXES)
        if prefix:
            q = prefix + q[0].lower() + q[1:]
        value = dict(d.facts)[a.name]
        answer = a.answer.format(x=d.subject, v=value) + " " + CITE.format(path=d.relpath) + "."
        out.append(LookupQuestion(d, a.name, value, q, f"{d.subject} {a.query_word}", answer))
    return out


def lookup_record(q: LookupQuestion, index: str | Path, tools: list[dict] | None = None, k: int = 3,
                  call_id: str = "call_0") -> dict:
    """Question -> search call -> the real search result over `index` -> the cited answer.
    Raises when the result does not show the fact and its file (the data would teach guessing).
    `tools`: the schemas the prompt lists (default: the search tool's alone)."""
    from lmforge.tools import get_tools
    from lmforge.tools.protocol import execute_tool_call

    search_tools = get_tools("search", index=str(index))
    call = {"id": call_id, "type": "function",
            "function": {"name": "search", "arguments": json.dumps({"query": q.query, "k": k})}}
    result = execute_tool_call(call, search_tools)["content"]
    if q.doc.relpath not in result or q.value not in result:
        raise ValueError(f"search for {q.query!r} does not show {q.value!r} from {q.doc.relpath}")
    return {
        "messages": [
            {"role": "user", "content": q.question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": q.answer},
        ],
        "tools": tools if tools is not None else [t.schema() for t in search_tools],
    }


def tool_schemas_for(names: str, index: str | Path | None = None) -> list[dict]:
    """The schemas `chat_with_tools(tools=names)` lists (the index does not change them)."""
    from lmforge.tools import get_tools

    return [t.schema() for t in get_tools(names, **({"index": str(index)} if index else {}))]


# -- checking cited answers -----------------------------------------------------------------------
_CITED = re.compile(r"[\w\-./]*\w\.(?:md|txt|markdown|rst|html?|pdf)\b", re.I)


def cited_files(text: str) -> list[str]:
    """File paths named in a reply (anything ending in a document suffix), in order."""
    return [m.group(0).lstrip("./") for m in _CITED.finditer(text or "")]


def value_in(text: str, value: str) -> bool:
    """The value is stated: a whole number (thousands separators allowed) or the words, any case."""
    if value.isdigit():
        return int(value) in integers_in(text)
    return re.search(r"(?<!\w)" + re.escape(value.lower()) + r"(?!\w)", (text or "").lower()) is not None


def lookup_check(text: str, value: str, relpath: str) -> dict:
    """{"fact": the value is in the reply, "cited": the reply names the file holding it and no
    other file, "correct": both}."""
    files = {f.lower() for f in cited_files(text)}
    fact = value_in(text, value)
    cited = relpath.lower() in files and len(files) == 1
    return {"fact": fact, "cited": cited, "correct": fact and cited}


# -- the python tool: programs for what a calculator cannot do, and plots ----------------------------
@dataclass(frozen=True)
class PythonTask:
    """A question whose answer a short program computes (or draws, when `plot`)."""

    kind: str
    question: str
    code: str
    answer: str  # "{out}": the program's printed output, stripped
    plot: bool = False


_WORDS = ["river", "garden", "lantern", "harbour", "meadow", "copper", "whisper", "orchard", "thunder", "velvet",
          "pebble", "compass", "saffron", "glacier", "timber", "marble", "falcon", "ember", "tulip", "canyon"]
_CURVES = [("sin(x)", "np.sin(x)"), ("cos(x)", "np.cos(x)"), ("x^2", "x**2"), ("x^3 - 3x", "x**3 - 3*x"),
           ("exp(-x/3) sin(2x)", "np.exp(-x / 3) * np.sin(2 * x)"), ("1/(1 + x^2)", "1 / (1 + x**2)"),
           ("tanh(x)", "np.tanh(x)"), ("|x|", "np.abs(x)"), ("sqrt(|x|)", "np.sqrt(np.abs(x))"), ("x sin(x)", "x * np.sin(x)")]
_PLOT_PHRASES = ["Plot {f} for x from {a} to {b}.", "Draw a graph of {f} from x = {a} to {b}.",
                 "Can you plot y = {f} between {a} and {b}?", "Show me a plot of {f} on [{a}, {b}]."]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _python_task(rng: random.Random, kind: str) -> PythonTask:
    if kind == "fibonacci":
        n = rng.randint(20, 90)
        return PythonTask(kind, f"What is the {_ordinal(n)} Fibonacci number?",
                          f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a)",
                          f"The {_ordinal(n)} Fibonacci number is {{out}}.")
    if kind == "primes":
        n = rng.choice([100, 500, 1000, 2000, 5000, 10000, 50000]) + rng.randint(0, 99)
        return PythonTask(kind, rng.choice([f"How many prime numbers are there below {n}?", f"Count the primes less than {n}."]),
                          f"n = {n}\nsieve = [True] * n\nsieve[0:2] = [False, False]\nfor i in range(2, int(n ** 0.5) + 1):\n"
                          "    if sieve[i]:\n        sieve[i * i::i] = [False] * len(sieve[i * i::i])\nprint(sum(sieve))",
                          f"There are {{out}} primes below {n}.")
    if kind == "squares":
        n = rng.randint(10, 500)
        return PythonTask(kind, f"What is the sum of the squares of the integers from 1 to {n}?",
                          f"print(sum(i * i for i in range(1, {n + 1})))", f"The sum of the squares from 1 to {n} is {{out}}.")
    if kind == "letters":
        words = " ".join(rng.sample(_WORDS, rng.randint(3, 6)))
        c = rng.choice(sorted(set(words.replace(" ", ""))))
        return PythonTask(kind, f"How many times does the letter '{c}' appear in \"{words}\"?",
                          f"print({words!r}.count({c!r}))", f"The letter '{c}' appears {{out}} times.")
    if kind == "reverse":
        w = rng.choice(_WORDS) + rng.choice(_WORDS)
        return PythonTask(kind, rng.choice([f"Reverse the string \"{w}\".", f"What is \"{w}\" spelled backwards?"]),
                          f"print({w!r}[::-1])", f"\"{w}\" reversed is \"{{out}}\".")
    if kind == "sort":
        xs = [rng.randint(-99, 999) for _ in range(rng.randint(6, 10))]
        return PythonTask(kind, f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}.",
                          f"print(sorted({xs}))", "Sorted: {out}.")
    if kind == "dates":
        y = rng.randint(1990, 2030)
        m1, m2 = rng.randint(1, 6), rng.randint(7, 12)
        d1, d2 = rng.randint(1, 28), rng.randint(1, 28)
        a, b = f"{y}-{m1:02d}-{d1:02d}", f"{y + rng.randint(0, 3)}-{m2:02d}-{d2:02d}"
        return PythonTask(kind, f"How many days are there between {a} and {b}?",
                          f"from datetime import date\nprint((date.fromisoformat({b!r}) - date.fromisoformat({a!r})).days)",
                          f"There are {{out}} days between {a} and {b}.")
    if kind == "divisors":
        n = rng.randint(100, 5000)
        return PythonTask(kind, f"List all the divisors of {n}.", f"n = {n}\nprint([d for d in range(1, n + 1) if n % d == 0])",
                          f"The divisors of {n} are {{out}}.")
    if kind == "plot":
        (name, expr), (a, b) = rng.choice(_CURVES), rng.choice([(-5, 5), (0, 10), (-3, 3), (0, 6), (-10, 10), (-2, 4)])
        code = ("import numpy as np\nimport matplotlib.pyplot as plt\n"
                f"x = np.linspace({a}, {b}, 400)\nplt.plot(x, {expr})\nplt.xlabel(\"x\")\nplt.ylabel(\"y\")\n"
                f"plt.title(\"y = {name}\")\nplt.grid(True)\nplt.show()")
        return PythonTask(kind, rng.choice(_PLOT_PHRASES).format(f=name, a=a, b=b), code,
                          f"Here is the plot of y = {name} for x from {a} to {b}.", plot=True)
    if kind == "bars":
        labels = rng.sample(["apples", "pears", "plums", "figs", "kiwis", "limes", "dates", "cherries"], rng.randint(3, 5))
        vals = [rng.randint(1, 40) for _ in labels]
        pairs = ", ".join(f"{k} {v}" for k, v in zip(labels, vals))
        code = ("import matplotlib.pyplot as plt\n"
                f"plt.bar({labels}, {vals})\nplt.ylabel(\"count\")\nplt.title(\"Fruit counts\")\nplt.show()")
        return PythonTask(kind, f"Make a bar chart of these counts: {pairs}.", code,
                          "Here is the bar chart of the counts.", plot=True)
    raise ValueError(f"unknown python task kind {kind!r}")


PYTHON_KINDS = ("fibonacci", "primes", "squares", "letters", "reverse", "sort", "dates", "divisors")
PLOT_KINDS = ("plot", "bars")


def python_tasks(n: int, seed: int, kinds: tuple[str, ...] = PYTHON_KINDS) -> list[PythonTask]:
    """`n` seeded tasks, the kinds in turn."""
    rng = random.Random(seed)
    return [_python_task(rng, kinds[i % len(kinds)]) for i in range(n)]


def python_record(t: PythonTask, tools: list[dict] | None = None, call_id: str = "call_0") -> dict:
    """Question -> python call -> the sandbox's real result -> the answer. Raises when the program
    fails, or a plot draws no figure, in this sandbox (the data would teach a broken call)."""
    from lmforge.tools import get_tools
    from lmforge.tools.protocol import execute_tool_call

    call = {"id": call_id, "type": "function", "function": {"name": "python", "arguments": json.dumps({"code": t.code})}}
    result = execute_tool_call(call, get_tools("python"))["content"]
    if result.startswith("Error") or "[exit code" in result or "stderr:" in result:
        raise ValueError(f"the {t.kind} program failed in the sandbox: {result[:200]}")
    if t.plot and "figure" not in result.lower():
        raise ValueError(f"the {t.kind} program drew no figure the sandbox returned: {result[:200]}")
    out = result.strip()
    return {
        "messages": [
            {"role": "user", "content": t.question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": t.answer.format(out=out)},
        ],
        "tools": tools if tools is not None else tool_schemas_for("python"),
    }


def plain_record(question: str, reply: str, tools: list[dict]) -> dict:
    """A question no tool helps with, answered directly although tools are offered (the reply is
    the base model's own, so the adapter keeps its manners)."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], "tools": tools}


# -- many tool conversations at once (eval) -------------------------------------------------------
def tool_round(text: str, messages: list[dict], tools, at_limit: bool = False) -> bool:
    """Append one assistant turn (and its tool results) exactly as `run_tool_loop` does; True when
    the model answered without a call (the conversation is finished)."""
    from lmforge.tools.protocol import CALL_CLOSE, CALL_OPEN, execute_tool_call, parse_tool_calls, tool_error_message

    base = sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")
    content, calls, errors = parse_tool_calls(text or "", start_index=base)
    if not calls and not errors:
        messages.append({"role": "assistant", "content": text})
        return True
    bad = {e["id"]: e for e in errors}
    ordered = sorted(calls + [{"id": e["id"]} for e in errors], key=lambda c: int(c["id"].split("_")[1]))
    tool_calls, results = [], []
    for c in ordered:
        if at_limit:  # the loop's last round: calls are answered with an error, not run
            steps = sum(1 for m in messages if m["role"] == "assistant" and m.get("tool_calls"))
            tool_calls.append(c if c["id"] not in bad else {"id": c["id"], "type": "function",
                                                             "function": {"name": "", "arguments": bad[c["id"]]["raw"]}})
            results.append(tool_error_message(c["id"], f"step limit reached ({steps} rounds of tool calls); answer without tools"))
        elif c["id"] in bad:
            e = bad[c["id"]]
            tool_calls.append({"id": c["id"], "type": "function", "function": {"name": "", "arguments": e["raw"]}})
            results.append(tool_error_message(c["id"], f"malformed tool call: {e['message']}. Write {CALL_OPEN}"
                                              f"{{\"name\": ..., \"arguments\": {{...}}}}{CALL_CLOSE}"))
        else:
            tool_calls.append(c)
            results.append(execute_tool_call(c, tools))
    messages.append({"role": "assistant", "content": content or None, "tool_calls": tool_calls})
    messages.extend(results)
    return False


def tool_loops_batched(lm, questions: list[str], tools, max_new_tokens: int, max_steps: int, batch: int,
                       log=print) -> list[list[dict]]:
    """`lm.chat_with_tools` for many questions at once (greedy): each round, every unfinished
    conversation is rendered with the tools' schemas and decoded in one batch (stopping at
    `</tool_call>`), then its calls are run as `run_tool_loop` runs them. Batching only changes
    speed (callers check it against `chat_with_tools` on a sample). Returns the new messages."""
    from lmforge.engine import SamplingParams, generate_text
    from lmforge.tools.protocol import STOP_STRINGS

    schemas = [t.schema() for t in tools]
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=list(STOP_STRINGS))
    convs = [[{"role": "user", "content": q}] for q in questions]
    active = list(range(len(convs)))
    for step in range(max_steps + 1):
        texts: dict[int, str] = {}
        for i in range(0, len(active), batch):
            rows = active[i:i + batch]
            prompts = [lm.encode_chat(convs[r], tools=schemas) for r in rows]
            for r, out in zip(rows, generate_text(lm.model, lm.tokenizer, prompts, params)):
                texts[r] = out["text"]
            if log:
                log(f"  round {step + 1}: {min(i + batch, len(active))}/{len(active)}")
        active = [r for r in active if not tool_round(texts[r], convs[r], tools, at_limit=step == max_steps)]
        if not active or step == max_steps:
            break
    return [c[1:] for c in convs]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
