"""Finetuning cost on the default model: tokens/s and peak memory of full vs LoRA vs QLoRA,
with TRL's SFTTrainer + PEFT LoRA (r=16, all-linear) as the reference when TRL is installed.

LoRA runs as `lmforge sft --method lora` does by default: `--dtype auto`, a bf16 frozen base
where bf16 is fast (`lmforge.finetune.sft.base_dtype`), fp32 adapters and optimizer; a row with
the fp32 base sits beside it. The targets are checked on the default LoRA against full
finetuning (fp32 master weights), both with the same memory savers.

Every configuration runs in its own process (so peak memory is its own), on the same chat data,
batch size, sequence length, number of steps and threads:

    python benchmarks/sft_memory.py                      # batch 8 x up to 256 tokens, 5 steps
    python benchmarks/sft_memory.py --steps 4 --no-trl   # quicker

Peak memory is the process's peak resident set (VmHWM) during the training steps: it is reset
after the model is loaded and prepared (`/proc/self/clear_refs`), so it counts the weights plus
what training adds (gradients, optimizer state, activations), not the loading. Tokens/s counts
the real (non-padding) input tokens per step, over the steps after the first (warm-up).
Results: a table, and benchmarks/results/sft_memory.json (rewritten after every configuration;
`complete` says whether all of them ran).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see sft_demo.py: shared machine, no spinning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


# -- data ---------------------------------------------------------------------------------------
def make_records(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats (~150-250 tokens): the demo's persona task, several rounds per chat."""
    import random

    from sft_demo import PERSONA, WORDS, rule

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": PERSONA}]
        for _ in range(rng.randint(4, 6)):
            words = rng.sample(WORDS, rng.randint(4, 8))
            msgs += [{"role": "user", "content": " ".join(words)}, {"role": "assistant", "content": rule(words)}]
        out.append({"messages": msgs})
    return out


# -- memory -------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Free what can be freed, reset the peak-RSS mark; returns the current RSS in MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS") // 1024


def peak_mib() -> int:
    return _status_kb("VmHWM") // 1024


# -- workers ------------------------------------------------------------------------------------
def worker_lmforge(a) -> dict:
    import torch

    from lmforge.finetune.datasets import Example, tokenize_examples
    from lmforge.finetune.lora import LoraSettings
    from lmforge.finetune.sft import SFTBatches, base_dtype, make_sft_loss, prepare_model
    from lmforge.loading import load_model
    from lmforge.train import TrainConfig, train

    torch.manual_seed(0)
    parts = a.worker.split(":")  # lmforge:METHOD[:fp32base|:bf16base]; no suffix = the default (auto)
    method = parts[1]
    want = next((p[:-len("base")] for p in parts[2:] if p.endswith("base")), "auto")
    dtype = base_dtype(want, method, "cpu")  # what `lmforge sft --dtype auto` picks on this machine
    model, tok = load_model(a.model, dtype=dtype)
    records = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    rows, _ = tokenize_examples(tok, [Example(r["messages"], f"{a.data}:{i + 1}") for i, r in enumerate(records)], a.seq)
    params = prepare_model(model, method, LoraSettings(r=16, alpha=32, dropout=0.0, targets=["all-linear"]), "nf4")
    batches = SFTBatches(rows, a.batch, a.seq, tok.pad_id, pack=False, seed=0)
    cfg = TrainConfig(lr=1e-4, warmup_steps=0, max_steps=a.steps, schedule="constant", weight_decay=0.0,
                      dtype=a.dtype, activation_checkpointing=a.savers, log_every=1, save_every=0, seed=0)
    peak = {}

    def at_end(m):  # runs after the last step, before the final checkpoint is written
        peak["mib"] = peak_mib()
        return {}

    base = reset_peak()
    with tempfile.TemporaryDirectory() as run_dir:
        res = train(model, make_sft_loss(a.ce_chunk if a.savers else 0), batches, cfg, run_dir, params=params,
                    eval_fn=at_end, save_fn=lambda m, d: None, tokenizer=tok, progress=False)
    hist = [r for r in res["history"] if "tokens_per_s" in r]
    n_train = sum(p.numel() for p in {id(p): p for p in params}.values())
    return {**_rates(hist, peak.get("mib", peak_mib()), base, n_train), "weights_dtype": dtype}


