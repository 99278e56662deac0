"""Evaluation tasks: one small data model for every source, prompt formatting, few-shot, suites.

A `Task` is a list of `Item`s plus how to turn them into model requests. Four kinds:

- `multiple_choice`: each item has `choices` and `gold` (indices of the correct ones); every
  choice is scored by the log-likelihood of its text after the item's prompt.
- `generate`: greedy generation up to a stop sequence, answer extracted with a regex, exact
  match against any of `targets`.
- `perplexity`: text documents; loss, perplexity and bits-per-byte (a sliding window: by default
  the model's context, moving by half of it; lmforge.eval.perplexity).
- `code`: HumanEval-style problems run in the tools sandbox (pass@k).

Prompts follow BIG-bench's own JSON-task formatting (bigbench/api/json_task.py) so scores are
comparable with its reports: `task_prefix + shots + input_prefix + input [+ choices] + output_prefix`,
defaults `"\\nQ: "`, `"\\nA: "`, `"\\n  choice: "`, few-shot separator `"\\n"`, choices appended
to the input in a seeded permutation unless `append_choices_to_input` is false.

Item selection is deterministic given the seed: `--limit N` keeps a seeded random subset (kept in
file order), few-shot examples for an item come from a generator seeded by (seed, item index),
never include the item itself, and do not depend on `--limit`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError

KINDS = ("multiple_choice", "generate", "perplexity", "code")
# BIG-bench's default answer extraction: the first run of characters up to a sentence end.
DEFAULT_REGEX = r"[^\.\?\!\;\n]+"

# The `core` suite: ~10 BIG-bench tasks from the bigbench==1.0.0 sdist, chosen to cover
# arithmetic, reasoning, knowledge, commonsense and Russian with small, clean items that a
# laptop scores in minutes. (name, what it measures)
SUITES: dict[str, list[tuple[str, str]]] = {
    "core": [
        ("arithmetic/2_digit_addition", "arithmetic"),
        ("simple_arithmetic_json", "arithmetic (generative)"),
        ("logical_deduction/three_objects", "reasoning"),
        ("date_understanding", "reasoning"),
        ("general_knowledge", "knowledge"),
        ("misconceptions", "knowledge / truthfulness"),
        ("physical_intuition", "commonsense (physics)"),
        ("social_iqa", "commonsense (social)"),
        ("misconceptions_russian", "Russian"),
        ("english_russian_proverbs", "Russian"),
    ],
}


@dataclass
class Item:
    """One test item. `prompt` is the formatted query without task prefix or few-shot context."""

    id: str
    prompt: str
    choices: list[str] | None = None  # multiple choice: the continuations scored
    gold: list[int] | None = None  # multiple choice: indices of correct choices
    targets: list[str] | None = None  # generate: acceptable answers
    shot_answer: str = ""  # what follows `prompt` when this item serves as a few-shot example
    meta: dict = field(default_factory=dict)  # kind-specific fields (code: test, entry_point)


@dataclass
class Task:
    name: str
    kind: str
    items: list[Item]
    source: str = ""
    task_prefix: str = ""
    fewshot_separator: str = "\n"
    output_regex: str | None = None  # generate: the first match is the answer (None = whole text)
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generate: stop sequences
    max_new_tokens: int = 32
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LmforgeError(f"task {self.name}: unknown kind '{self.kind}' (one of {', '.join(KINDS)})")

    @property
    def has_images(self) -> bool:
        """Items that ask about a picture (`meta["image"]`): a vision-language model answers them
        in its chat format (lmforge.eval.images)."""
        return any(it.meta.get("image") is not None for it in self.items)

    @property
    def primary_metric(self) -> str:
        return {"multiple_choice": "acc", "generate": "exact_match", "perplexity": "bits_per_byte", "code": "pass@1"}[self.kind]


def select_items(task: Task, limit: int | None, seed: int) -> list[int]:
    """Indices of the items to evaluate: all, or a seeded random subset of `limit` in file order."""
    n = len(task.items)
    if limit is None or limit <= 0 or limit >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}:{task.name}").sample(range(n), limit))


def fewshot_context(task: Task, index: int, k: int, seed: int) -> str:
    """Task prefix plus k solved examples (never item `index` itself), ready for the item's prompt."""
    if k <= 0:
        return task.task_prefix
    pool = [i for i in range(len(task.items)) if i != index and task.items[i].prompt != task.items[index].prompt]
    if len(pool) < k:
        raise LmforgeError(f"task {task.name} has {len(task.items)} items: too few for {k}-shot prompts")
    rng = random.Random(f"{seed}:{task.name}:{index}")
    shots = [task.items[i] for i in rng.sample(pool, k)]
    sep = task.fewshot_separator
    return task.task_prefix + sep.join(s.prompt + s.shot_answer for s in shots) + sep


def build_context(task: Task, index: int, k: int, seed: int) -> str:
    return fewshot_context(task, index, k, seed) + task.items[index].prompt


def suite_names() -> list[str]:
    return list(SUITES)
