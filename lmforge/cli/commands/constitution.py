"""Constitutional loop: answer -> critique against a principle -> revise; writes SFT data and pairs.

    lmforge constitution --principles en --data prompts.jsonl --out runs/const
    lmforge constitution --principles my_principles.yaml --data prompts.txt --keep judged
    lmforge sft --data runs/const/sft.jsonl        # train on the revisions
    lmforge dpo --data runs/const/pairs.jsonl      # or prefer revision over original

Principles: `en` and `ru` ship with lmforge (lmforge/align/principles/*.yaml, whose header
documents the format); pass a path for your own. Output: sft.jsonl, pairs.jsonl, trace.jsonl
(every answer, critique and revision) and stats.json (how often a fixed rule-based judge
prefers the revision).
"""
from __future__ import annotations

from lmforge.align.constitution import ConstitutionConfig as Config


def run(cfg: Config) -> int:
    from lmforge.align.constitution import run_constitution

    run_constitution(cfg)
    return 0
