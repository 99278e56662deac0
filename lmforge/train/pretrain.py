"""Pretraining: a model from a few dials, batches from prepared token shards, bits-per-byte evals.

    lmforge pretrain --config recipes/pretrain/smoke.yaml [--train.max_steps 50 ...]

The size dials (nanochat's habit): `depth` sets the number of layers and, through
`aspect_ratio`, the width (d_model = depth * aspect_ratio rounded up to a multiple of head_dim);
heads follow from head_dim; the SwiGLU hidden size is 8/3 * d_model (a 4x GELU MLP's parameter
count) rounded to a multiple of 64. Any derived value can be pinned instead; the resolved values
are written into the run's config.yaml, which is itself a recipe that reproduces the run.

Data: a folder from `lmforge data prepare`. The training stream is cut into windows of
seq_len + 1 tokens (stride seq_len); each epoch visits them in a seeded random order. A global
micro-batch is the next `batch_size` windows of that order and rank r of W reads rows
[r*B/W, (r+1)*B/W) only, so ranks read disjoint data and the global batch does not depend on W.

Evals: `val_loss` / `val_bpb` on a fixed prefix of the prepared val split; `heldout_bpb` on a
held-out text file or folder (`data.heldout`, e.g. the fetched `heldout/english`, which no
training split contains): sum of next-token losses in bits / UTF-8 bytes of the text.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import Config, Transformer
from lmforge.train.trainer import BatchSource, TrainConfig, dist_info, train


@dataclass
class ModelDials:
    """Model shape from a depth dial; 0 means derive from the others."""

    depth: int = 4  # number of layers
    aspect_ratio: int = 64  # d_model = depth * aspect_ratio (rounded up to a multiple of head_dim)
    d_model: int = 0
    head_dim: int = 64
    n_heads: int = 0  # d_model // head_dim
    n_kv_heads: int = 0  # n_heads (multi-head); fewer = grouped-query attention
    d_ff: int = 0  # 8/3 * d_model rounded up to a multiple of 64
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # Mixture of Experts (0 experts = dense)
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_d_ff: int = 0  # expert hidden size; 0 = d_ff // n_experts_per_token (active MLP size of the dense model)
    n_shared_experts: int = 0  # 1 = a Qwen2-MoE shared expert of width d_ff
    moe_capacity_factor: float = 0.0  # > 0: drop assignments beyond capacity (training only)
    moe_aux_loss_coef: float = 0.01


@dataclass
class DataConfig:
    dir: str = ""  # a folder made by `lmforge data prepare`
    batch_size: int = 8  # sequences per micro-batch, summed over ranks
    seq_len: int = 256
    seed: int = 0  # window order
    eval_tokens: int = 32768  # val split prefix for val_loss / val_bpb; 0 = skip
    heldout: str | None = None  # text file or folder for heldout_bpb ($LMFORGE_HOME and ~ expand)
    heldout_max_bytes: int = 0  # cap on held-out text (whole files, in sorted order); 0 = all


@dataclass
class PretrainConfig:
    model: ModelDials = field(default_factory=ModelDials)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, warmup_steps=50, max_steps=1000))
    out: str = "runs/pretrain"
    init_from: str | None = None  # start from these weights (a checkpoint / HF folder / GGUF) instead of random
    tokenizer: str | None = None  # default: the tokenizer saved with the prepared data
    sample_prompt: str = "The"
    sample_tokens: int = 48
    threads: int = 0  # torch CPU threads; 0 = torch's default


# -- model ------------------------------------------------------------------------------------
def resolve_dials(d: ModelDials) -> ModelDials:
    """Fill every derived (0) dial; returns a new ModelDials."""
    d = dataclasses.replace(d)
    if d.d_model <= 0:
        d.d_model = math.ceil(d.depth * d.aspect_ratio / d.head_dim) * d.head_dim
    if d.n_heads <= 0:
        if d.d_model % d.head_dim:
            raise LmforgeError(f"model.d_model ({d.d_model}) is not a multiple of model.head_dim ({d.head_dim})")
        d.n_heads = d.d_model // d.head_dim
    if d.n_kv_heads <= 0:
        d.n_kv_heads = d.n_heads
    if d.n_heads % d.n_kv_heads:
        raise LmforgeError(f"model.n_heads ({d.n_heads}) must be a multiple of model.n_kv_heads ({d.n_kv_heads})")
    if d.d_ff <= 0:
        d.d_ff = math.ceil(8 * d.d_model / 3 / 64) * 64
    if d.n_experts > 0 and d.moe_d_ff <= 0:
        d.moe_d_ff = max(1, d.d_ff // d.n_experts_per_token)
    return d


def model_config(d: ModelDials, vocab_size: int, seq_len: int, tokenizer=None) -> Config:
    d = resolve_dials(d)
    return Config(
        vocab_size=vocab_size, d_model=d.d_model, n_layers=d.depth, n_heads=d.n_heads, n_kv_heads=d.n_kv_heads,
        head_dim=d.head_dim, d_ff=d.d_ff, rope_theta=d.rope_theta, max_seq_len=seq_len,
        tie_embeddings=d.tie_embeddings, init_std=d.init_std,
        n_experts=d.n_experts, n_experts_per_token=d.n_experts_per_token, moe_d_ff=d.moe_d_ff or None,
        n_shared_experts=d.n_shared_experts, moe_capacity_factor=d.moe_capacity_factor,
        moe_aux_loss_coef=d.moe_aux_loss_coef,
        bos_token_id=getattr(tokenizer, "bos_id", None), eos_token_id=getattr(tokenizer, "eos_id", None),
        pad_token_id=getattr(tokenizer, "pad_id", None),
    )


def count_params(model: Transformer) -> dict:
    """Total and active-per-token parameters (MoE: only k routed experts count as active)."""
    total = model.num_parameters()
    cfg = model.cfg
    embed = cfg.vocab_size * cfg.d_model
    active = total
    if cfg.is_moe:
        per_expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters())
        active = total - cfg.n_layers * per_expert * (cfg.n_experts - cfg.n_experts_per_token)
    head = 0 if cfg.tie_embeddings else embed
    return {"total": total, "active": active, "active_non_embedding": active - embed - head}


def flops_per_token(cfg: Config, active_non_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (active non-embedding params + output head) + attention
    (12 * layers * heads * head_dim * seq_len, PaLM's estimate; causal halves it in practice)."""
    head = cfg.vocab_size * cfg.d_model
    return 6 * (active_non_embedding + head) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


