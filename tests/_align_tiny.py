"""Tiny models with the default model's tokenizer and chat template, for the alignment tests."""
from __future__ import annotations

import torch


def tiny_lm_dir(path, seed: int = 0, max_seq_len: int = 256, **kw):
    """A 2-layer random LM (vocab 49152, tied head) saved as an HF folder with the real tokenizer."""
    from conftest import tiny_config
    from lmforge.loading import load_tokenizer, save_hf
    from lmforge.model import Transformer

    tok = load_tokenizer(None)
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=49152, tie_embeddings=True, max_seq_len=max_seq_len, **kw)
    save_hf(Transformer(cfg).init_weights(seed=seed), tok, path)
    return path


def losses(run_dir, key="loss"):
    import json

    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]
