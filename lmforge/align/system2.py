""""System 2" at inference: sample several answers, then pick one.

    from lmforge.align.system2 import system2_generate
    out = system2_generate(model, tok, prompt_ids, params, mode="best_of_n", n=8, reward_model=rm,
                           messages=[{"role": "user", "content": "What is 17 + 25?"}])
    out["text"], out["candidates"], out["scores"]

- `best_of_n`: N samples, each scored by a trained reward model (`lmforge rm`) on the whole
  conversation; the highest score wins (ties: the earlier sample).
- `vote` (self-consistency): N samples, each reduced to an answer by `answer_keys`: the last
  number when any sample holds a number (`lmforge.align.tasks.extract_answer`; samples without one
  do not vote), otherwise the whole reply, normalized (case, spacing, trailing punctuation). The
  most common answer wins (ties: the answer seen first); the returned text is the first sample
  that gave it. Pass `extract` for another rule.

Sampling: sample i is seeded with `seed + i` (as the server seeds its `n` choices), so a seeded
call is reproducible and gives the server's answer for the same request. A seeded call therefore
decodes the N samples one after another; an unseeded one decodes them as one batch.
`choose` is the selection alone, for callers that sampled already (the server, through its
scheduler). Temperature 0 would make all N samples equal: callers sample (the CLI uses
`DEFAULT_TEMPERATURE` when the user leaves temperature at 0). With N = 1 it is plain sampling.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from lmforge.errors import LmforgeError

MODES = ("best_of_n", "vote")
DEFAULT_TEMPERATURE = 0.8  # used by `generate`/`chat` when system 2 is asked for at temperature 0


def normalize_mode(mode: str) -> str:
    """'best-of-n' / 'best_of_n' / 'vote' -> the canonical name; anything else is an error."""
    m = str(mode).strip().lower().replace("-", "_")
    if m not in MODES:
        raise LmforgeError(f"unknown system-2 mode '{mode}' (choose best-of-n or vote)")
    return m


@dataclass
class System2Args:
    """The flags of `lmforge generate` and `lmforge chat` (the server takes {"system2": {"mode", "n"}})."""

    system2: Literal["none", "best-of-n", "vote"] = "none"  # best-of-n: the reward model's favourite; vote: the majority answer
    system2_n: int = 8  # samples per reply
    reward_model: str | None = None  # reward model folder (`lmforge rm`), needed by best-of-n
    verbose: bool = False  # list every sample with its score / answer (stderr)


def check_args(args: System2Args, params) -> tuple[str | None, str | None]:
    """(canonical mode or None when off, a note for the user or None). Raises on inconsistent
    flags; loads the reward model now (a wrong path fails before the policy is loaded); lifts
    `params.temperature` 0 to DEFAULT_TEMPERATURE (at 0 all samples would be the same)."""
    if args.system2 == "none":
        if args.reward_model:
            raise LmforgeError("--reward-model is used only with --system2 best-of-n")
        return None, None
    mode = normalize_mode(args.system2)
    if args.system2_n < 1:
        raise LmforgeError(f"--system2-n must be at least 1, got {args.system2_n}")
    if mode == "best_of_n":
        if not args.reward_model:
            raise LmforgeError("--system2 best-of-n needs --reward-model PATH (a reward model trained with `lmforge rm`)")
        get_reward_model(args.reward_model)
    elif args.reward_model:
        raise LmforgeError("--reward-model is used only with --system2 best-of-n")
    if getattr(params, "draft", "none") not in (None, "none", "auto"):
        raise LmforgeError(f"--draft {params.draft} speeds up one greedy reply; system 2 samples several: use --draft none or auto")
    note = None
    if params.temperature <= 0:
        params.temperature = DEFAULT_TEMPERATURE
        note = (f"(system2: sampling {args.system2_n} replies at temperature {DEFAULT_TEMPERATURE}; "
                "set --temperature to change it)")
    return mode, note


def sample_n(model, tokenizer, prompt_ids: list[int], params, n: int) -> list[dict]:
    """N completions of one prompt; with a seed, sample i uses seed + i (one call per sample)."""
    from lmforge.engine import generate_text

    if n < 1:
        raise LmforgeError("n must be at least 1")
    if params.seed is None:  # nothing to reproduce: one batched call
        return generate_text(model, tokenizer, [list(prompt_ids)] * n, params)
    return [generate_text(model, tokenizer, [list(prompt_ids)], dataclasses.replace(params, seed=(params.seed + i) % (1 << 63)))[0]
            for i in range(n)]


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


def normalize_text(text: str) -> str | None:
    """A free-text reply as a vote: lower case, spaces collapsed, trailing punctuation dropped."""
    s = re.sub(r"\s+", " ", text or "").strip().lower().rstrip(" .!?;:,")
    return s or None


def answer_keys(texts: list[str], extract: Callable[[str], str | None] | None = None) -> list[str | None]:
    """What each sample votes for (None: no vote). Default: numbers when any sample has one, else text."""
    if extract is not None:
        return [extract(t) for t in texts]
    from lmforge.align.tasks import extract_answer

    numbers = [extract_answer(t) for t in texts]
    if any(a is not None for a in numbers):
        return numbers
    return [normalize_text(t) for t in texts]


def choose(mode: str, texts: list[str], reward_model=None, messages: list[dict] | None = None, tokenizer=None,
           prompt_ids: list[int] | None = None, reward_tokenizer=None,
           extract: Callable[[str], str | None] | None = None) -> dict:
    """Pick one of `texts`: {"text", "index", "candidates", and "scores" (best_of_n) or
    "answers"/"answer"/"votes" (vote)}."""
    mode = normalize_mode(mode)
    if not texts:
        raise LmforgeError("no samples to choose from")
    if mode == "vote":
        answers = answer_keys(texts, extract)
        winner, count = majority(answers)
        index = answers.index(winner) if winner is not None else 0
        return {"text": texts[index], "index": index, "candidates": list(texts), "answers": answers, "answer": winner,
                "votes": count}
    scores = score_candidates(reward_model, texts, messages=messages, tokenizer=tokenizer, prompt_ids=prompt_ids,
                              reward_tokenizer=reward_tokenizer)
    index = max(range(len(texts)), key=lambda i: (scores[i], -i))
    return {"text": texts[index], "index": index, "candidates": list(texts), "scores": scores}


def system2_generate(model, tokenizer, prompt_ids: list[int], params, mode: str = "best_of_n", n: int = 8,
                     reward_model=None, messages: list[dict] | None = None, reward_tokenizer=None,
                     extract: Callable[[str], str | None] | None = None) -> dict:
    """One answer chosen among `n` samples: `choose`'s dict plus "finish_reason" (the winner's)
    and "completion_tokens" (all samples).

    best_of_n needs `reward_model` (a RewardModel, a (RewardModel, tokenizer) pair, or a path) and
    the conversation as `messages` (the reward model reads text through its own tokenizer, which
    may differ); without `messages`, the prompt text decoded from `prompt_ids` plus each sample is
    scored as a raw sequence.
    """
    mode = normalize_mode(mode)
    if mode == "best_of_n":
        get_reward_model(reward_model)  # fail before sampling, not after
    results = sample_n(model, tokenizer, prompt_ids, params, n)
    out = choose(mode, [r["text"] for r in results], reward_model=reward_model, messages=messages, tokenizer=tokenizer,
                 prompt_ids=prompt_ids, reward_tokenizer=reward_tokenizer, extract=extract)
    out["finish_reason"] = results[out["index"]].get("finish_reason")
    out["completion_tokens"] = sum(r["completion_tokens"] for r in results)
    return out


def summary(out: dict) -> str:
    """One line saying which sample won and why (for the CLI's stderr)."""
    n = len(out["candidates"])
    if "scores" in out:
        scores = ", ".join(f"{s:.3f}" for s in out["scores"])
        return f"best-of-{n}: sample {out['index'] + 1} won with reward {out['scores'][out['index']]:.3f} (scores: {scores})"
    if out.get("answer") is None:
        return f"vote over {n}: no sample gave an answer; sample 1 kept"
    return f"vote over {n}: answer {out['answer']!r} won {out['votes']}/{n} votes (sample {out['index'] + 1})"


def describe(out: dict) -> list[str]:
    """One line per sample (the winner marked with *), then `summary`."""
    lines = []
    for i, text in enumerate(out["candidates"]):
        why = f"reward {out['scores'][i]:.3f}" if "scores" in out else f"answer {out['answers'][i]!r}"
        lines.append(f"{'*' if i == out['index'] else ' '} sample {i + 1} ({why}): {text!r}")
    return lines + [summary(out)]


def details(out: dict) -> dict:
    """The JSON-friendly part of a result that says how the winner was chosen."""
    return {k: out[k] for k in ("index", "candidates", "scores", "answers", "answer", "votes") if k in out}


_RM_CACHE: dict = {}


def get_reward_model(reward_model):
    """A loaded (RewardModel, tokenizer or None) from a RewardModel, a pair, or a path (paths cached)."""
    from lmforge.align.reward_model import RewardModel, load_reward_model
    from lmforge.device import resolve_device

    if reward_model is None:
        raise LmforgeError("best-of-N needs a reward model (--reward-model PATH, trained with `lmforge rm`)")
    if isinstance(reward_model, RewardModel):
        return reward_model, None
    if isinstance(reward_model, tuple):
        return reward_model
    key = str(reward_model)
    if key not in _RM_CACHE:
        if not Path(key).expanduser().exists():
            raise LmforgeError(f"reward model not found: {key}")
        _RM_CACHE[key] = load_reward_model(key, device=resolve_device("auto"))  # beside the policy model (auto too)
    return _RM_CACHE[key]


def score_candidates(reward_model, texts: list[str], messages: list[dict] | None = None, tokenizer=None,
                     prompt_ids: list[int] | None = None, reward_tokenizer=None) -> list[float]:
    """The reward model's score of each candidate reply (after `messages`, or after the raw prompt)."""
    from lmforge.align.reward_model import score_conversations, score_ids

    rm, rm_tok = get_reward_model(reward_model)
    rm_tok = reward_tokenizer or rm_tok or tokenizer
    if rm_tok is None:
        raise LmforgeError("the reward model has no tokenizer files; pass its tokenizer")
    if messages is not None:
        convs = [list(messages) + [{"role": "assistant", "content": t}] for t in texts]
        return score_conversations(rm, rm_tok, convs)
    if tokenizer is None or prompt_ids is None:
        raise LmforgeError("scoring raw completions needs the prompt ids and the tokenizer")
    prefix = tokenizer.decode(prompt_ids)
    return score_ids(rm, [rm_tok.encode(prefix + t) for t in texts])
