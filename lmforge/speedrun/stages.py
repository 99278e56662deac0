"""The speedrun's stages, each a function of the run's context that returns what it made (JSON).
`run_speedrun` records every finished stage in OUT/speedrun.json, so a second run skips them and
the interrupted one resumes (the trainers resume from their own last checkpoint)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.speedrun import chat_data
from lmforge.speedrun.plan import Plan, fill_steps, make_plan, parse_budget, time_steps


@dataclass
class SpeedrunConfig:
    budget: str = "1h"  # the whole run's wall-clock time: 10m | 1h | 4h | 1h30m ... (sizes the model)
    out: str = "runs/speedrun"  # everything lands here: the models, metrics, plots, report.md
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # training text: sources of `lmforge fetch` (public-domain English prose, fetched once into the cache)
    sources: list[str] = field(default_factory=lambda: ["sotu", "moby-dick", "jane-austen", "kjv"])
    vocab_size: int = 8192
    seed: int = 0
    eval_questions: int = 20  # held-out 3-digit sums asked through the calculator


@dataclass
class Context:
    cfg: SpeedrunConfig
    out: Path
    state: dict

    def done(self, stage: str) -> dict:
        return self.state["stages"][stage]


STATE = "speedrun.json"


def _say(msg: str) -> None:
    print(msg, flush=True)


def stage_fetch(ctx: Context) -> dict:
    from lmforge.data.fetch import data_root, fetch

    status = fetch(ctx.cfg.sources, log=_say)
    ready = [n for n, s in status.items() if not s.startswith(("skipped", "failed"))]
    if not ready:
        raise LmforgeError(f"no training text: every source was skipped or failed ({status})")
    from lmforge.data.fetch import SOURCES

    root = data_root()
    return {"status": status, "dirs": [str(root / SOURCES[n].dir) for n in ready],
            "heldout": str(root / "heldout" / "english")}


def stage_tokenizer(ctx: Context) -> dict:
    from lmforge.tokenizer_train import train_tokenizer

    info = train_tokenizer(ctx.done("fetch")["dirs"], ctx.out / "tokenizer", vocab_size=ctx.cfg.vocab_size, log=_say)
    return {"path": str(ctx.out / "tokenizer"), "vocab_size": info["vocab_size"], "trained_on_bytes": info["trained_on_bytes"]}


def stage_prepare(ctx: Context) -> dict:
    from lmforge.data.prepare import prepare

    m = prepare(ctx.done("fetch")["dirs"], ctx.done("tokenizer")["path"], ctx.out / "data", log=_say).manifest
    return {"path": str(ctx.out / "data"), "train_tokens": m["train"]["tokens"], "val_tokens": m["val"]["tokens"],
            "bytes": m["train"]["bytes"] + m["val"]["bytes"]}


def stage_plan(ctx: Context) -> dict:
    """Size the run: the model by budget and device, the steps by a few timed steps of it."""
    import torch

    from lmforge.device import resolve_device
    from lmforge.finetune.sft import fast_bf16
    from lmforge.model import Transformer
    from lmforge.train.pretrain import ModelDials, model_config

    device = str(resolve_device(ctx.cfg.device))
    plan = make_plan(parse_budget(ctx.cfg.budget), device, "fp32")
    dials = ModelDials(depth=plan.depth, aspect_ratio=plan.d_model // plan.depth, head_dim=plan.head_dim)
    torch.manual_seed(ctx.cfg.seed)
    model = Transformer(model_config(dials, ctx.cfg.vocab_size, plan.seq_len)).init_weights(seed=ctx.cfg.seed)
    # bf16 autocast is not faster everywhere it is supported (small matrices on a CPU): time both
    timed = {dt: time_steps(model, plan.batch_size, plan.seq_len, dt, device, steps=4)
             for dt in (["fp32", "bf16"] if fast_bf16(device) else ["fp32"])}
    plan.train_dtype, step_s = min(timed.items(), key=lambda kv: kv[1])
    sft_step_s = time_steps(model, plan.batch_size, plan.seq_len, plan.train_dtype, device, steps=4, target_fraction=0.1)
    plan = fill_steps(plan, step_s, sft_step_s)
    _say(f"plan: {plan.depth} layers x {plan.d_model} on {device} ({plan.train_dtype}), {step_s:.2f} s/step "
         f"({', '.join(f'{k} {v:.2f}' for k, v in timed.items())}): "
         f"pretrain {plan.pretrain_steps} steps (~{plan.pretrain_s / 60:.0f} min), SFT {plan.sft_steps} steps of "
         f"{sft_step_s:.2f} s (~{plan.sft_s / 60:.0f} min)")
    return plan.to_dict()


# Held-out English measured during pretraining and after it: the same text (whole files in
# sorted order: Moby-Dick's last chapters, then the held-out SOTU speeches).
HELDOUT_BYTES = 400_000

# The trainers decay their learning rate on the clock and stop at their share of the budget (a
# shared machine's speed changes under a run); the measured step count sizes warmup, evals and
# checkpoints, and CAP times it bounds the steps should the machine get much faster.
CAP = 2
SFT_CAP = 20


def _plan(ctx: Context) -> Plan:
    from dataclasses import fields

    return Plan(**{f.name: ctx.done("plan")[f.name] for f in fields(Plan)})


def stage_pretrain(ctx: Context) -> dict:
    from lmforge.train.pretrain import DataConfig, ModelDials, PretrainConfig, run_pretrain
    from lmforge.train.trainer import TrainConfig

    p = _plan(ctx)
    n = p.pretrain_steps
    cfg = PretrainConfig(
        model=ModelDials(depth=p.depth, aspect_ratio=p.d_model // p.depth, head_dim=p.head_dim),
        data=DataConfig(dir=ctx.done("prepare")["path"], batch_size=p.batch_size, seq_len=p.seq_len,
                        eval_tokens=16384, heldout=ctx.done("fetch")["heldout"], heldout_max_bytes=HELDOUT_BYTES),
        train=TrainConfig(lr=2e-3, warmup_steps=min(50, n // 10), max_steps=CAP * n, schedule="cosine", min_lr_ratio=0.1,
                          weight_decay=0.1, grad_clip=1.0, dtype=p.train_dtype, device=p.device,
                          log_every=max(1, n // 200), eval_every=max(1, n // 4), save_every=max(1, n // 10),
                          keep_last=2, time_limit_s=p.pretrain_s, schedule_clock="time", seed=ctx.cfg.seed),
        out=str(ctx.out / "pretrain"), sample_prompt="It was", sample_tokens=32, threads=ctx.cfg.threads)
    res = run_pretrain(cfg)
    return _train_summary(res, ctx.out / "pretrain")


def _train_summary(res: dict, run_dir: Path) -> dict:
    metrics = {k: v for k, v in (res.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return {"path": str(run_dir), "step": res["step"], "loss": res["loss"], "stopped": res["stopped"],
            "metrics": metrics}


def stage_sft(ctx: Context) -> dict:
    from lmforge.finetune.sft import SFTConfig, SFTTrainConfig, run_sft
    from lmforge.tools.teach import write_jsonl

    p = _plan(ctx)
    n = p.sft_steps
    data = ctx.out / "sft_data" / "train.jsonl"
    # a step-time measurement taken while something else ran can be several times too slow, so
    # SFT (whose batches reshuffle every epoch) is capped far above its plan: the clock ends it
    records = chat_data.sft_records(min(CAP * n * p.batch_size, 40_000), seed=ctx.cfg.seed, heldout=chat_data.heldout_sums(ctx.cfg.eval_questions))
    write_jsonl(records, data)
    cfg = SFTConfig(model=ctx.done("pretrain")["path"], data=str(data), out=str(ctx.out / "sft"), method="full",
                    dtype="fp32", max_seq_len=p.seq_len, batch_size=p.batch_size, seed=ctx.cfg.seed,
                    threads=ctx.cfg.threads, sample_prompt=chat_data.IDENTITY_HELDOUT[0],
                    train=SFTTrainConfig(lr=1e-3, warmup_steps=min(20, n // 10), max_steps=SFT_CAP * n, schedule="cosine",
                                         min_lr_ratio=0.1, dtype=p.train_dtype, device=p.device,
                                         log_every=max(1, n // 200), eval_every=0, save_every=max(1, n // 5),
                                         keep_last=1, time_limit_s=p.sft_s, schedule_clock="time"))
    res = run_sft(cfg)
    return {**_train_summary(res, ctx.out / "sft"), "records": len(records), "data": str(data)}


FREE_PROMPTS = ["Tell me a story about a whale.", "What is 25 + 17?"]


def _used_calculator(conv: list[dict], result: int) -> bool:
    """The calculator ran and returned the right number: the model copied the question's numbers."""
    return any(m.get("role") == "tool" and str(m.get("content")).strip() == str(result) for m in conv)


