"""Pretrain a model from scratch (or from a checkpoint) on prepared token shards.

    lmforge pretrain --config recipes/pretrain/smoke.yaml [--train.max_steps 200] [--out runs/x]

Sections: `model:` size dials (depth, aspect_ratio, head_dim, n_kv_heads, MoE switches),
`data:` (dir from `lmforge data prepare`, batch_size, seq_len, heldout text for bits per byte),
`train:` (lr, schedule, grad_accum, dtype, save_every, time_limit_s ...). Rerunning with the
same --out resumes from its last complete checkpoint. Under `torchrun` it trains with DDP
(`--train.fsdp` for FSDP2). Chat with the result: `lmforge chat --model OUT`.
"""
from __future__ import annotations

from lmforge.train.pretrain import PretrainConfig as Config  # noqa: F401  (fields = flags)


def run(cfg: Config) -> int:
    from lmforge.train.pretrain import run_pretrain

    res = run_pretrain(cfg)
    m = res.get("metrics") or {}
    parts = [f"step {res['step']}", f"loss {res['loss']:.4f}"]
    for k in ("val_loss", "val_bpb", "heldout_bpb"):
        if isinstance(m.get(k), float):
            parts.append(f"{k} {m[k]:.4f}")
    from lmforge.train.trainer import dist_info

    if dist_info().is_main:
        print(f"done ({res['stopped']}): " + ", ".join(parts) + f"; checkpoint {res['checkpoint']}")
    return 0
