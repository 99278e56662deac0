"""How a time budget is spent: the model's size by budget and device, each stage's share of the
time, and step counts measured on this machine (a few timed steps) rather than guessed, so the
learning-rate schedule ends when the time does."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch

from lmforge.errors import LmforgeError

# Shares of the budget. The rest (fetch, tokenizer, prepare: seconds here; eval and the report)
# runs in what is left; the trainers' time limits keep a slow machine inside the budget.
PRETRAIN_SHARE = 0.6
SFT_SHARE = 0.22
SEQ_LEN = 640  # a calculator conversation is up to ~530 tokens of an 8k BPE (its system prompt ~450)


@dataclass
class Plan:
    budget_s: float
    device: str
    depth: int
    d_model: int
    head_dim: int
    seq_len: int
    batch_size: int
    train_dtype: str  # bf16 autocast where this device runs bf16 at speed, else fp32
    pretrain_s: float
    sft_s: float
    step_s: float = 0.0  # measured seconds per pretraining step of this shape
    sft_step_s: float = 0.0  # and per SFT step (the loss covers only the replies: far cheaper)
    pretrain_steps: int = 0
    sft_steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_budget(text: str) -> float:
    """Seconds in "10m", "1h", "1h30m", "90m", "45s" or a bare number of seconds."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise LmforgeError(f"--budget '{text}' is not a duration (e.g. 10m, 1h, 1h30m, 4h)")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds < 120:
        raise LmforgeError(f"--budget {text} is too short: the whole life of a model needs at least 2m")
    return seconds


def shape_for(budget_s: float, device: str) -> tuple[int, int, int]:
    """(depth, d_model, batch_size): the size that a budget can train well on this device.
    On 2 CPU cores an hour fits ~13 M tokens: a 4-layer, 256-wide model (recipes/pretrain/cpu-1h)."""
    if device.startswith("cuda"):
        return (8, 512, 32) if budget_s <= 1800 else (12, 768, 32) if budget_s <= 3 * 3600 else (16, 1024, 32)
    if budget_s <= 20 * 60:
        return 2, 128, 8
    if budget_s <= 2 * 3600:
        return 4, 256, 8
    return 6, 384, 8


def make_plan(budget_s: float, device: str, train_dtype: str) -> Plan:
    depth, d_model, batch = shape_for(budget_s, device)
    return Plan(budget_s=budget_s, device=device, depth=depth, d_model=d_model, head_dim=64, seq_len=SEQ_LEN,
                batch_size=batch, train_dtype=train_dtype, pretrain_s=budget_s * PRETRAIN_SHARE,
                sft_s=budget_s * SFT_SHARE)


def time_steps(model, batch_size: int, seq_len: int, dtype: str, device: str, steps: int = 3,
               target_fraction: float = 1.0) -> float:
    """Seconds per optimizer step of `model` on random tokens (the first step, which warms up
    the allocator and kernels, is not counted). `target_fraction`: the share of positions with a
    loss (SFT's replies are ~10 % of a calculator conversation; the output head only runs there)."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    targets = ids[:, 1:].clone()
    targets[:, : int(seq_len * (1 - target_fraction))] = -100
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with amp:
            out = model(ids[:, :-1], targets=targets)
        loss = out[1] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / max(len(times) - 1, 1)


def fill_steps(plan: Plan, step_s: float, sft_step_s: float | None = None, overhead: float = 0.8) -> Plan:
    """Step counts from measured step times; `overhead` leaves room for evals, checkpoints and
    the data loader, which the timed steps do not include."""
    plan.step_s, plan.sft_step_s = step_s, sft_step_s or step_s
    plan.pretrain_steps = max(10, int(plan.pretrain_s * overhead / plan.step_s))
    plan.sft_steps = max(10, int(plan.sft_s * overhead / plan.sft_step_s))
    return plan
