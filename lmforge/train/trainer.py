"""The one training loop: pretraining, SFT, DPO, reward models and RL plug into it.

    from lmforge.train import TrainConfig, train, ListBatches

    def loss_fn(model, batch):                 # model may be DDP-wrapped: use unwrap(model) for .cfg
        logits = model(batch["input_ids"])
        loss = ...                             # a scalar tensor: the mean over this micro-batch
        return loss, {"tokens": n_tokens}      # metrics: floats / 0-d tensors, averaged per step
    result = train(model, loss_fn, batches, TrainConfig(lr=1e-4, max_steps=200), "runs/sft",
                   tokenizer=tok, eval_fn=lambda m: {"val_loss": ...})

What `train` does, step by step: `grad_accum` micro-batches (`next(batches)`, moved to the
model's device, forward under autocast, `loss_fn`, backward of loss / grad_accum; MoE auxiliary
losses are added here, so a loss_fn must not add `aux_losses(model)` itself) -> clip -> AdamW
step -> lr from the schedule (linear warmup, then cosine|linear decay to lr * min_lr_ratio, or
constant). The step never waits for the device: losses, metrics and token counts stay tensors
and are read once every `log_every` steps.

The contract:
- `loss_fn(model, batch) -> (loss, metrics)`. The batch arrives on the model's device (the
  trainer moves it, `batches.to_device`). `metrics["tokens"]`, when given, is the number of
  tokens the micro-batch trained on (for tokens/s; an int or a 0-d tensor); otherwise the
  trainer counts `batch["input_ids"]` (or the batch itself when it is a tensor). Other metric
  values are averaged over micro-batches and ranks and land in `metrics.jsonl`.
- `batches`: an iterator of CPU batches with `state_dict()` / `load_state_dict()` (the data
  position, saved in every checkpoint) and optionally `set_rank(rank, world_size)`, which the
  trainer calls under torchrun. `BatchSource` is the base; `ListBatches` covers a list.
- `params`: the tensors (or param-group dicts, with an optional `lr_scale`) to optimize;
  default every parameter with requires_grad. Weight decay applies to matrices only.
- `eval_fn(model) -> dict` runs every `eval_every` steps and at the end (eval mode, no grad,
  on every rank); `sample_fn(model) -> str | dict` likewise, printed and appended to
  `samples.jsonl`. Both get the unwrapped model.
- `tokenizer` is only used by the default save_fn; `config` (a dataclass or dict, default
  {"train": cfg}) is written to run_dir/config.yaml; `progress=False` hides the tqdm bar.
- `save_fn(model, dir)` writes a checkpoint's model files (default `save_hf(model, tokenizer,
  dir)`); the trainer adds `trainer_state.pt`: the trainable weights (so resume is exact
  whatever format save_fn writes), optimizer, schedule position, data position and RNG states
  of every rank, and `extra_state` (a dict updated in place on resume, or an object with
  state_dict/load_state_dict).
- `flops_per_token` (training FLOPs) adds `mfu` to the log on GPUs whose peak is known;
  `hooks` (TrainHooks) lets tests act after a step or in the middle of writing a checkpoint.

Checkpoints are atomic (lmforge/train/checkpoint.py). Resume is automatic when the run folder
has `latest` (`resume=False` refuses to reuse such a folder, `True` demands one); it restores
everything above, truncates metrics.jsonl to the resumed step, and continues as if never
stopped: on CPU the per-step losses equal an uninterrupted run's. A final checkpoint is always
written, also when `time_limit_s` stops the run early.

`compile: true` compiles each compile unit (every transformer block and the loss head) on its
own: one compilation serves all layers, so compile time does not grow with depth.
Distributed: under torchrun (RANK/WORLD_SIZE set) the process group starts (gloo on CPU, nccl on
CUDA), the model is wrapped in DDP, or sharded with FSDP2 `fully_shard` when `cfg.fsdp`; only
rank 0 logs and writes. Gradients are averaged over ranks, so a rank's loss must be the mean over
the same number of examples/tokens on every rank for the result to equal one process on the
concatenated global batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from lmforge.device import resolve_device
from lmforge.errors import LmforgeError
from lmforge.train.batches import BatchSource, ListBatches, to_device  # noqa: F401  (public names)
from lmforge.train.checkpoint import commit_checkpoint, latest_checkpoint, rng_state, set_rng_state, step_dir_name
from lmforge.train.distributed import (DistInfo, agree, agree_value, all_gather_objects, all_reduce_mean, barrier,  # noqa: F401
                                       dist_info, unwrap, wrap_for_ranks)
from lmforge.train.plots import plot_metrics, read_metrics, safe_plots  # noqa: F401  (public names)


@dataclass
class TrainConfig:
    """The `train:` section of every training recipe (flags: --train.lr etc.)."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    max_steps: int = 1000
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    weight_decay: float = 0.1  # on matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "fp32"  # autocast dtype: fp32 | bf16 | fp16 (weights stay fp32)
    compile: bool = False  # torch.compile each transformer block and the loss head
    activation_checkpointing: bool = False  # recompute each layer in backward (less memory)
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard instead of DDP
    device: str = "auto"  # auto (cuda if present, else mps, else cpu) | cpu | cuda | cuda:N | mps
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; 0 = all
    seed: int = 0
    time_limit_s: float = 0  # stop cleanly (and checkpoint, skipping the final eval) after this many seconds, counted across resumes; 0 = none
    # what the decay follows: steps (to max_steps) | time (to time_limit_s: a run sized by the clock
    # decays on time whatever the machine's speed, and max_steps is only a cap)
    schedule_clock: str = "steps"


