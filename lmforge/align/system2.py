""""System 2" at inference: sample several answers, then pick one.

    from lmforge.align.system2 import system2_generate
    out = system2_generate(model, tok, prompt_ids, params, mode="best_of_n", n=8, reward_model=rm,
                           messages=[{"role": "user", "content": "What is 17 + 25?"}])
    out["text"], out["candidates"], out["scores"]

- `best_of_n`: N samples, each scored by a trained reward model (`lmforge rm`) on the whole
  conversation; the highest score wins.
- `vote` (self-consistency): N samples, the final answer of each read by `extract` (default: the
  last number, `lmforge.align.tasks.extract_answer`; pass another for other tasks); the most
  common answer wins (ties: the answer seen first), and the returned text is the first sample
  that gave it. Samples with no answer do not vote.

The N samples are one batched engine call (N rows of the same prompt). `generate`, `chat` and
the server call `system2_generate` with their sampling parameters; with N = 1 it is plain
sampling. Temperature 0 would make all N samples equal: callers should sample (temperature > 0).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from lmforge.errors import LmforgeError

MODES = ("best_of_n", "vote")


def sample_n(model, tokenizer, prompt_ids: list[int], params, n: int) -> list[dict]:
    """N completions of one prompt in one batched call (seeded: row i differs from row j)."""
    from lmforge.engine import generate_text

    if n < 1:
        raise LmforgeError("n must be at least 1")
    return generate_text(model, tokenizer, [list(prompt_ids)] * n, params)


def majority(answers: list[str | None]) -> tuple[str | None, int]:
    """(most common non-None answer, its count); ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    for a in answers:
        if a is not None and counts[a] == best:
            return a, best
    return None, 0  # pragma: no cover


def system2_generate(model, tokenizer, prompt_ids: list[int], params, mode: str = "best_of_n", n: int = 8,
                     reward_model=None, messages: list[dict] | None = None, reward_tokenizer=None,
                     extract: Callable[[str], str | None] | None = None) -> dict:
    """One answer chosen among `n` samples. Returns {"text", "index", "candidates" (texts),
    "scores" (best_of_n) or "answers"/"votes" (vote), "completion_tokens" (all samples)}.

    best_of_n needs `reward_model` (a RewardModel, or a path to one) and the conversation as
    `messages` (the reward model reads text through its own tokenizer, which may differ);
    without `messages`, the prompt text decoded from `prompt_ids` is scored as a raw sequence.
    """
    if mode not in MODES:
        raise LmforgeError(f"unknown system-2 mode '{mode}' (choose {', '.join(MODES)})")
    results = sample_n(model, tokenizer, prompt_ids, params, n)
    texts = [r["text"] for r in results]
    used = sum(r["completion_tokens"] for r in results)
    if mode == "vote":
        if extract is None:
            from lmforge.align.tasks import extract_answer as extract
        answers = [extract(t) for t in texts]
        winner, count = majority(answers)
        index = answers.index(winner) if winner is not None else 0
        return {"text": texts[index], "index": index, "candidates": texts, "answers": answers, "answer": winner,
                "votes": count, "completion_tokens": used}
    scores = score_candidates(reward_model, texts, messages=messages, tokenizer=tokenizer, prompt_ids=prompt_ids,
                              reward_tokenizer=reward_tokenizer)
    index = max(range(len(texts)), key=lambda i: scores[i])
    return {"text": texts[index], "index": index, "candidates": texts, "scores": scores, "completion_tokens": used}


_RM_CACHE: dict = {}


def get_reward_model(reward_model):
    """A loaded (RewardModel, tokenizer) from a RewardModel object or a path (paths cached)."""
    from lmforge.align.reward_model import RewardModel, load_reward_model

    if reward_model is None:
        raise LmforgeError("best-of-N needs a reward model (--reward-model PATH, trained with `lmforge rm`)")
    if isinstance(reward_model, RewardModel):
        return reward_model, None
    if isinstance(reward_model, tuple):
        return reward_model
    key = str(reward_model)
    if key not in _RM_CACHE:
        _RM_CACHE[key] = load_reward_model(key)
    return _RM_CACHE[key]


def score_candidates(reward_model, texts: list[str], messages: list[dict] | None = None, tokenizer=None,
                     prompt_ids: list[int] | None = None, reward_tokenizer=None) -> list[float]:
    from lmforge.align.reward_model import score_conversations, score_ids

    rm, rm_tok = get_reward_model(reward_model)
    rm_tok = reward_tokenizer or rm_tok or tokenizer
    if messages is not None:
        convs = [list(messages) + [{"role": "assistant", "content": t}] for t in texts]
        return score_conversations(rm, rm_tok, convs)
    if tokenizer is None or prompt_ids is None:
        raise LmforgeError("scoring raw completions needs the prompt ids and the tokenizer")
    prefix = tokenizer.decode(prompt_ids)
    return score_ids(rm, [rm_tok.encode(prefix + t) for t in texts])
