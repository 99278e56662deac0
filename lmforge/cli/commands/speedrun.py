"""The whole life of a model in one command: data, tokenizer, pretraining, chat finetuning, eval, report card.

    lmforge speedrun --budget 1h                   # -> runs/speedrun/report.md, then chat with it
    lmforge speedrun --budget 10m --out runs/quick

The budget sizes everything: the model (bigger on a GPU), and the steps of each training stage,
from a few timed steps on this machine (pretraining gets ~60 % of the time, SFT ~22 %). The
model learns English prose (public-domain books fetched once), then who it is and how to do
arithmetic with the calculator tool. Rerunning with the same --out resumes where it stopped.
Chat with the result: `lmforge chat --model OUT/sft --tools calculator`.
"""
from __future__ import annotations

from lmforge.speedrun.stages import SpeedrunConfig as Config  # noqa: F401  (fields = flags)


def run(cfg: Config) -> int:
    from lmforge.speedrun import run_speedrun

    state = run_speedrun(cfg)
    ev = state["stages"]["eval"]
    print(f"identity {ev['identity_ok']}/{len(ev['identity'])}, 3-digit sums {ev['arithmetic_ok']}/{len(ev['arithmetic'])}")
    print(f"report card: {state['stages']['report']['path']}")
    print(f"chat with it:  lmforge chat --model {cfg.out}/sft --tools calculator")
    return 0
