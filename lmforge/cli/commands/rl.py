"""Reinforcement learning with checkable rewards (GRPO: group-relative advantages, clipping, KL).

    lmforge rl --task.name arithmetic --model runs/sft --out runs/rl          # 2-digit addition
    lmforge rl --data tasks.jsonl --val-data heldout.jsonl --reward exact      # {"prompt", "answer"}
    lmforge rl --data code.jsonl --reward unit_tests                           # {"prompt", "tests"}
    lmforge rl --data q.jsonl --reward rm:runs/rm                              # a reward model's score
    lmforge rl --data q.jsonl --reward mypkg.rewards:score                     # your function(record, text)
    lmforge rl --task.name arithmetic --grpo.tools calculator                  # rollouts may call tools

Rewards: `exact` (the last number equals "answer"), `unit_tests` (code + "tests" pass in the
sandbox), `rm:PATH`, `format`, or a dotted path; join with + to add them. Held-out accuracy is
measured before training and every --train.eval-every steps (greedy decoding).
"""
from __future__ import annotations

from lmforge.align.grpo import RLConfig as Config


def run(cfg: Config) -> int:
    from lmforge.align.grpo import run_rl

    run_rl(cfg)
    return 0