def heldout_bpb(model_path: str, heldout: str, plan: Plan, max_bytes: int = 0) -> float:
    """Bits per byte of the pretrained model on held-out English (its trainer stopped on the
    clock, which skips the final eval)."""
    import torch

    from lmforge.loading import load_model
    from lmforge.train.pretrain import heldout_bits_per_byte, read_heldout

    model, tok = load_model(model_path, dtype="fp32", device=plan.device)
    ids, nbytes, _ = read_heldout(heldout, tok, tok.eos_id if tok.eos_id is not None else 0, max_bytes or HELDOUT_BYTES)
    with torch.autocast(torch.device(plan.device).type, dtype=torch.bfloat16, enabled=plan.train_dtype == "bf16"):
        return heldout_bits_per_byte(model.eval(), ids, nbytes, plan.seq_len, plan.batch_size)[1]


def stage_eval(ctx: Context) -> dict:
    """The chat model as `lmforge chat` runs it (default precision), greedy: held-out identity
    questions, held-out 3-digit sums through the calculator, a few sample chats."""
    import lmforge
    from lmforge.tools import get_tools
    from lmforge.tools.teach import answer_is_correct, tool_loops_batched

    plan = _plan(ctx)
    bpb = heldout_bpb(ctx.done("pretrain")["path"], ctx.done("fetch")["heldout"], plan)
    lm = lmforge.load(ctx.done("sft")["path"], device=plan.device)
    identity = []
    for q in chat_data.IDENTITY_HELDOUT:
        reply = lm.chat(q, max_new_tokens=48, temperature=0)
        identity.append({"question": q, "reply": reply, "ok": chat_data.NAME.lower() in reply.lower()})
    sums = chat_data.heldout_sums(ctx.cfg.eval_questions)
    convs = tool_loops_batched(lm, [p.question for p in sums], get_tools("calculator"), max_new_tokens=48,
                               max_steps=2, batch=10, log=None)
    arithmetic = []
    for p, conv in zip(sums, convs):
        final = next((m.get("content") or "" for m in reversed(conv) if m.get("role") == "assistant"), "")
        arithmetic.append({"question": p.question, "expected": p.result, "messages": conv,
                           "via_calculator": _used_calculator(conv, p.result),
                           "ok": _used_calculator(conv, p.result) and answer_is_correct(final, p.result)})
    samples = [{"messages": [{"role": "user", "content": q}], "reply": lm.chat(q, max_new_tokens=64, temperature=0)}
               for q in FREE_PROMPTS]
    samples.append({"messages": [{"role": "user", "content": sums[0].question}] + convs[0], "tools": "calculator"})
    return {"parameters": lm.model.num_parameters(), "heldout_bpb": bpb, "identity": identity, "arithmetic": arithmetic, "samples": samples,
            "identity_ok": sum(r["ok"] for r in identity), "arithmetic_ok": sum(r["ok"] for r in arithmetic)}


