"""Direct Preference Optimization on comparisons (sigmoid, IPO, robust or hinge loss; full or LoRA).

    lmforge dpo --data pairs.jsonl --out runs/dpo                    # {prompt|messages, chosen, rejected}
    lmforge dpo --config recipes/dpo/lora.yaml --data pairs.jsonl --loss ipo --beta 0.5
    lmforge dpo --model runs/sft --data runs/constitution/pairs.jsonl

The reference model is the starting model; its log-probs of every pair are computed once before
training and cached (ref_logps.pt in the run folder). Logged per step: loss, reward margin and
accuracy (β·log-ratio of chosen vs rejected), and the same on held-out pairs at each eval.
"""
from __future__ import annotations

from lmforge.align.dpo import DPOConfig as Config


def run(cfg: Config) -> int:
    from lmforge.align.dpo import run_dpo

    run_dpo(cfg)
    return 0
