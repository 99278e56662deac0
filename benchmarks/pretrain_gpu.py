"""Pretraining throughput of the gpu-gpt2-small shape against `transformers` in the same run,
and the loss of the GPU path against the CPU path on the same data.

    python benchmarks/pretrain_gpu.py [--device cuda] [--batch 32] [--seq-len 1024] [--steps 20]
                                      [--out benchmarks/results/pretrain_gpu.json] [--small]

Shape: 12 layers x 768 (12 heads, d_ff 2048), a 32,768-token vocabulary, tied embeddings,
bf16 autocast, fused AdamW, random tokens (the recipe recipes/pretrain/gpu-gpt2-small.yaml).
- lmforge: the real trainer (`lmforge.train.train` with `lm_loss`, `compile: true`), the numbers
  read from its own metrics.jsonl (tokens/s of the windows after the first, which holds the
  compilation); `--whole-model` adds the variant that compiles the model as one graph.
- reference: `transformers` LlamaForCausalLM with the same config, `torch.compile`d, the same
  optimizer and autocast; 4 warm-up steps, then `--steps` timed ones.
- parity: lmforge on CUDA (bf16, compiled and eager) against lmforge on the CPU (fp32) on the
  first steps of the same data and the same initial weights.
MFU = tokens/s x (6 x params + 12 x layers x d_model x seq_len) / 989 TFLOP/s (H100/H200 bf16
dense). `--small` shrinks everything so the script runs on a CPU in seconds (a dry run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.model import Config, Transformer
from lmforge.train import ListBatches, TrainConfig, read_metrics, train
from lmforge.train.losses import lm_loss

RESULT = Path(__file__).parent / "results" / "pretrain_gpu.json"
PEAK = 989e12


def shape(small: bool) -> dict:
    if small:
        return dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128)
    return dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048)


def flops_per_token(s: dict, params: int, seq_len: int) -> float:
    return 6 * params + 12 * s["n_layers"] * s["d_model"] * seq_len


def token_rows(vocab: int, n: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, width), generator=g))


def lmforge_model(s: dict, seq_len: int) -> Transformer:
    return Transformer(Config(**s, max_seq_len=seq_len, tie_embeddings=True)).init_weights(seed=0)


def run_lmforge(s, rows, batch, steps, device, dtype, compile_, log_every, whole=False, hooks=None) -> dict:
    """Train with lmforge's trainer; returns its metrics records and the wall time."""
    from lmforge.train import TrainHooks

    model = lmforge_model(s, rows[0].numel() - 1)
    if whole:  # the one-graph variant: compile the model ourselves, the trainer then skips it
        model.compile()
    cfg = TrainConfig(lr=6e-4, warmup_steps=2, max_steps=steps, dtype=dtype, compile=compile_ and not whole,
                      device=device, log_every=log_every, keep_last=1, grad_clip=1.0, weight_decay=0.1)
    fpt = flops_per_token(s, model.num_parameters(), rows[0].numel() - 1)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        train(model, lm_loss, ListBatches(rows, batch, collate=torch.stack, shuffle=False), cfg, d,
              progress=False, save_fn=lambda m, p: None, flops_per_token=fpt, hooks=hooks or TrainHooks())
        wall = time.time() - t0
        recs = [r for r in read_metrics(Path(d) / "metrics.jsonl") if "loss" in r]
    return {"records": recs, "wall_s": wall, "params": model.num_parameters(), "flops_per_token": fpt}


def steady(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs[1:] if key in r] or [r[key] for r in recs if key in r]
    return statistics.median(vals) if vals else None


def run_transformers(s, rows, batch, steps, device, compile_) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                         num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                         num_key_value_heads=s["n_kv_heads"], max_position_embeddings=rows[0].numel(),
                         tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).to(device)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.startswith("cuda"))
    fwd = torch.compile(model) if compile_ else model
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

    def step(i):
        x = torch.stack(rows[(i * batch) % len(rows):][:batch])[:, :-1].to(device, non_blocking=True)
        with ctx:
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.time()
    for i in range(4):
        step(i)
    sync()
    warm = time.time() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(steps):
        loss = step(4 + i)
    float(loss.detach())
    sync()
    dt = time.time() - t0
    tps = steps * batch * (rows[0].numel() - 1) / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del model, opt, fwd
    return {"tokens_per_s": tps, "warmup_s": warm, "params": params, "peak_mem_gb": peak}


def profile(s, rows, batch, device) -> list[dict]:
    """The CUDA kernels that take the time in lmforge's training step (3 profiled steps)."""
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    from lmforge.train import TrainHooks

    cuda = device.startswith("cuda")
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU],
                       schedule=schedule(wait=2, warmup=1, active=3)) as prof:
        run_lmforge(s, rows, batch, 6, device, "bf16", cuda, 100, hooks=TrainHooks(after_step=lambda step: prof.step()))
    rows_out = []
    total = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    for e in sorted(prof.key_averages(), key=lambda e: -total(e))[:20]:
        rows_out.append({"kernel": e.key[:90], "ms_per_step": total(e) / 3 / 1000, "calls_per_step": e.count / 3})
    return rows_out