@dataclass
class TrainHooks:
    """Callbacks for tests and tools: `after_step(step)` after every optimizer step;
    `mid_save(step, tmp_dir)` after a checkpoint's model files, before its trainer state."""

    after_step: Callable[[int], None] | None = None
    mid_save: Callable[[int, Path], None] | None = None


# -- schedule and optimizer -------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig, elapsed_s: float | None = None) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): warmup, then decay; with
    `schedule_clock: time` the decay's progress is `elapsed_s` of `time_limit_s` instead."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule_clock == "time" and cfg.time_limit_s > 0 and elapsed_s is not None:
        progress = min(1.0, elapsed_s / cfg.time_limit_s)
    elif cfg.schedule_clock in ("steps", "time"):
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    else:
        raise LmforgeError(f"unknown schedule_clock '{cfg.schedule_clock}' (choose steps or time)")
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        raise LmforgeError(f"unknown schedule '{cfg.schedule}' (choose cosine, linear or constant)")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def _param_groups(params, cfg: TrainConfig) -> list[dict]:
    """Split tensors into decayed (matrices) and not decayed (vectors) groups; keep given groups."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [dict(g) for g in params]
    else:
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    out = []
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if g["params"]:
            g.setdefault("weight_decay", cfg.weight_decay)
            g.setdefault("lr_scale", 1.0)
            out.append(g)
    if not out:
        raise LmforgeError("nothing to train: no parameter requires grad")
    return out


def _dedupe(params: Iterable) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _param_names(raw: nn.Module, params) -> list:
    """The names of the tensors to train (a tensor outside the model is kept as itself), so
    they survive FSDP re-wrapping the parameters."""
    if params is None:
        params = [p for p in raw.parameters() if p.requires_grad]
    params = list(params)
    id_to_name = {id(p): n for n, p in raw.named_parameters()}

    def by_name(ps):
        return [id_to_name.get(id(p), p) for p in _dedupe(ps)]

    if params and isinstance(params[0], dict):
        return [dict(g, params=by_name(g["params"])) for g in params]
    return by_name(params)


def _optimizer(raw: nn.Module, spec: list, cfg: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, list]:
    """AdamW over `spec` (names or tensors, or group dicts of them); fused on CUDA."""
    named = dict(raw.named_parameters())

    def lookup(items):
        return [named[x] if isinstance(x, str) else x for x in items]

    if spec and isinstance(spec[0], dict):
        groups = _param_groups([dict(g, params=lookup(g["params"])) for g in spec], cfg)
    else:
        groups = _param_groups(lookup(spec), cfg)
    trainable = [p for g in groups for p in g["params"]]
    extra_kw = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra_kw), trainable


# -- small helpers ----------------------------------------------------------------------------
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: str):
    if dtype not in AUTOCAST:
        raise LmforgeError(f"unknown train dtype '{dtype}' (choose fp32, bf16 or fp16)")
    if AUTOCAST[dtype] is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST[dtype])


def _detach(v):
    """A metric value to accumulate without a host sync: tensors stay on their device."""
    if isinstance(v, torch.Tensor):
        return v.detach().float().mean()
    return float(v)


def _count_tokens(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        for k in ("input_ids", "idx", "tokens"):
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k].numel()
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    return 0


# Dense bf16 peak of the GPUs we quote MFU on (FLOP/s); others get no `mfu` in the log.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def compile_model(raw: nn.Module) -> int:
    """Compile every compile unit in place (names and state-dict keys stay); the whole model
    when it has none. Returns the number of regions compiled."""
    units = [m for m in raw.modules() if getattr(m, "compile_unit", False)]
    for m in units:
        m.compile()
    if not units:
        raw.compile()
        return 1
    return len(units)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer layer (every item of a ModuleList named `layers`) in backward.

    Done by wrapping the layer's forward on the instance, so module names and state-dict keys
    stay the same. Returns the number of layers wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    n = 0
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers"):
            continue
        for layer in mod:
            if getattr(layer, "_lmforge_ckpt", False):
                continue
            inner = layer.forward

            def run(*args, _inner=inner, **kw):
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kw)
                return _inner(*args, **kw)

            layer.forward = run
            layer._lmforge_ckpt = True
            n += 1
    return n


# -- the run's state --------------------------------------------------------------------------
@dataclass
class _Run:
    """Everything the loop's pieces share: set up once, advanced by `_step`."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    di: DistInfo
    raw: nn.Module
    fwd_model: nn.Module
    loss_fn: Callable
    batches: Any
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    trainable: list
    hooks: TrainHooks
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    t_start: float = 0.0
    lr_factor: float = 0.0  # the multiplier of cfg.lr the last step used
    start_step: int = 0
    window_tokens: Any = 0
    window_t0: float = 0.0
    history: list = field(default_factory=list)
    history_all: list = field(default_factory=list)
    bar: Any = None
    flops_per_token: float | None = None

    @property
    def main(self) -> bool:
        return self.di.is_main

    def say(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def _setup(model, loss_fn, batches, cfg: TrainConfig, run_dir: Path, params, hooks) -> _Run:
    """Device, ranks, compile, wrap and optimizer (no weights or state restored yet)."""
    device = resolve_device(cfg.device)
    di = dist_info(cfg.device)
    if di.enabled and device.type == "cuda":
        device = torch.device("cuda", di.local_rank)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays fp32 (nanoGPT's habit)
    if device.type == "cuda" and cfg.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        print("warning: this GPU has no bf16; training in fp16 with loss scaling")
        cfg = dataclasses.replace(cfg, dtype="fp16")
    torch.manual_seed(cfg.seed + di.rank)
    raw = model.to(device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(raw)
    if hasattr(batches, "set_rank"):
        batches.set_rank(di.rank, di.world_size)
    spec = _param_names(raw, params)
    if cfg.compile:
        compile_model(raw)
    fwd_model = wrap_for_ranks(raw, di, device, cfg.fsdp)
    opt, trainable = _optimizer(raw, spec, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16" and device.type == "cuda")
    return _Run(cfg, run_dir, device, di, raw, fwd_model, loss_fn, batches, opt, scaler, trainable, hooks)


def _load_weights(raw: nn.Module, state: dict, latest: Path, device: torch.device) -> None:
    named = dict(raw.named_parameters(remove_duplicate=False))
    missing = [n for n in state["model"] if n not in named]
    if missing:
        raise LmforgeError(f"checkpoint {latest} has weights this model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in state["model"].items():
            named[n].copy_(t.to(device))


def _resume(run: _Run, state: dict, extra_state) -> None:
    """Optimizer, scaler, data position, RNG, counters and extra state from a checkpoint."""
    cfg, di = run.cfg, run.di
    run.step, run.tokens_seen, run.elapsed_before = int(state["step"]), int(state["tokens_seen"]), float(state["elapsed_s"])
    if state.get("world_size", 1) != di.world_size:
        raise LmforgeError(f"checkpoint was written by {state.get('world_size', 1)} processes; resume with the same number")
    if cfg.fsdp and di.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(run.raw, run.opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        run.opt.load_state_dict(state["optimizer"])
    if "scaler" in state and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    if hasattr(run.batches, "load_state_dict"):
        run.batches.load_state_dict(state["data"][di.rank])
    set_rng_state(state["rng"][di.rank])
    if extra_state is not None and state.get("extra") is not None:
        if hasattr(extra_state, "load_state_dict"):
            extra_state.load_state_dict(state["extra"])
        elif isinstance(extra_state, dict):
            extra_state.clear()
            extra_state.update(state["extra"])


def _open_run_folder(run: _Run, config) -> None:
    """config.yaml, and metrics.jsonl cut back to the resumed step (a killed run may have logged
    steps past its last checkpoint: they are forgotten)."""
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        from lmforge.config import save_yaml

        save_yaml(config if config is not None else {"train": dataclasses.asdict(run.cfg)}, run.run_dir / "config.yaml")
        path = run.run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= run.step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        run.history_all = kept
    barrier(run.di)


# -- one optimizer step (no host syncs) -------------------------------------------------------
def _step(run: _Run) -> tuple[dict, Any, Any]:
    """grad_accum micro-batches, clip, optimizer step. Returns (metric sums, tokens, grad norm),
    all still on the device: nothing here waits for the GPU."""
    from lmforge.model import aux_losses

    cfg = run.cfg
    elapsed = None
    if cfg.schedule_clock == "time":  # one clock for all ranks, or their learning rates drift apart
        elapsed = agree_value(run.elapsed_before + time.time() - run.t_start, run.di, run.device)
    factor = run.lr_factor = lr_factor(run.step, cfg, elapsed)
    for g in run.opt.param_groups:
        g["lr"] = cfg.lr * factor * g.get("lr_scale", 1.0)
    sums: dict[str, Any] = {}
    step_tokens: Any = 0
    for micro in range(cfg.grad_accum):
        batch = to_device(next(run.batches), run.device)
        last = micro == cfg.grad_accum - 1
        quiet = run.di.enabled and not last and hasattr(run.fwd_model, "no_sync")
        with run.fwd_model.no_sync() if quiet else nullcontext():
            with _autocast(run.device, cfg.dtype):
                loss, metrics = run.loss_fn(run.fwd_model, batch)
                metrics = dict(metrics or {})
                aux = aux_losses(run.raw)
                total = loss + aux if isinstance(aux, torch.Tensor) else loss
            run.scaler.scale(total / cfg.grad_accum).backward()
        n_tok = metrics.pop("tokens", None)
        step_tokens = step_tokens + (_count_tokens(batch) if n_tok is None else n_tok)
        metrics["loss"] = loss
        if isinstance(aux, torch.Tensor):
            metrics["aux_loss"] = aux
        for k, v in metrics.items():
            if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + _detach(v)
    for m in run.raw.modules():  # drop the graph the MoE aux losses hold on to
        if getattr(m, "aux_loss", None) is not None:
            m.aux_loss = None
    grad_norm = _clip_and_update(run)
    return sums, step_tokens, grad_norm


def _clip_and_update(run: _Run):
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.opt)
    grad_norm = None
    if run.cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return grad_norm


# -- logging, evals, checkpoints --------------------------------------------------------------
def _log_record(run: _Run, sums: dict, grad_norm) -> dict:
    """The metrics line for this step: the one place the loop reads values off the device."""
    from lmforge.moe import router_metrics

    cfg = run.cfg
    vals = {k: float(v) / cfg.grad_accum for k, v in sums.items()}
    vals.update(router_metrics(run.raw))
    vals, tok = all_reduce_mean(vals, float(run.window_tokens), run.di, run.device)
    if grad_norm is not None:
        vals["grad_norm"] = float(grad_norm)  # already global after DDP's all-reduce
    now = time.time()
    dt = max(now - run.window_t0, 1e-9)
    run.tokens_seen += int(tok)
    rate_steps = (run.step - run.start_step) / max(now - run.t_start, 1e-9)
    record = {"step": run.step, "loss": vals.pop("loss"), "lr": cfg.lr * run.lr_factor,
              "tokens_per_s": tok / dt, "tokens": run.tokens_seen,
              "elapsed_s": round(run.elapsed_before + now - run.t_start, 3),
              "eta_s": round((cfg.max_steps - run.step) / max(rate_steps, 1e-9), 1), **vals}
    if run.device.type == "cuda":
        record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
        peak = peak_flops(run.device)
        if peak and run.flops_per_token:
            record["mfu"] = round(record["tokens_per_s"] * run.flops_per_token / (peak * run.di.world_size), 4)
    run.window_tokens, run.window_t0 = 0, now
    return record


def _run_evals(run: _Run, eval_fn, sample_fn) -> dict:
    out = {}
    if eval_fn is None and sample_fn is None:
        return out
    raw = run.raw
    was_training = raw.training
    raw.eval()
    with torch.no_grad(), _autocast(run.device, run.cfg.dtype):
        if eval_fn is not None:
            out.update({k: float(_detach(v)) if isinstance(v, (int, float, torch.Tensor)) else v
                        for k, v in (eval_fn(raw) or {}).items()})
        if sample_fn is not None:
            sample = sample_fn(raw)
            if run.main and sample is not None:
                rec = {"step": run.step, **(sample if isinstance(sample, dict) else {"text": sample})}
                with open(run.run_dir / "samples.jsonl", "a") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                run.say(f"[step {run.step}] sample: {rec.get('text', rec)!r}")
    raw.train(was_training)
    return out


def _gather_model_state(run: _Run) -> dict:
    raw = run.raw
    if run.cfg.fsdp and run.di.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trainable_names = {n for n, p in raw.named_parameters(remove_duplicate=False) if p.requires_grad}
        return {n: t for n, t in full.items() if n in trainable_names}
    return {n: p.detach().cpu().clone() for n, p in raw.named_parameters(remove_duplicate=False) if p.requires_grad}


def _optimizer_state(run: _Run) -> dict:
    if run.cfg.fsdp and run.di.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(run.raw, run.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return run.opt.state_dict()


def _save(run: _Run, save_fn, extra_state) -> Path:
    """A complete checkpoint of this step (collectives on every rank, files on rank 0)."""
    di, cfg = run.di, run.cfg
    data_states = all_gather_objects(run.batches.state_dict() if hasattr(run.batches, "state_dict") else {}, di)
    rng_states = all_gather_objects(rng_state(), di)
    model_state = _gather_model_state(run)
    opt_state = _optimizer_state(run)
    final = run.run_dir / "checkpoints" / step_dir_name(run.step)
    if run.main:
        extra = None
        if extra_state is not None:
            extra = extra_state.state_dict() if hasattr(extra_state, "state_dict") else dict(extra_state)
        trainer_state = {
            "step": run.step, "tokens_seen": run.tokens_seen,
            "elapsed_s": run.elapsed_before + (time.time() - run.t_start),
            "world_size": di.world_size, "model": model_state, "optimizer": opt_state,
            "scheduler": {"step": run.step, "lr_factor": run.lr_factor},
            "data": data_states, "rng": rng_states, "extra": extra, "train_config": dataclasses.asdict(cfg),
        }
        if run.scaler.is_enabled():
            trainer_state["scaler"] = run.scaler.state_dict()
        save_model = _model_for_saving(run.raw, model_state) if cfg.fsdp and di.enabled else run.raw
        final = commit_checkpoint(run.run_dir, run.step, lambda d: save_fn(save_model, d), trainer_state,
                                  cfg.keep_last, run.hooks.mid_save)
    barrier(di)
    return final


def _write_record(run: _Run, record: dict, show_evals: bool) -> None:
    with open(run.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    run.history.append(record)
    run.history_all.append(record)
    if run.bar is not None and "loss" in record:
        run.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}",
                            tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)
    if show_evals:
        evs = {k: v for k, v in record.items() if k.startswith(("val", "eval"))}
        if evs:
            run.say(f"[step {run.step}] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in evs.items()))
        safe_plots(run.history_all, run.run_dir)


# -- the loop ---------------------------------------------------------------------------------
def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
    batches,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    params: Iterable | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    save_fn: Callable[[nn.Module, Path], None] | None = None,
    sample_fn: Callable[[nn.Module], Any] | None = None,
    extra_state: Any = None,
    tokenizer=None,
    config: Any = None,
    resume: bool | None = None,
    progress: bool = True,
    hooks: TrainHooks | None = None,
    flops_per_token: float | None = None,
) -> dict:
    """Train `model` in place; returns {"step", "loss", "metrics", "history", "checkpoint",
    "stopped", "run_dir"}. `config` (a dataclass or dict) is saved as run_dir/config.yaml (default:
    {"train": cfg}). See the module docstring for the contract of every argument."""
    if cfg.grad_accum < 1 or cfg.max_steps < 0:
        raise LmforgeError("train.grad_accum must be >= 1 and train.max_steps >= 0")
    run_dir = Path(run_dir)
    latest = _resume_point(run_dir, resume)
    state = _read_state(latest) if latest else None
    run = _setup(model, loss_fn, batches, cfg, run_dir, params, hooks or TrainHooks())
    run.flops_per_token = flops_per_token
    if state is not None:
        _load_weights(run.raw, state, latest, run.device)
        _resume(run, state, extra_state)
    _open_run_folder(run, config)
    if save_fn is None:
        from lmforge.loading import save_hf

        def save_fn(m, d):
            save_hf(m, tokenizer, d)

    result = _loop(run, state is not None, eval_fn, sample_fn, save_fn, extra_state, progress)
    if result["checkpoint"] is None and latest is not None:
        result["checkpoint"] = latest
    return result


def _read_state(ckpt: Path) -> dict:
    path = ckpt / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint from before manifests can still be damaged
        raise LmforgeError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _resume_point(run_dir: Path, resume: bool | None) -> Path | None:
    latest = latest_checkpoint(run_dir) if (run_dir / "latest").exists() else None
    if resume is True and latest is None:
        raise LmforgeError(f"cannot resume: {run_dir} has no complete checkpoint ('latest')")
    if resume is False and latest is not None:
        raise LmforgeError(f"{run_dir} already holds a run (latest -> {latest.name}); pick another --out or resume it")
    return latest


def _loop(run: _Run, resumed: bool, eval_fn, sample_fn, save_fn, extra_state, progress: bool) -> dict:
    cfg = run.cfg
    run.t_start = run.window_t0 = time.time()
    run.start_step = run.step
    run.raw.train()
    if run.main and progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", dynamic_ncols=True, leave=True)
    last_loss, last_record, stopped, ckpt = float("nan"), {}, "max_steps", None
    last_saved = run.step if resumed else -1
    while run.step < cfg.max_steps:
        sums, step_tokens, grad_norm = _step(run)
        run.step += 1
        run.window_tokens = run.window_tokens + step_tokens
        if run.hooks.after_step is not None:
            run.hooks.after_step(run.step)
        do_log = run.step % max(1, cfg.log_every) == 0 or run.step == cfg.max_steps
        do_eval = (cfg.eval_every > 0 and run.step % cfg.eval_every == 0) or run.step == cfg.max_steps
        over_time = cfg.time_limit_s > 0 and agree(
            run.elapsed_before + time.time() - run.t_start >= cfg.time_limit_s, run.di, run.device)
        record = _log_record(run, sums, grad_norm) if (do_log or over_time) else None
        if record is not None:
            last_loss = record["loss"]
        if do_eval and not over_time:
            ev = _run_evals(run, eval_fn, sample_fn)
            if ev:
                record = {**(record or {"step": run.step}), **ev}
            run.window_t0 = time.time()  # tokens/s measures training, not evaluation
        elif over_time and (eval_fn is not None or sample_fn is not None):
            # the limit is the whole run's: an eval now could take longer than the training did
            run.say("time limit reached: the final eval and sample are skipped (`lmforge eval` the checkpoint)")
        if record is not None and run.main:
            _write_record(run, record, do_eval or over_time)
            last_record = record
        if run.bar is not None:
            run.bar.update(1)
        if cfg.save_every > 0 and run.step % cfg.save_every == 0 and run.step != cfg.max_steps and not over_time:
            ckpt, last_saved = _save(run, save_fn, extra_state), run.step
            run.window_t0 = time.time()
        if over_time:
            stopped = "time_limit"
            run.say(f"time limit of {cfg.time_limit_s:.0f}s reached at step {run.step}; saving and stopping")
            break
    if run.bar is not None:
        run.bar.close()
    if run.step != last_saved:
        ckpt = _save(run, save_fn, extra_state)
    if run.main:
        safe_plots(run.history_all, run.run_dir)
    return {"step": run.step, "loss": last_loss, "metrics": last_record, "history": run.history, "checkpoint": ckpt,
            "stopped": stopped, "run_dir": run.run_dir}


def _model_for_saving(raw: nn.Module, full_state: dict) -> nn.Module:
    """A CPU copy of an FSDP-sharded model holding the gathered full weights (rank 0 saves it)."""
    with torch.device("meta"):
        copy = type(raw)(raw.cfg)
    copy.load_state_dict(full_state, assign=True, strict=False)
    if getattr(raw.cfg, "tie_embeddings", False):
        copy.lm_head.weight = copy.model.embed_tokens.weight
    if hasattr(copy, "inv_freq"):
        from lmforge.model import rope_inv_freq

        copy.inv_freq = rope_inv_freq(raw.cfg)
    return copy
