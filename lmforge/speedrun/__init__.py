"""`lmforge speedrun`: the whole life of a model in one command, sized by a time budget.

fetch -> tokenizer -> prepare -> plan (time a few steps) -> pretrain -> SFT (identity, arithmetic
through the calculator) -> eval (held-out questions) -> report card (OUT/report.md + plots).
"""
from lmforge.speedrun.stages import SpeedrunConfig, run_speedrun  # noqa: F401
