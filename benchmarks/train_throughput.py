"""Training tokens/s and model FLOPs utilisation: dense vs MoE at equal active parameters.

    python benchmarks/train_throughput.py [--depth 4] [--aspect-ratio 64] [--seq-len 256] [--batch 8]
                                          [--experts 8 --top-k 2] [--steps 6] [--dtype fp32|bf16] [--no-reference]

Each model trains with lmforge's trainer on random tokens (optimizer step included; the first
step, warm-up, is not timed). The MoE model has `experts` experts of hidden size d_ff / top_k,
so a token runs through the same number of MLP weights as in the dense model; only the router
and the routing work are extra. FLOPs per token are 6 x active non-embedding params + 6 x output
head + attention (lmforge.train.pretrain.flops_per_token). MFU divides the achieved model FLOP/s
by the peak of this machine measured in the same run: the best of large square matmuls in the
training dtype. `transformers`' LlamaForCausalLM / MixtralForCausalLM with the same shapes and
the same optimizer are the references in the same run (skip with --no-reference).
Writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.model import Transformer
from lmforge.train import BatchSource, TrainConfig, train
from lmforge.train.losses import lm_loss
from lmforge.train.pretrain import ModelDials, count_params, flops_per_token, model_config, resolve_dials

RESULT = Path(__file__).parent / "results" / "train_throughput.json"


class RandomTokens(BatchSource):
    def __init__(self, vocab: int, batch: int, seq_len: int):
        self.g = torch.Generator().manual_seed(0)
        self.vocab, self.batch, self.seq_len = vocab, batch, seq_len

    def next_batch(self):
        return torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=self.g)


def peak_matmul_flops(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def time_lmforge(model, args, device) -> float:
    """Tokens/s over the timed steps (all but the first) of a real `train` call."""
    src = RandomTokens(model.cfg.vocab_size, args.batch, args.seq_len)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=args.steps, log_every=1, dtype=args.dtype,
                      device=device, compile=args.compile)
    with tempfile.TemporaryDirectory() as d:
        res = train(model, lm_loss, src, cfg, d, progress=False, save_fn=lambda m, p: None)
    recs = res["history"][1:]
    return sum(r["tokens_per_s"] for r in recs) / len(recs)


def time_hf(hf_model, args, device) -> float:
    """The same loop by hand around a transformers model: forward, loss, backward, clip, AdamW."""
    hf_model.to(device).train()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    src = RandomTokens(hf_model.config.vocab_size, args.batch, args.seq_len)
    ac = torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bf16" else torch.autocast(device, enabled=False)
    rates = []
    for i in range(args.steps):
        batch = src.next_batch().to(device)
        t = time.perf_counter()
        with ac:
            logits = hf_model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            rates.append(args.batch * args.seq_len / (time.perf_counter() - t))
    return sum(rates) / len(rates)


def hf_twin(model, device):
    """A transformers model with our weights (through save_hf + from_pretrained)."""
    import transformers

    from lmforge.loading import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, None, d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tdtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = peak_matmul_flops(tdtype, device)

    dense_d = resolve_dials(ModelDials(depth=args.depth, aspect_ratio=args.aspect_ratio))
    moe_d = resolve_dials(ModelDials(depth=args.depth, aspect_ratio=args.aspect_ratio, n_experts=args.experts,
                                     n_experts_per_token=args.top_k))
    rows = []
    for name, dials in (("dense", dense_d), (f"moe-{args.experts}x-top{args.top_k}", moe_d)):
        cfg = model_config(dials, args.vocab, args.seq_len)
        torch.manual_seed(0)
        model = Transformer(cfg).init_weights(seed=0)
        counts = count_params(model)
        fpt = flops_per_token(cfg, counts["active_non_embedding"], args.seq_len)
        ref_rate = None
        if not args.no_reference:
            ref_rate = time_hf(hf_twin(model, device), args, device)
        rate = time_lmforge(model, args, device)
        row = {
            "model": name, "params_total": counts["total"], "params_active": counts["active"],
            "params_active_non_embedding": counts["active_non_embedding"], "flops_per_token": fpt,
            "tokens_per_s": round(rate, 1), "model_tflops": round(rate * fpt / 1e12, 4), "mfu": round(rate * fpt / peak, 4),
        }
        if ref_rate is not None:
            row.update(transformers_tokens_per_s=round(ref_rate, 1), vs_transformers=round(rate / ref_rate, 3))
        rows.append(row)

    print(f"device {device}, dtype {args.dtype}, peak matmul {peak / 1e12:.3f} TFLOP/s (measured), "
          f"batch {args.batch} x {args.seq_len}, d_model {dense_d.d_model}, {args.depth} layers, vocab {args.vocab}")
    hdr = f"{'model':<16} {'params':>9} {'active':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'HF tok/s':>9} {'ratio':>6}"
    print(hdr)
    for r in rows:
        print(f"{r['model']:<16} {r['params_total'] / 1e6:>8.2f}M {r['params_active'] / 1e6:>8.2f}M {r['tokens_per_s']:>9.0f} "
              f"{r['model_tflops']:>8.4f} {r['mfu']:>6.1%} {r.get('transformers_tokens_per_s', float('nan')):>9.0f} "
              f"{r.get('vs_transformers', float('nan')):>6.2f}")
    from lmforge.tokenizer_train import run_metadata

    result = {**run_metadata(), "device": device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
              "load_average_1min": round(os.getloadavg()[0], 2), "peak_matmul_flops": peak,
              "shape": {"depth": args.depth, "d_model": dense_d.d_model, "d_ff": dense_d.d_ff, "moe_d_ff": moe_d.moe_d_ff,
                        "experts": args.experts, "top_k": args.top_k, "vocab": args.vocab, "seq_len": args.seq_len,
                        "batch": args.batch, "steps_timed": args.steps - 1},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
