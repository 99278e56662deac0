"""Batch-1 decode speed on a GPU: lmforge (CUDA graphs, and the eager fast path) against
`transformers` `generate`, on the same random-weight model in the same run.

    python benchmarks/decode_gpu.py [--device cuda] [--dtype bf16] [--prompt-tokens 128]
                                    [--new-tokens 256] [--repeat 3] [--out PATH]
    python benchmarks/decode_gpu.py --device cpu --small   # a quick proof of the script

The model has SmolLM2-135M's shape (30 layers, d_model 576, 9 heads, 3 kv heads, d_ff 1536,
vocab 49152, tied embeddings, rope_theta 100000) with transformers' random initialisation
(nothing is downloaded); `--small` is a tiny one. The transformers model is built first and
lmforge takes its state dict as is (the keys are the same).

Cases, each after one warm-up run, median of --repeat runs, greedy, batch 1, random prompt ids,
exactly --new-tokens new tokens (transformers: min_new_tokens; lmforge: no stop ids):
- transformers: `generate` (its default dynamic KV cache);
- lmforge/graphs: `lmforge.engine.generate_tokens` (FastDecoder, decode steps on CUDA graphs);
- lmforge/eager: the same with LMFORGE_CUDA_GRAPHS=0 (FastDecoder's eager steps).
tokens/s = new tokens / wall time from the call to the last token (prefill included);
decode tokens/s leaves out the first token (prefill). Acceptance: lmforge/graphs tokens/s >= 3x
transformers.

Correctness, same run: how many of the first 32 greedy tokens agree with transformers' (bf16
may diverge eventually: one flipped near-tie changes everything after it), and a
teacher-forced check: prompt + 32 random ids through both models, top-1 agreement and max
|logit difference| per position (lmforge's steps through the graph decoder).
Writes JSON to --out (default benchmarks/results/decode_gpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmforge.engine import SamplingParams, generate_tokens  # noqa: E402
from lmforge.fast.cuda_graph import GraphDecoder, graph_decoder_for  # noqa: E402
from lmforge.fast.decode import fast_decoder_for  # noqa: E402
from lmforge.loading.hf import config_from_hf  # noqa: E402
from lmforge.loading.load import build_model  # noqa: E402
from lmforge.provenance import git_commit  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "decode_gpu.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_RATIO = 3.0
CHECK_TOKENS = 32
DEFAULTS = {"prompt_tokens": 128, "new_tokens": 256, "repeat": 3}
SMALL_DEFAULTS = {"prompt_tokens": 32, "new_tokens": 64, "repeat": 1}  # --small: a quick CPU proof


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (32 with --small)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (64 with --small)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 3; 1 with --small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="a tiny model (proves the script on a CPU)")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    defaults = SMALL_DEFAULTS if args.small else DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -- models -------------------------------------------------------------------------------
def hf_config(small: bool):
    from transformers import LlamaConfig

    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3)
    if small:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**shape, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def build_models(args, device: torch.device):
    """(transformers model, lmforge model) sharing one set of random weights in --dtype."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    # _from_config(dtype=...) is how from_pretrained builds: RoPE's inv_freq stays fp32
    hf = LlamaForCausalLM._from_config(hf_config(args.small), dtype=DTYPES[args.dtype]).to(device).eval()
    cfg = config_from_hf(hf.config.to_dict())
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    lm = build_model(cfg, state, device)  # takes the tensors as they are: no copy
    return hf, lm


# -- timing -------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate(hf, ids: torch.Tensor, new: int) -> list[int]:
    out = hf.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=hf.config.eos_token_id)
    return out[0, ids.shape[0] :].tolist()


def time_hf(hf, ids, new, device) -> dict:
    def timed(n):
        sync(device)
        t = time.perf_counter()
        toks = hf_generate(hf, ids, n)
        sync(device)
        return time.perf_counter() - t, toks

    return {"run": lambda: timed(new), "first": lambda: timed(1)[0]}


def time_lmforge(lm, ids, new, device) -> dict:
    prompt = ids.tolist()
    params = SamplingParams(max_new_tokens=new, stop_ids=set())

    def run():
        toks, first = [], None
        sync(device)
        t = time.perf_counter()
        for _, tok in generate_tokens(lm, [prompt], params):  # each token is read on the host
            if first is None:
                first = time.perf_counter() - t
            toks.append(tok)
        sync(device)
        return time.perf_counter() - t, toks, first

    return run


def measure(run, new: int, repeat: int, device, first_token=None) -> dict:
    """Warm-up once, then the median of `repeat` runs; peak device memory over them."""
    run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, firsts, toks = [], [], None
    for _ in range(repeat):
        out = run()
        times.append(out[0])
        toks = out[1]
        firsts.append(out[2] if len(out) > 2 else first_token())
    sec, ttft = statistics.median(times), statistics.median(firsts)
    assert len(toks) == new, f"{len(toks)} tokens, expected {new}"
    res = {"seconds": round(sec, 4), "tokens_per_s": round(new / sec, 1), "first_token_s": round(ttft, 4),
           "decode_tokens_per_s": round((new - 1) / max(sec - ttft, 1e-9), 1), "tokens": toks}
    if device.type == "cuda":
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return res


def graphs_in_use(lm) -> bool:
    fast = fast_decoder_for(lm)
    g = None if fast is None else fast.__dict__.get("_graph_decoder")
    return bool(g is not None and g.graphs)