def _rates(hist: list[dict], peak: int, base: int, n_train: int) -> dict:
    """Tokens/s over steps 2..N from the per-step records (cumulative tokens, elapsed seconds)."""
    first, last = hist[0], hist[-1]
    toks = last["tokens"] - first["tokens"]
    secs = last["elapsed_s"] - first["elapsed_s"]
    return {"tokens_per_s": round(toks / secs, 2), "step_s": round(secs / (len(hist) - 1), 2),
            "tokens_per_step": round(toks / (len(hist) - 1), 1), "peak_mib": peak, "rss_before_mib": base,
            "trainable_params": n_train}


def worker_trl(a) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    records = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    ds = datasets.Dataset.from_list(records)
    ckpt = a.worker.endswith("default")
    times, tokens, peak = [], [], {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                tokens.append((state.global_step, float(logs["num_tokens"])))

        def on_train_end(self, args, state, control, **kw):
            peak["mib"] = peak_mib()

    with tempfile.TemporaryDirectory() as out:
        kw = dict(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps, max_length=a.seq,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, learning_rate=1e-4,
                  lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, seed=0,
                  bf16=a.dtype == "bf16")
        if not ckpt:
            kw["gradient_checkpointing"] = False  # TRL's default is True (recompute in backward)
        trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
        base = reset_peak()
        trainer.train()
    steps = dict(tokens)
    # num_tokens is cumulative per logged step; rates over steps 2..N as for lmforge
    toks = steps[a.steps] - steps[1]
    secs = times[-1] - times[0]
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"tokens_per_s": round(toks / secs, 2), "step_s": round(secs / (len(times) - 1), 2),
            "tokens_per_step": round(toks / (a.steps - 1), 1), "peak_mib": peak.get("mib", peak_mib()),
            "rss_before_mib": base, "trainable_params": n_train,
            "gradient_checkpointing": trainer.args.gradient_checkpointing, "bf16": trainer.args.bf16}


