"""Reward functions for RL: how good is a completion for a task record?

A reward function takes the task record (a dict: at least `prompt` or `messages`, plus whatever
the check needs, e.g. `answer` or `tests`) and the completion text, and returns a float:

    def my_reward(record: dict, completion: str) -> float: ...

A function with the attribute `batched = True` takes lists instead (records, completions) and
returns a list (the reward model does, to score a whole rollout in batches).

Built-ins, by name (`lmforge rl --reward NAME`, several joined with `+` are summed):
- `exact`: 1.0 when the last number of the completion equals `record["answer"]`, else 0.0
  (arithmetic and other tasks with one numeric answer).
- `unit_tests`: the completion's Python code (the last ```python fenced block, else the whole
  text) followed by `record["tests"]` runs in the tools sandbox (lmforge.tools.sandbox); 1.0 if
  it exits cleanly, else 0.0.
- `rm:PATH` (or `reward_model:PATH`): a trained reward model's score (`lmforge rm`).
- `format`: 0.1 when the reply is short and ends with a number (shaping; optional).
- `package.module:function` or `package.module.function`: a user's callable by dotted path.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

from lmforge.errors import LmforgeError

RewardFn = Callable[[dict, str], float]
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def exact_answer(record: dict, completion: str) -> float:
    from lmforge.align.tasks import is_correct

    if "answer" not in record:
        raise LmforgeError("the 'exact' reward needs an 'answer' field in every task record")
    return 1.0 if is_correct(completion, str(record["answer"])) else 0.0


def format_reward(record: dict, completion: str) -> float:
    text = completion.strip()
    return 0.1 if text and len(text) <= 40 and re.search(r"\d\.?$", text) else 0.0


def extract_code(completion: str) -> str:
    blocks = _FENCE.findall(completion or "")
    return blocks[-1] if blocks else (completion or "")


def unit_tests(record: dict, completion: str, timeout_s: float = 10.0) -> float:
    from lmforge.tools.sandbox import run_python

    if "tests" not in record:
        raise LmforgeError("the 'unit_tests' reward needs a 'tests' field (Python asserts) in every task record")
    program = extract_code(completion) + "\n\n" + str(record["tests"]) + "\n"
    r = run_python(program, timeout_s=float(record.get("timeout_s", timeout_s)))
    return 1.0 if r.ok else 0.0


class RewardModelScore:
    """The score of a trained reward model for (prompt + completion); batched."""

    batched = True

    def __init__(self, path: str, batch_size: int = 16):
        from lmforge.align.reward_model import load_reward_model

        self.rm, self.tokenizer = load_reward_model(path)
        if self.tokenizer is None:
            raise LmforgeError(f"reward model {path} has no tokenizer files")
        self.batch_size = batch_size

    def __call__(self, records: list[dict], completions: list[str]) -> list[float]:
        from lmforge.align.reward_model import score_conversations

        convs = [prompt_messages(r) + [{"role": "assistant", "content": c}] for r, c in zip(records, completions)]
        return score_conversations(self.rm, self.tokenizer, convs, self.batch_size)


def prompt_messages(record: dict) -> list[dict]:
    """The conversation a task record asks the model to continue."""
    if "messages" in record:
        return list(record["messages"])
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]}]
    raise LmforgeError("a task record needs 'prompt' or 'messages'")


def load_callable(path: str) -> Callable:
    """`pkg.module:func` or `pkg.module.func` -> the object (a function or a class instance factory)."""
    mod_name, sep, attr = path.partition(":")
    if not sep:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise LmforgeError(f"reward '{path}' is not a dotted path (package.module:function)")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise LmforgeError(f"cannot import '{mod_name}' for reward '{path}': {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LmforgeError(f"'{mod_name}' has no '{attr}' (reward '{path}')")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LmforgeError(f"reward '{path}' is not callable")
    return obj


BUILTINS: dict[str, RewardFn] = {"exact": exact_answer, "unit_tests": unit_tests, "format": format_reward}


def get_reward(spec: str | Callable) -> Callable:
    """A reward function from a name, `rm:PATH`, a dotted path, a `+`-joined sum, or a callable."""
    if callable(spec):
        return spec
    spec = str(spec).strip()
    if not spec:
        raise LmforgeError("no reward function given (e.g. --reward exact)")
    if "+" in spec:
        parts = [get_reward(s) for s in spec.split("+")]
        return SumReward(parts)
    if spec in BUILTINS:
        return BUILTINS[spec]
    for prefix in ("rm:", "reward_model:"):
        if spec.startswith(prefix):
            return RewardModelScore(spec[len(prefix):])
    if "." in spec or ":" in spec:
        return load_callable(spec)
    raise LmforgeError(f"unknown reward '{spec}' (built-ins: {', '.join(BUILTINS)}, rm:PATH, or package.module:function)")


class SumReward:
    batched = True

    def __init__(self, parts: list[Callable]):
        self.parts = parts

    def __call__(self, records, completions):
        total = [0.0] * len(records)
        for p in self.parts:
            for i, v in enumerate(compute_rewards(p, records, completions)):
                total[i] += v
        return total


def compute_rewards(fn: Callable, records: list[dict], completions: list[str]) -> list[float]:
    """Apply a reward function (batched or not) to parallel lists; always a list of floats."""
    if getattr(fn, "batched", False):
        out = list(fn(records, completions))
    else:
        out = [fn(r, c) for r, c in zip(records, completions)]
    if len(out) != len(records):
        raise LmforgeError(f"the reward function returned {len(out)} values for {len(records)} completions")
    try:
        return [float(v) for v in out]
    except (TypeError, ValueError):
        raise LmforgeError("the reward function must return numbers") from None