def stage_report(ctx: Context) -> dict:
    from lmforge.speedrun.report import write_report

    return {"path": str(write_report(ctx.out, ctx.state))}


STAGES = [("fetch", stage_fetch), ("tokenizer", stage_tokenizer), ("prepare", stage_prepare), ("plan", stage_plan),
          ("pretrain", stage_pretrain), ("sft", stage_sft), ("eval", stage_eval), ("report", stage_report)]


def _load_state(out: Path, cfg: SpeedrunConfig) -> dict:
    from dataclasses import asdict

    path = out / STATE
    if not path.exists():
        return {"config": asdict(cfg), "started": time.time(), "stages": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: cannot read the run's state ({e}); remove it to start over") from None
    if state["config"]["budget"] != cfg.budget:
        raise LmforgeError(f"{out} is a speedrun with --budget {state['config']['budget']}; resume it with that "
                           f"budget or choose another --out")
    return state


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
    os.replace(tmp, out / STATE)


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    """Every stage not done yet, in order; returns the state (also in OUT/speedrun.json)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parse_budget(cfg.budget)  # a bad budget fails before anything runs
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, out, _load_state(out, cfg))
    ctx.state.setdefault("load_avg", []).append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    for i, (name, fn) in enumerate(STAGES, 1):
        if name in ctx.state["stages"]:
            _say(f"[{i}/{len(STAGES)}] {name}: done in an earlier run")
            continue
        _say(f"[{i}/{len(STAGES)}] {name}")
        t0 = time.time()
        result = fn(ctx)
        result["seconds"] = round(time.time() - t0, 1)
        # a busy machine explains slow stages: keep the load beside each one
        result["load_avg_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        ctx.state["stages"][name] = result
        _save_state(out, ctx.state)
    return ctx.state