# -- data -------------------------------------------------------------------------------------
class TokenBatches(BatchSource):
    """[rows, seq_len + 1] LongTensors of windows from a token stream (see the module docstring)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise LmforgeError(f"training data has {len(tokens)} tokens: fewer than one batch of {batch_size} x {seq_len + 1}")
        self.epoch, self.index = 0, 0
        self._order = None

    def order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            self._order = torch.randperm(self.n_windows, generator=g)
        return self._order

    def global_windows(self) -> list[int]:
        """The window ids of the next global micro-batch (advances the position)."""
        if self.batch_size % self.world_size:
            raise LmforgeError(f"data.batch_size ({self.batch_size}) must divide by the number of processes ({self.world_size})")
        out = []
        for _ in range(self.batch_size):
            if self.index >= self.n_windows:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
            out.append(int(self.order()[self.index]))
            self.index += 1
        return out

    def rank_windows(self, windows: list[int]) -> list[int]:
        per = self.batch_size // self.world_size
        return windows[self.rank * per:(self.rank + 1) * per]

    def next_batch(self) -> torch.Tensor:
        mine = self.rank_windows(self.global_windows())
        T = self.seq_len
        rows = [np.asarray(self.tokens.read(w * T, T + 1), dtype=np.int64) for w in mine]
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def expand_path(p: str) -> Path:
    from lmforge.paths import lmforge_home

    p = p.replace("$LMFORGE_HOME", str(lmforge_home())).replace("${LMFORGE_HOME}", str(lmforge_home()))
    return Path(os.path.expandvars(os.path.expanduser(p)))


def read_heldout(path: str, tokenizer, eos_id: int, max_bytes: int = 0) -> tuple[torch.Tensor, int, list[str]]:
    """(token stream with EOS after each file, UTF-8 bytes of the text, files) of held-out text."""
    root = expand_path(path)
    if not root.exists():
        raise LmforgeError(f"held-out text not found: {root} (run `lmforge fetch` or set data.heldout)")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".text"))
    if not files:
        raise LmforgeError(f"no .txt files under {root}")
    ids, nbytes, used = [], 0, []
    for f in files:
        text = f.read_text(encoding="utf-8")
        b = len(text.encode("utf-8"))
        if max_bytes and used and nbytes + b > max_bytes:
            break
        ids.extend(tokenizer.encode(text, add_bos=False) + [eos_id])
        nbytes += b
        used.append(str(f))
    return torch.tensor(ids, dtype=torch.long), nbytes, used


@torch.no_grad()
def stream_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int) -> tuple[float, int]:
    """(sum of next-token losses in nats, number of predicted tokens) over a token stream, in
    windows of seq_len + 1 tokens with stride seq_len (every token but the first is predicted once)."""
    device = next(model.parameters()).device
    starts = list(range(0, max(len(tokens) - 1, 0), seq_len))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = [tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for j, c in enumerate(chunk):
            ids[j, :len(c)] = c
            mask[j, :len(c)] = True
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids[:, :-1]).float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        m = mask[:, 1:].reshape(-1)
        total += float(losses[m].sum())
        count += int(m.sum())
    return total, count


def heldout_bits_per_byte(model, tokens: torch.Tensor, nbytes: int, seq_len: int, batch_size: int) -> tuple[float, float]:
    """(loss in nats per token, bits per byte) of held-out text from `read_heldout`."""
    s, c = stream_loss(model, tokens, seq_len, batch_size)
    return s / c, s / c * len(tokens) / (nbytes * math.log(2))


# -- the run ----------------------------------------------------------------------------------
def _print(msg: str) -> None:
    if dist_info().is_main:
        print(msg, flush=True)


def build_model(cfg: PretrainConfig, tokenizer, vocab_size: int):
    """(model, resolved dials): fresh weights from the dials, or `init_from`'s weights."""
    if cfg.init_from:
        from lmforge.loading import load_model

        model, _ = load_model(cfg.init_from, dtype="fp32")
        if model.cfg.vocab_size != vocab_size:
            raise LmforgeError(f"init_from model has vocab {model.cfg.vocab_size}, the data {vocab_size}")
        mc = model.cfg
        if mc.max_seq_len < cfg.data.seq_len:
            raise LmforgeError(f"init_from model's context ({mc.max_seq_len}) is shorter than data.seq_len ({cfg.data.seq_len})")
        dials = ModelDials(depth=mc.n_layers, d_model=mc.d_model, head_dim=mc.head_dim, n_heads=mc.n_heads,
                           n_kv_heads=mc.n_kv_heads, d_ff=mc.d_ff, tie_embeddings=mc.tie_embeddings,
                           rope_theta=mc.rope_theta, init_std=mc.init_std, n_experts=mc.n_experts,
                           n_experts_per_token=mc.n_experts_per_token, moe_d_ff=mc.moe_d_ff or 0,
                           n_shared_experts=mc.n_shared_experts, moe_capacity_factor=mc.moe_capacity_factor,
                           moe_aux_loss_coef=mc.moe_aux_loss_coef)
        _print(f"init_from {cfg.init_from}: model dials taken from it (the recipe's are ignored)")
        return model.train(), dials
    dials = resolve_dials(cfg.model)
    mcfg = model_config(dials, vocab_size, cfg.data.seq_len, tokenizer)
    model = Transformer(mcfg).init_weights(seed=cfg.train.seed)
    return model, dials


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Build the model and data from `cfg` and train; returns the trainer's result dict."""
    from lmforge.data.prepare import open_prepared
    from lmforge.loading import load_tokenizer
    from lmforge.train.losses import lm_loss

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not cfg.data.dir:
        raise LmforgeError("data.dir is required: a folder made by `lmforge data prepare`")
    data_dir = expand_path(cfg.data.dir)
    tok_spec = cfg.tokenizer or (data_dir / "tokenizer")
    tokenizer = load_tokenizer(str(expand_path(str(tok_spec))))
    data = open_prepared(data_dir, tokenizer=tokenizer)
    # A base model has no chat format yet (SFT gives it one), so its checkpoints carry no
    # template and `lmforge chat` runs it as plain completion.
    tokenizer = dataclasses.replace(tokenizer, chat_template=None)
    vocab = max(data.vocab_size, tokenizer.vocab_size)
    model, dials = build_model(cfg, tokenizer, vocab)
    resolved = dataclasses.replace(cfg, model=dials)
    counts = count_params(model)
    T = cfg.data.seq_len
    fpt = flops_per_token(model.cfg, counts["active_non_embedding"], T)
    di = dist_info(cfg.train.device)
    tokens_per_step = cfg.data.batch_size * T * cfg.train.grad_accum
    _print(f"model: {dials.depth} layers, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads "
           f"({model.cfg.n_kv_heads} kv), d_ff {model.cfg.d_ff}"
           + (f", {model.cfg.n_experts} experts top-{model.cfg.n_experts_per_token} (d_ff {model.cfg.moe_d_ff})" if model.cfg.is_moe else "")
           + f"; {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active)")
    _print(f"data: {len(data.train):,} train tokens, {len(data.val):,} val tokens; {tokens_per_step:,} tokens/step "
           f"on {di.world_size} process(es); {cfg.train.max_steps} steps = {cfg.train.max_steps * tokens_per_step / max(len(data.train), 1):.2f} epochs")

    batches = TokenBatches(data.train, cfg.data.batch_size, T, seed=cfg.data.seed)
    val_tokens = None
    if cfg.data.eval_tokens > 0 and len(data.val) > 1:
        n = min(cfg.data.eval_tokens + 1, len(data.val))
        val_tokens = torch.from_numpy(np.asarray(data.val.read(0, n), dtype=np.int64))
    heldout = None
    if cfg.data.heldout:
        h_tokens, h_bytes, h_files = read_heldout(cfg.data.heldout, tokenizer, data.eos_id, cfg.data.heldout_max_bytes)
        heldout = (h_tokens, h_bytes)
        _print(f"held-out: {len(h_files)} files, {h_bytes:,} bytes, {len(h_tokens):,} tokens")
    eval_bs = max(1, cfg.data.batch_size // max(di.world_size, 1))

    def eval_fn(m) -> dict:
        out = {}
        if val_tokens is not None:
            s, c = stream_loss(m, val_tokens, T, eval_bs)
            out["val_loss"] = s / c
            # bits per byte with the val split's own tokens-per-byte ratio (the prefix is a sample of it)
            out["val_bpb"] = data.bits_per_byte(s / c, "val")
        if heldout is not None:
            out["heldout_loss"], out["heldout_bpb"] = heldout_bits_per_byte(m, heldout[0], heldout[1], T, eval_bs)
        return out

    def sample_fn(m):
        if not cfg.sample_prompt or cfg.sample_tokens <= 0:
            return None
        from lmforge.engine import SamplingParams, generate_text

        ids = tokenizer.encode(cfg.sample_prompt, add_bos=False) or [data.eos_id]
        p = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, seed=1234)
        res = generate_text(m, tokenizer, [ids], p)[0]
        return {"prompt": cfg.sample_prompt, "text": cfg.sample_prompt + res["text"]}

    t0 = time.time()
    result = train(model, lm_loss, batches, cfg.train, expand_path(cfg.out), eval_fn=eval_fn, sample_fn=sample_fn,
                   tokenizer=tokenizer, config=resolved, flops_per_token=fpt)
    result.update(params=counts, flops_per_token=fpt, tokens_per_step=tokens_per_step, wall_s=time.time() - t0)
    return result