# -- correctness --------------------------------------------------------------------------
def agreement(a: list[int], b: list[int], n: int = CHECK_TOKENS) -> dict:
    """Of the first n greedy tokens: equal positions, the equal prefix, and how many distinct
    tokens there are (random weights often repeat one token, which makes agreement easy)."""
    a, b = a[:n], b[:n]
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"same_position": sum(x == y for x, y in zip(a, b)), "same_prefix": prefix, "of": n, "distinct_tokens": len(set(a))}


@torch.inference_mode()
def teacher_forced(hf, lm, ids: torch.Tensor, cont: list[int]) -> dict:
    """The same tokens through both: transformers' full forward against lmforge's prefill + one
    graph-decoder step per token (eager steps off CUDA). `cont` is random ids, so every step
    sees a new token, whatever the free-running greedy output does."""
    seq = torch.cat([ids, torch.tensor(cont, device=ids.device)])
    ref = hf(seq[None]).logits[0, ids.shape[0] - 1 :].float()
    fast = fast_decoder_for(lm)
    g = graph_decoder_for(fast) if ids.device.type == "cuda" else GraphDecoder(fast, use_graphs=False)
    g.begin(seq.shape[0])
    got = [fast.forward(ids)]
    got += [g.step(t).clone() for t in cont]  # the step's logits buffer is reused: copy it
    got = torch.cat(got)
    diff = (got - ref).abs().max(-1).values
    return {"positions": len(got), "top1_agree": int((got.argmax(-1) == ref.argmax(-1)).sum()),
            "max_abs_logit_diff": round(float(diff.max()), 4), "median_abs_logit_diff": round(float(diff.median()), 4),
            "logit_std": round(float(ref.std()), 4)}


# -- report -------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "commit": git_commit()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def table(cases: dict, base: float) -> str:
    rows = [f"{'case':<22}{'tok/s':>9}{'decode tok/s':>14}{'first tok s':>13}{'x transformers':>16}{'peak GPU MB':>13}"]
    for name, r in cases.items():
        peak = r.get("peak_gpu_mb", "-")
        rows.append(f"{name:<22}{r['tokens_per_s']:>9}{r['decode_tokens_per_s']:>14}{r['first_token_s']:>13}"
                    f"{r['tokens_per_s'] / base:>16.2f}{peak:>13}")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    hf, lm = build_models(args, device)
    vocab = hf.config.vocab_size
    ids = torch.randint(vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    new = args.new_tokens
    os.environ["LMFORGE_FAST"] = "1"
    cases = {}
    h = time_hf(hf, ids, new, device)
    cases["transformers"] = measure(h["run"], new, args.repeat, device, first_token=h["first"])
    os.environ["LMFORGE_CUDA_GRAPHS"] = "1"
    cases["lmforge/graphs"] = measure(time_lmforge(lm, ids, new, device), new, args.repeat, device)
    used = graphs_in_use(lm)
    cases["lmforge/graphs"]["backend"] = "cuda-graph" if used else "eager (no CUDA)"
    os.environ["LMFORGE_CUDA_GRAPHS"] = "0"
    cases["lmforge/eager"] = measure(time_lmforge(lm, ids, new, device), new, args.repeat, device)
    cases["lmforge/eager"]["backend"] = "eager"
    os.environ["LMFORGE_CUDA_GRAPHS"] = "1"
    if device.type == "cuda" and not used:
        print("WARNING: the CUDA graph decoder did not run on CUDA", file=sys.stderr)

    cont = torch.randint(vocab, (CHECK_TOKENS,), generator=torch.Generator().manual_seed(args.seed + 2)).tolist()
    base = cases["transformers"]["tokens_per_s"]
    hf_toks = cases["transformers"]["tokens"]
    checks = {
        "graphs_vs_transformers": agreement(cases["lmforge/graphs"]["tokens"], hf_toks),
        "eager_vs_transformers": agreement(cases["lmforge/eager"]["tokens"], hf_toks),
        "graphs_vs_eager": agreement(cases["lmforge/graphs"]["tokens"], cases["lmforge/eager"]["tokens"]),
        "teacher_forced": teacher_forced(hf, lm, ids, cont),
    }
    ratio = cases["lmforge/graphs"]["tokens_per_s"] / base
    result = {
        "benchmark": "decode_gpu",
        "device": str(device), "dtype": args.dtype, "small": args.small,
        "model": {k: getattr(hf.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")},
        "prompt_tokens": args.prompt_tokens, "new_tokens": new, "repeat": args.repeat,
        "machine": machine(device),
        "cases": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in cases.items()},
        "ratio_graphs_to_transformers": round(ratio, 2),
        "ratio_eager_to_transformers": round(cases["lmforge/eager"]["tokens_per_s"] / base, 2),
        "acceptance": {"target_ratio": TARGET_RATIO, "pass": bool(used and ratio >= TARGET_RATIO)},
        "checks": checks,
        "first_tokens": {k: v["tokens"][:CHECK_TOKENS] for k, v in cases.items()},
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(table(cases, base))
    print(f"lmforge/graphs = {ratio:.2f}x transformers (target {TARGET_RATIO}x, backend {cases['lmforge/graphs']['backend']})")
    for name, c in checks.items():
        print(f"{name}: {c}")
    print(f"load average before {load_before}, after {result['load_average_after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
