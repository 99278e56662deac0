"""Print a model's config, parameter count and tokenizer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Config:
    model: str | None = None
    json: bool = False


def run(cfg: Config) -> None:
    import json

    import torch

    from lmforge.families import describe
    from lmforge.loading import read_model_files

    mcfg, state, tok, path = read_model_files(cfg.model, torch.float32)
    unique = {}
    for k, v in state.items():
        unique.setdefault(v.data_ptr(), v.numel())
    n_params = sum(unique.values())
    info = {
        "path": str(path),
        "parameters": n_params,
        **describe(mcfg),
        "config": dataclasses.asdict(mcfg),
        "tokenizer": None if tok is None else {
            "vocab_size": tok.vocab_size, "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
            "chat_template": bool(tok.chat_template),
        },
    }
    if cfg.json:
        print(json.dumps(info, indent=2))
        return
    print(f"model:       {path}")
    print(f"parameters:  {n_params:,} ({n_params / 1e6:.1f} M)")
    print(f"family:      {info['family']}: {'; '.join(info['features'])}")
    for what, ok in info["lmforge"].items():
        print(f"  {what:<62} {ok}")
    for k, v in dataclasses.asdict(mcfg).items():
        if v not in (None, {}, 0) or k in ("n_experts",):
            print(f"  {k:<22} {v}")
    if tok is not None:
        print(f"tokenizer:   vocab {tok.vocab_size}, bos {tok.bos_token!r}, eos {tok.eos_token!r}, "
              f"chat template {'yes' if tok.chat_template else 'no (plain completion)'}")