def loss_parity(s, device, small) -> dict:
    """Per-step losses of the same weights and data: CPU fp32 vs GPU bf16 (eager, small batch),
    and GPU compiled vs GPU eager at the benchmark's batch."""
    B, T, n = (4, 256, 4) if not small else (2, 32, 3)
    rows = token_rows(s["vocab_size"], B * n, T + 1, seed=1)
    cpu = [r["loss"] for r in run_lmforge(s, rows, B, n, "cpu", "fp32", False, 1)["records"]]
    dev = [r["loss"] for r in run_lmforge(s, rows, B, n, device, "bf16", False, 1)["records"]]
    return {"batch": [B, T], "cpu_fp32": cpu, f"{device}_bf16": dev,
            "max_abs_diff": max(abs(a - b) for a, b in zip(cpu, dev))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--whole-model", action="store_true", help="also time lmforge with one whole-model graph")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernels that take the time in a step")
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    if a.small:
        a.batch, a.seq_len, a.steps = 4, 32, 6
    if a.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    s = shape(a.small)
    compile_ = a.device.startswith("cuda")
    rows = token_rows(s["vocab_size"], a.batch * (a.steps + 4), a.seq_len + 1)
    out = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "shape": s, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps,
           "commit": os.environ.get("LMFORGE_COMMIT", ""), "loadavg_before": os.getloadavg()}
    table = []
    if not a.no_reference:
        ref = run_transformers(s, rows, a.batch, a.steps, a.device, compile_)
        ref["mfu"] = ref["tokens_per_s"] * flops_per_token(s, ref["params"], a.seq_len) / PEAK
        out["transformers_compiled" if compile_ else "transformers_eager"] = ref
        table.append(("transformers LlamaForCausalLM" + (" compiled" if compile_ else ""), ref["tokens_per_s"], ref["mfu"], ref["peak_mem_gb"]))
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    variants = [("lmforge (trainer, regional compile)" if compile_ else "lmforge (trainer, eager)", False)]
    if a.whole_model and compile_:
        variants.append(("lmforge (trainer, whole-model compile)", True))
    for name, whole in variants:
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        res = run_lmforge(s, rows, a.batch, a.steps + 4, a.device, "bf16", compile_, 4, whole=whole)
        tps = steady(res["records"], "tokens_per_s")
        row = {"tokens_per_s": tps, "mfu": tps * res["flops_per_token"] / PEAK, "wall_s": res["wall_s"],
               "peak_mem_gb": steady(res["records"], "peak_mem_gb"), "losses": [r["loss"] for r in res["records"]],
               "params": res["params"]}
        out[name] = row
        table.append((name, tps, row["mfu"], row["peak_mem_gb"]))
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out["parity"] = loss_parity(s, a.device, a.small)
    if a.profile:
        try:
            out["profile"] = profile(s, rows, a.batch, a.device)
        except Exception as e:  # a profiler problem must not lose the measurements above
            print(f"profile failed: {type(e).__name__}: {e}")
    out["loadavg_after"] = os.getloadavg()
    ref_tps = table[0][1] if not a.no_reference else None
    print(f"\npretraining, {s['n_layers']} layers x {s['d_model']}, vocab {s['vocab_size']}, {a.batch} x {a.seq_len} tokens, "
          f"bf16, {out['device']}, load {out['loadavg_before'][0]:.2f}")
    print(f"{'what':44s} {'tokens/s':>10s} {'MFU':>7s} {'peak GiB':>9s} {'vs reference':>12s}")
    for name, tps, mfu, mem in table:
        ratio = f"{tps / ref_tps:.2f}x" if ref_tps else "-"
        print(f"{name:44s} {tps:10.0f} {mfu * 100:6.1f}% {mem if mem is not None else float('nan'):9.1f} {ratio:>12s}")
    if ref_tps:
        out["ratio_vs_transformers"] = {name: tps / ref_tps for name, tps, _, _ in table[1:]}
    p = out["parity"]
    print(f"loss parity (first {len(p['cpu_fp32'])} steps, batch {p['batch']}): cpu fp32 {['%.4f' % x for x in p['cpu_fp32']]} "
          f"vs {a.device} bf16 {['%.4f' % x for x in p[f'{a.device}_bf16']]}: max |diff| {p['max_abs_diff']:.4f}")
    for r in out.get("profile", []):
        print(f"  {r['ms_per_step']:8.2f} ms/step {r['calls_per_step']:6.0f}x  {r['kernel']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