# -- driver ---------------------------------------------------------------------------------------
def run_worker(spec: str, a, data: Path, hf_dir: Path | None, savers: bool, lean: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", spec, "--json", out, "--data", str(data), "--batch", str(a.batch),
           "--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads), "--dtype", a.dtype,
           "--ce-chunk", str(a.ce_chunk)]
    if savers:
        cmd.append("--savers")
    if lean:
        cmd.append("--lean")
    if hf_dir is not None:
        cmd += ["--hf-dir", str(hf_dir)]
    if a.model:
        cmd += ["--model", a.model]
    t = time.time()
    print(f"running {spec} (memory savers {'on' if savers else 'off'}{', lean malloc' if lean else ''}) ...", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads(Path(out).read_text())
    res["wall_s"] = round(time.time() - t, 1)
    os.unlink(out)
    print(f"  {res}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", help="autocast dtype for every configuration (fp32 | bf16)")
    ap.add_argument("--ce-chunk", type=int, default=128)
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "sft_memory.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--savers", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lean", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-lean", action="store_true", help="skip the runs with lmforge's lean_malloc allocator setting")
    a = ap.parse_args(argv)

    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        if a.lean:
            from lmforge.finetune.sft import lean_malloc

            lean_malloc()
        res = worker_trl(a) if a.worker.startswith("trl") else worker_lmforge(a)
        Path(a.json).write_text(json.dumps(res))
        return 0

    import importlib.util

    from lmforge.finetune.sft import base_dtype

    have_trl = not a.no_trl and importlib.util.find_spec("trl") is not None
    auto = base_dtype("auto", "lora", "cpu")
    lora_default = f"lora (default: {auto} base"  # + ", savers on)" / ", savers off)" / ...
    load_start = os.getloadavg()[0]
    runs: dict[str, dict] = {}

    def add(name: str, spec: str, data: Path, hf_dir: Path | None, savers: bool, lean: bool = False) -> None:
        runs[name] = run_worker(spec, a, data, hf_dir, savers, lean)
        # the JSON is rewritten after every configuration, so a cut-short session keeps what ran
        write_result(a, argv, runs, summarize(runs, lora_default), auto, load_start, complete=False)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_records(a.batch * (a.steps + 2))))
        hf_dir = None
        if have_trl:
            from lmforge.loading import load_model, save_hf

            m, tok = load_model(a.model)
            hf_dir = save_hf(m, tok, Path(tmp) / "hf")
            del m
        # the speed comparison with TRL first, back to back (the machine is shared): lmforge LoRA
        # as it runs by default (default base dtype, no recompute) against TRL with and without
        # its recompute
        add(f"{lora_default}, savers off)", "lmforge:lora", data, None, False)
        if have_trl:
            add("trl lora (no grad ckpt)", "trl:nockpt", data, hf_dir, False)
            add("trl lora (TRL defaults)", "trl:default", data, hf_dir, True)
        # the method comparison: same batch, length, autocast and memory savers (activation
        # checkpointing + chunked cross-entropy) for every method; each method's default weights
        add("full (savers on)", "lmforge:full", data, None, True)
        add(f"{lora_default}, savers on)", "lmforge:lora", data, None, True)
        add("lora (fp32 base, savers on)", "lmforge:lora:fp32base", data, None, True)
        add("qlora (savers on)", "lmforge:qlora", data, None, True)
        add("full (savers off)", "lmforge:full", data, None, False)
        if not a.no_lean:
            # glibc keeps freed transients in its arenas; lean_malloc returns them (see its docstring)
            add("full (savers on, lean malloc)", "lmforge:full", data, None, True, lean=True)
            add(f"{lora_default}, savers on, lean malloc)", "lmforge:lora", data, None, True, lean=True)
            add("qlora (savers on, lean malloc)", "lmforge:qlora", data, None, True, lean=True)
            if have_trl:
                add("trl lora (TRL defaults, lean malloc)", "trl:default", data, hf_dir, True, lean=True)

    ratios, checks = summarize(runs, lora_default)
    print(f"\n{'configuration':<50}{'tokens/s':>10}{'s/step':>9}{'peak MiB':>10}{'trainable':>14}")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<50}  error: {r['error']}")
            continue
        print(f"{name:<50}{r['tokens_per_s']:>10.1f}{r['step_s']:>9.2f}{r['peak_mib']:>10}{r['trainable_params']:>14,}")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    for k, c in checks.items():
        bound = f"<= {c['at_most']}" if "at_most" in c else f">= {c['at_least']}"
        print(f"target {k} {bound}: {c['value']} ({'met' if c['met'] else 'NOT met'})")
    write_result(a, argv, runs, (ratios, checks), auto, load_start, complete=True)
    print(f"wrote {a.result}")
    return 0


TARGETS = {"lora_over_full_peak_memory_at_most": 0.5, "lmforge_lora_over_trl_tokens_per_s_at_least": 1.5}


