"""Reward models: train one on comparisons (Bradley–Terry), or score replies with one.

    lmforge rm train --data pairs.jsonl --out runs/rm            # {prompt|messages, chosen, rejected}
    lmforge rm train --task.name arithmetic --out runs/rm-arith  # a generated, checkable task
    lmforge rm score --model runs/rm --data pairs.jsonl          # scores; pairwise accuracy
    lmforge rm score --model runs/rm --prompt "2+2?" --completion "4"

The result is an HF folder (LlamaForSequenceClassification: the backbone plus `score.weight`)
that `transformers.AutoModelForSequenceClassification` loads with the same scores; `lmforge rl
--reward rm:PATH` and best-of-N sampling use it.
"""
from __future__ import annotations

from lmforge.align.reward_model import RMConfig, RMScoreConfig


def _train(cfg: RMConfig) -> int:
    """Train a reward model on preference pairs (see `lmforge rm` for the data format)."""
    from lmforge.align.reward_model import run_rm

    run_rm(cfg)
    return 0


def _score(cfg: RMScoreConfig) -> int:
    """Score replies (JSONL or --prompt/--completion) with a trained reward model."""
    from lmforge.align.reward_model import run_score

    run_score(cfg)
    return 0


SUBCOMMANDS = {"train": (RMConfig, _train), "score": (RMScoreConfig, _score)}
