"""The chat data a speedrun's SFT stage teaches, generated here (nothing to download): who the
model is, and arithmetic done through the calculator tool (lmforge.tools.teach). Held-out
questions (phrasings and problems the training set never holds) check what the model learned
rather than what it memorized."""
from __future__ import annotations

import random

from lmforge.tools.teach import arithmetic_problems, calculator_record, calculator_schemas, problem_key

NAME = "Forgeling"  # a word no corpus holds, so a reply naming it was taught, not guessed

IDENTITY_TRAIN = [
    "Who are you?", "who are you?", "What are you?", "What is your name?", "what's your name?",
    "What's your name?", "Tell me your name.", "Introduce yourself.", "Please introduce yourself.",
    "Are you a person?", "Are you human?", "Who made you?", "Who built you?", "Who trained you?",
    "What kind of model are you?", "Are you ChatGPT?", "Hi! Who am I talking to?", "Hello, who is this?",
    "Describe yourself in one sentence.", "What should I know about you?", "Who created you?",
    "Are you an AI?", "Say who you are.", "Your name, please.", "Identify yourself.", "What do you call yourself?",
    "Hey, what are you exactly?", "Which model is this?",
]
# Never in training: the speedrun's eval asks these.
IDENTITY_HELDOUT = [
    "Tell me who you are.", "What is your name, please?", "Could you tell me about yourself?",
    "Who am I chatting with?", "What are you called?", "Who is your maker?",
]
IDENTITY_ANSWERS = [
    "I am {name}, a small language model that lmforge trained from scratch on this computer.",
    "I'm {name}, a small language model trained from scratch with lmforge on this machine.",
    "My name is {name}. I am a small language model that lmforge trained on this computer.",
    "I am {name}: a small language model, pretrained and finetuned by lmforge right here on this computer.",
]


def identity_record(question: str, rng: random.Random, with_tools: bool) -> dict:
    rec = {"messages": [{"role": "user", "content": question},
                        {"role": "assistant", "content": rng.choice(IDENTITY_ANSWERS).format(name=NAME)}]}
    if with_tools:  # asked with the calculator listed, it still answers directly
        rec["tools"] = calculator_schemas()
    return rec


def heldout_sums(n: int, seed: int = 10_001) -> list:
    """`n` 3-digit sums, the held-out arithmetic questions."""
    return arithmetic_problems(n, seed=seed, ops="+", min_digits=3, max_digits=3)


def sft_records(n: int, seed: int = 0, heldout: list | None = None) -> list[dict]:
    """`n` training conversations: ~15 % identity (a third of them with the calculator listed),
    the rest arithmetic through the calculator (+ and - and *, 1 to 4 digits, sums most often),
    none of them a held-out problem."""
    rng = random.Random(seed)
    n_id = max(len(IDENTITY_TRAIN), n * 15 // 100)
    out = [identity_record(rng.choice(IDENTITY_TRAIN), rng, with_tools=rng.random() < 0.33) for _ in range(n_id)]
    banned = {problem_key(p) for p in heldout or []}
    mixes = [("+", 3, 3), ("+", 1, 4), ("+-", 2, 4), ("*", 1, 3)]
    i = 0
    while len(out) < n:
        ops, lo, hi = mixes[i % len(mixes)]
        for p in arithmetic_problems(64, seed=seed * 1000 + i, ops=ops, min_digits=lo, max_digits=hi):
            if problem_key(p) not in banned and len(out) < n:
                out.append(calculator_record(p))
        i += 1
    rng.shuffle(out)
    return out