def summarize(runs: dict, lora_default: str) -> tuple[dict, dict]:
    """(ratios, target checks) from the runs so far; "lora" in a key is the default LoRA."""
    def get(name, key):
        return runs.get(name, {}).get(key)

    def ratio(num: str, den: str, key: str = "peak_mib", digits: int = 3):
        return round(get(num, key) / get(den, key), digits) if get(num, key) and get(den, key) else None

    pairs = {
        "lora_over_full_peak_memory_savers_on": (f"{lora_default}, savers on)", "full (savers on)"),
        "lora_fp32_base_over_full_peak_memory_savers_on": ("lora (fp32 base, savers on)", "full (savers on)"),
        "qlora_over_full_peak_memory_savers_on": ("qlora (savers on)", "full (savers on)"),
        "lora_over_full_peak_memory_savers_on_lean_malloc": (f"{lora_default}, savers on, lean malloc)",
                                                             "full (savers on, lean malloc)"),
        "qlora_over_full_peak_memory_savers_on_lean_malloc": ("qlora (savers on, lean malloc)", "full (savers on, lean malloc)"),
        "lora_over_full_peak_memory_savers_off": (f"{lora_default}, savers off)", "full (savers off)"),
    }
    ratios = {k: r for k, v in pairs.items() if (r := ratio(*v)) is not None}
    speed = ratio(f"{lora_default}, savers on)", "lora (fp32 base, savers on)", "tokens_per_s", 2)
    if speed is not None:
        ratios["lora_over_lora_fp32_base_tokens_per_s_savers_on"] = speed
    for ref in ("trl lora (TRL defaults)", "trl lora (no grad ckpt)"):
        r = ratio(f"{lora_default}, savers off)", ref, "tokens_per_s", 2)
        if r is not None:
            ratios[f"lmforge_lora_over_{ref.replace(' ', '_').replace('(', '').replace(')', '')}_tokens_per_s"] = r
    checks = {}
    if "lora_over_full_peak_memory_savers_on" in ratios:
        v = ratios["lora_over_full_peak_memory_savers_on"]
        checks["lora_over_full_peak_memory"] = {"value": v, "at_most": 0.5, "met": v <= 0.5,
                                                "lora": f"{lora_default}, savers on)", "full": "full (savers on)"}
    if "lmforge_lora_over_trl_lora_TRL_defaults_tokens_per_s" in ratios:
        v = ratios["lmforge_lora_over_trl_lora_TRL_defaults_tokens_per_s"]
        checks["lmforge_lora_over_trl_tokens_per_s"] = {"value": v, "at_least": 1.5, "met": v >= 1.5,
                                                        "lora": f"{lora_default}, savers off)", "trl": "trl lora (TRL defaults)"}
    return ratios, checks


def write_result(a, argv, runs: dict, summary: tuple[dict, dict], auto: str, load_start: float, complete: bool) -> None:
    ratios, checks = summary
    res = {
        "benchmark": "sft_memory",
        "command": "python benchmarks/sft_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "complete": complete,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": a.threads,
                    "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
                    "note": "shared machine: other jobs ran at the same time; configurations ran one after another"},
        "settings": {"batch": a.batch, "max_seq_len": a.seq, "steps": a.steps, "measured_steps": a.steps - 1,
                     "autocast": a.dtype,
                     "weights": f"full: fp32 master weights; lora: default --dtype auto = {auto} frozen base here (and an "
                                "fp32-base row), fp32 adapters and optimizer; qlora: nf4 linear layers, fp32 rest",
                     "lora": "r=16, all-linear, dropout 0",
                     "savers_on": f"activation checkpointing + chunked cross-entropy ({a.ce_chunk} tokens)",
                     "data": "multi-turn persona chats (benchmarks/sft_demo.py task), same records for every run"},
        "runs": runs, "ratios": ratios,
        "notes": ["lean malloc = lmforge.finetune.sft.lean_malloc (glibc M_MMAP_THRESHOLD 64 KiB; `lmforge sft --lean-malloc`)",
                  "TRL's defaults on CPU: gradient checkpointing on, bf16 autocast; its loss covers every token "
                  "(assistant_only_loss needs {% generation %} marks the SmolLM2 template lacks); its model is loaded "
                  "in fp32 (from_pretrained(dtype=torch.float32))",
                  "memory ratios do not depend on machine load; tokens/s ratios compare runs of the same invocation"],
        "targets": TARGETS, "target_checks": checks,
    }
    Path(a.result).parent.mkdir(parents=True, exist_ok=True)
    Path(a.result).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
