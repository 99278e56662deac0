"""The one training loop: pretraining, SFT, DPO, reward models and RL plug into it.

    from lmforge.train import TrainConfig, train, ListBatches

    def loss_fn(model, batch):                 # model may be DDP-wrapped: use unwrap(model) for .cfg
        logits = model(batch["input_ids"])
        loss = ...                             # a scalar tensor: the mean over this micro-batch
        return loss, {"tokens": n_tokens}      # metrics: floats / 0-d tensors, averaged per step
    result = train(model, loss_fn, batches, TrainConfig(lr=1e-4, max_steps=200), "runs/sft",
                   tokenizer=tok, eval_fn=lambda m: {"val_loss": ...})

What `train` does, step by step: `grad_accum` micro-batches (`next(batches)`, forward under
autocast, `loss_fn`, backward of loss / grad_accum; MoE auxiliary losses are added here, so a
loss_fn must not add `aux_losses(model)` itself) -> clip -> AdamW step -> lr from the schedule
(linear warmup, then cosine|linear decay to lr * min_lr_ratio, or constant).

The contract:
- `loss_fn(model, batch) -> (loss, metrics)`. `metrics["tokens"]`, when given, is the number
  of tokens the micro-batch trained on (for tokens/s); otherwise the trainer counts
  `batch["input_ids"]` (or the batch itself when it is a tensor). Other metric values are
  averaged over micro-batches and ranks and land in `metrics.jsonl`.
- `batches`: an iterator with `state_dict()` / `load_state_dict()` (the data position, saved in
  every checkpoint) and optionally `set_rank(rank, world_size)`, which the trainer calls under
  torchrun. `BatchSource` is the base; `ListBatches` covers a list of examples.
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

Checkpoints are atomic: written into `checkpoints/step-NNNNNN.tmp`, fsynced, renamed, then the
`latest` file is replaced atomically (temp file + os.replace); only `keep_last` complete ones
are kept and a `.tmp` folder is never read. Resume is automatic when the run folder has
`latest` (`resume=False` refuses to reuse such a folder, `True` demands one); it restores
everything above, truncates metrics.jsonl to the resumed step, and continues as if never
stopped: on CPU the per-step losses equal an uninterrupted run's. A final checkpoint is always
written, also when `time_limit_s` stops the run early.

Distributed: under torchrun (RANK/WORLD_SIZE set) the process group starts (gloo on CPU, nccl on
CUDA), the model is wrapped in DDP, or sharded with FSDP2 `fully_shard` when `cfg.fsdp`; only
rank 0 logs and writes. Gradients are averaged over ranks, so a rank's loss must be the mean over
the same number of examples/tokens on every rank for the result to equal one process on the
concatenated global batch.

Environment hooks for tests: LMFORGE_TEST_SAVE_SLEEP="STEP:SECONDS" sleeps in the middle of
writing that step's checkpoint (after the model files, before trainer_state.pt and the rename),
so a test can SIGKILL a half-written checkpoint; LMFORGE_TEST_STEP_SLEEP=SECONDS sleeps after
every optimizer step, so a test can SIGKILL between checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import LmforgeError


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
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer in backward (less memory)
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard instead of DDP
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; 0 = all
    seed: int = 0
    time_limit_s: float = 0  # stop cleanly (and checkpoint) after this many seconds of training, counted across resumes; 0 = none


# -- batch sources ----------------------------------------------------------------------------
class BatchSource:
    """Base for batch sources: implement `next_batch()`, `state_dict()`, `load_state_dict()`.

    `rank` / `world_size` are set by the trainer (via `set_rank`) before the first batch; a
    source should yield only its rank's part of each global batch.
    """

    rank: int = 0
    world_size: int = 1

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def next_batch(self):
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ListBatches(BatchSource):
    """Batches from a list of examples, reshuffled every epoch (seeded), forever.

    A global batch is `batch_size` consecutive examples of the epoch's order; rank r takes its
    contiguous slice of it (`batch_size` must divide by world_size). `collate(list) -> batch`.
    The data position is (epoch, index), so resume continues with the very next example.
    """

    def __init__(self, examples: list, batch_size: int, collate: Callable[[list], Any] | None = None,
                 shuffle: bool = True, seed: int = 0):
        if not examples:
            raise LmforgeError("no training examples")
        self.examples, self.batch_size, self.shuffle, self.seed = examples, batch_size, shuffle, seed
        self.collate = collate or (lambda xs: xs)
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        n = len(self.examples)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def next_batch(self):
        if self.batch_size % self.world_size:
            raise LmforgeError(f"batch size {self.batch_size} does not divide among {self.world_size} ranks")
        picked = []
        for _ in range(self.batch_size):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            picked.append(self.examples[self._order[self.index]])
            self.index += 1
        per = self.batch_size // self.world_size
        return self.collate(picked[self.rank * per:(self.rank + 1) * per])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()


# -- distributed ------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(device: str = "auto") -> DistInfo:
    """Rank info from torchrun's environment; starts the process group on first call."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return DistInfo()
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), ws, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = resolve_device(device).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP / torch.compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _all_gather_objects(obj, di: DistInfo) -> list:
    if not di.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * di.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(di: DistInfo) -> None:
    if di.enabled:
        import torch.distributed as dist

        dist.barrier()


# -- schedule and optimizer -------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): warmup, then decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
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


# -- small helpers ----------------------------------------------------------------------------
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: str):
    if dtype not in AUTOCAST:
        raise LmforgeError(f"unknown train dtype '{dtype}' (choose fp32, bf16 or fp16)")
    if AUTOCAST[dtype] is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST[dtype])


def _to_float(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean())
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


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((3, tuple(int(x) for x in py[:-1]), None if py[-1] == -1 else py[-1]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points at, if it is complete; else None. Never a `.tmp` folder."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest"
    if not latest.exists():
        return None
    target = Path(os.readlink(latest)) if latest.is_symlink() else Path(latest.read_text().strip())
    target = target if target.is_absolute() else run_dir / target
    if target.name.endswith(".tmp") or not (target / "trainer_state.pt").exists():
        raise LmforgeError(f"{latest} points at {target}, which is not a complete checkpoint")
    return target


def _write_latest(run_dir: Path, target: Path) -> None:
    tmp = run_dir / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(str(target.relative_to(run_dir)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "latest")
    _fsync_dir(run_dir)


def _prune(ckpt_root: Path, keep_last: int, keep: Path) -> None:
    for stale in ckpt_root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        if old.resolve() != keep.resolve():
            shutil.rmtree(old, ignore_errors=True)


def _test_save_sleep(step: int) -> float:
    spec = os.environ.get("LMFORGE_TEST_SAVE_SLEEP", "")
    if ":" in spec:
        s, secs = spec.split(":", 1)
        if int(s) == step:
            return float(secs)
    return 0.0


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


# -- plots ------------------------------------------------------------------------------------
def plot_metrics(records: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG curves from metrics records: loss (+ every *loss* key), lr, tokens/s, other evals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in records:
        for k, v in r.items():
            if k not in keys and k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    skip = {"tokens", "elapsed_s", "eta_s", "epoch"}
    groups = {"loss": [k for k in keys if "loss" in k]}
    for k in keys:
        if "loss" not in k and k not in skip and not k.startswith("router_load"):
            groups[k] = [k]
    loads = [k for k in keys if k.startswith("router_load")]
    if loads:
        groups["router_load"] = loads
    written = []
    for name, ks in groups.items():
        if not ks:
            continue
        fig = Figure(figsize=(6, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        for k in ks:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                        markersize=3, label=k, linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is suspect
    return out


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
) -> dict:
    """Train `model` in place; returns {"step", "loss", "metrics", "history", "checkpoint",
    "stopped", "run_dir"}. `config` (a dataclass or dict) is saved as run_dir/config.yaml (default:
    {"train": cfg}). See the module docstring for the contract of every argument."""
    if cfg.grad_accum < 1 or cfg.max_steps < 0:
        raise LmforgeError("train.grad_accum must be >= 1 and train.max_steps >= 0")
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    di = dist_info(cfg.device)
    if di.enabled and device.type == "cuda":
        device = torch.device("cuda", di.local_rank)
    if device.type == "cuda" and cfg.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        print("warning: this GPU has no bf16; training in fp16 with loss scaling")
        cfg = dataclasses.replace(cfg, dtype="fp16")
    main = di.is_main
    ckpt_root = run_dir / "checkpoints"

    # -- resume point (read before anything is written) --------------------------------------
    latest = latest_checkpoint(run_dir) if (run_dir / "latest").exists() else None
    if resume is True and latest is None:
        raise LmforgeError(f"cannot resume: {run_dir} has no complete checkpoint ('latest')")
    if resume is False and latest is not None:
        raise LmforgeError(f"{run_dir} already holds a run (latest -> {latest.name}); pick another --out or resume it")
    state = torch.load(latest / "trainer_state.pt", map_location="cpu", weights_only=True) if latest else None

    torch.manual_seed(cfg.seed + di.rank)
    raw = model
    raw.to(device)
    if state is not None:
        missing = [n for n in state["model"] if n not in dict(raw.named_parameters(remove_duplicate=False))]
        if missing:
            raise LmforgeError(f"checkpoint {latest} has weights this model lacks: {missing[:3]}")
        with torch.no_grad():
            named = dict(raw.named_parameters(remove_duplicate=False))
            for n, t in state["model"].items():
                named[n].copy_(t.to(device))

    if cfg.activation_checkpointing:
        enable_activation_checkpointing(raw)
    if hasattr(batches, "set_rank"):
        batches.set_rank(di.rank, di.world_size)

    # the names of the tensors to train, so they survive FSDP re-wrapping parameters
    if params is None:
        params = [p for p in raw.parameters() if p.requires_grad]
    params = list(params)
    id_to_name = {id(p): n for n, p in raw.named_parameters()}

    def by_name(ps):  # a tensor outside the model (rare) is kept as the tensor itself
        return [id_to_name.get(id(p), p) for p in _dedupe(ps)]

    if params and isinstance(params[0], dict):
        group_spec = [dict(g, params=by_name(g["params"])) for g in params]
    else:
        group_spec = by_name(params)

    # -- wrap -----------------------------------------------------------------------------
    fwd_model = raw
    if cfg.compile:
        raw.compile()  # in place: names, attributes and state-dict keys stay as they are
    if di.enabled:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for mod in raw.modules():
                if getattr(mod, "_lmforge_shard_unit", False) or type(mod).__name__ == "Block":
                    fully_shard(mod)
            fully_shard(raw)  # in place: `raw` keeps its class attributes (cfg, ...)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            moe = any(hasattr(m, "aux_loss") for m in raw.modules())
            fwd_model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None,
                            find_unused_parameters=moe)  # MoE experts may get no tokens in a step
    named_now = dict(raw.named_parameters())

    def lookup(spec):
        return [named_now[x] if isinstance(x, str) else x for x in spec]

    if group_spec and isinstance(group_spec[0], dict):
        groups = _param_groups([dict(g, params=lookup(g["params"])) for g in group_spec], cfg)
    else:
        groups = _param_groups(lookup(group_spec), cfg)
    trainable = [p for g in groups for p in g["params"]]
    extra_kw = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra_kw)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16" and device.type == "cuda")

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if state is not None:
        step, tokens_seen, elapsed_before = int(state["step"]), int(state["tokens_seen"]), float(state["elapsed_s"])
        if state.get("world_size", 1) != di.world_size:
            raise LmforgeError(f"checkpoint was written by {state.get('world_size', 1)} processes; resume with the same number")
        if cfg.fsdp and di.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(raw, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        if hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["data"][di.rank])
        _set_rng_state(state["rng"][di.rank])
        if extra_state is not None and state.get("extra") is not None:
            if hasattr(extra_state, "load_state_dict"):
                extra_state.load_state_dict(state["extra"])
            elif isinstance(extra_state, dict):
                extra_state.clear()
                extra_state.update(state["extra"])

    # -- run folder -----------------------------------------------------------------------
    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict] = []
    history_all: list[dict] = []
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        from lmforge.config import save_yaml

        save_yaml(config if config is not None else {"train": dataclasses.asdict(cfg)}, run_dir / "config.yaml")
        # a killed run may have logged steps past its last checkpoint: forget them
        kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        history_all = kept
    _barrier(di)

    if save_fn is None:
        from lmforge.loading import save_hf

        def save_fn(m, d):
            save_hf(m, tokenizer, d)

    def gather_model_state() -> dict:
        if cfg.fsdp and di.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            trainable_names = {n for n, p in raw.named_parameters(remove_duplicate=False) if p.requires_grad}
            return {n: t for n, t in full.items() if n in trainable_names}
        return {n: p.detach().cpu().clone() for n, p in raw.named_parameters(remove_duplicate=False) if p.requires_grad}

    def save_checkpoint(at_step: int) -> Path:
        data_states = _all_gather_objects(batches.state_dict() if hasattr(batches, "state_dict") else {}, di)
        rng_states = _all_gather_objects(_rng_state(), di)
        model_state = gather_model_state()
        if cfg.fsdp and di.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_state = get_optimizer_state_dict(raw, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = opt.state_dict()
        final = ckpt_root / _step_dir_name(at_step)
        if main:
            tmp = ckpt_root / (final.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_model = _model_for_saving(raw, model_state) if cfg.fsdp and di.enabled else raw
            save_fn(save_model, tmp)
            pause = _test_save_sleep(at_step)
            if pause:
                time.sleep(pause)
            extra = None
            if extra_state is not None:
                extra = extra_state.state_dict() if hasattr(extra_state, "state_dict") else dict(extra_state)
            trainer_state = {
                "step": at_step, "tokens_seen": tokens_seen, "elapsed_s": elapsed_before + (time.time() - t_start),
                "world_size": di.world_size, "model": model_state, "optimizer": opt_state,
                "scheduler": {"step": at_step, "lr_factor": lr_factor(max(at_step - 1, 0), cfg)},
                "data": data_states, "rng": rng_states, "extra": extra,
                "train_config": dataclasses.asdict(cfg),
            }
            if scaler.is_enabled():
                trainer_state["scaler"] = scaler.state_dict()
            torch.save(trainer_state, tmp / "trainer_state.pt")
            _fsync_tree(tmp)
            if final.exists():  # the same step written before a crash left `latest` behind it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(ckpt_root)
            _write_latest(run_dir, final)
            _prune(ckpt_root, cfg.keep_last, final)
        _barrier(di)
        return final

    def run_evals(at_step: int) -> dict:
        out = {}
        if eval_fn is None and sample_fn is None:
            return out
        was_training = raw.training
        raw.eval()
        with torch.no_grad(), _autocast(device, cfg.dtype):
            if eval_fn is not None:
                out.update({k: _to_float(v) if isinstance(v, (int, float, torch.Tensor)) else v for k, v in (eval_fn(raw) or {}).items()})
            if sample_fn is not None:
                sample = sample_fn(raw)
                if main and sample is not None:
                    rec = {"step": at_step, **(sample if isinstance(sample, dict) else {"text": sample})}
                    with open(run_dir / "samples.jsonl", "a") as f:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    _print(f"[step {at_step}] sample: {rec.get('text', rec)!r}")
        raw.train(was_training)
        return out

    bar = None

    def _print(msg: str) -> None:
        if not main:
            return
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    # -- loop -----------------------------------------------------------------------------
    t_start = time.time()
    raw.train()
    if main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True, leave=True)
    last_loss, last_record, stopped, ckpt = float("nan"), {}, "max_steps", None
    window_tokens, window_t0 = 0, time.time()
    last_saved = step if state is not None else -1
    start_step = step
    has_moe = any(type(m).__name__ == "MoE" for m in raw.modules())
    step_sleep = float(os.environ.get("LMFORGE_TEST_STEP_SLEEP", "0") or 0)
    while step < cfg.max_steps:
        factor = lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * factor * g.get("lr_scale", 1.0)
        sums: dict[str, float] = {}
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1
            ctx = fwd_model.no_sync() if (di.enabled and not sync and hasattr(fwd_model, "no_sync")) else nullcontext()
            with ctx:
                with _autocast(device, cfg.dtype):
                    loss, metrics = loss_fn(fwd_model, batch)
                    metrics = dict(metrics or {})
                    from lmforge.model import aux_losses

                    aux = aux_losses(raw)
                    total = loss + aux if isinstance(aux, torch.Tensor) else loss
                scaler.scale(total / cfg.grad_accum).backward()
            n_tok = metrics.pop("tokens", None)
            step_tokens += int(_to_float(n_tok)) if n_tok is not None else _count_tokens(batch)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            if isinstance(aux, torch.Tensor):
                sums["aux_loss"] = sums.get("aux_loss", 0.0) + float(aux.detach())
            if has_moe:
                from lmforge.moe import router_metrics

                metrics.update(router_metrics(raw))
            for k, v in metrics.items():
                if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool):
                    sums[k] = sums.get(k, 0.0) + _to_float(v)
        for m in raw.modules():  # drop the graph the MoE aux losses hold on to
            if getattr(m, "aux_loss", None) is not None:
                m.aux_loss = None
        if scaler.is_enabled():
            scaler.unscale_(opt)
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step_sleep:
            time.sleep(step_sleep)
        window_tokens += step_tokens

        do_log = step % max(1, cfg.log_every) == 0 or step == cfg.max_steps
        do_eval = (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == cfg.max_steps
        over_time = cfg.time_limit_s > 0 and elapsed_before + time.time() - t_start >= cfg.time_limit_s
        if di.enabled:  # every rank must agree to stop, or the next collective hangs
            flag = torch.tensor([1.0 if over_time else 0.0])
            import torch.distributed as dist

            if device.type == "cuda":
                flag = flag.to(device)
            dist.broadcast(flag, 0)
            over_time = bool(flag.item() > 0)
        if over_time:
            do_log = do_eval = True
        if do_log:
            vals = {k: v / cfg.grad_accum for k, v in sums.items()}
            if grad_norm is not None:
                vals["grad_norm"] = float(grad_norm)
            keys = sorted(vals)
            tok = window_tokens
            if di.enabled:
                import torch.distributed as dist

                t = torch.tensor([vals[k] for k in keys] + [float(tok)], dtype=torch.float64,
                                 device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(t)
                vals = {k: float(t[i]) / di.world_size for i, k in enumerate(keys)}
                if grad_norm is not None:
                    vals["grad_norm"] = float(grad_norm)  # already global after DDP's all-reduce
                tok = int(t[-1])
            now = time.time()
            dt = max(now - window_t0, 1e-9)
            tokens_seen_now = tokens_seen + tok
            elapsed = elapsed_before + now - t_start
            rate_steps = (step - start_step) / max(now - t_start, 1e-9)
            record = {"step": step, "loss": vals.pop("loss"), "lr": cfg.lr * factor, "tokens_per_s": tok / dt,
                      "tokens": tokens_seen_now, "elapsed_s": round(elapsed, 3),
                      "eta_s": round((cfg.max_steps - step) / max(rate_steps, 1e-9), 1), **vals}
            tokens_seen = tokens_seen_now
            window_tokens, window_t0 = 0, now
            last_loss = record["loss"]
        else:
            record = None
        if do_eval:
            ev = run_evals(step)
            if ev:
                record = {**(record or {"step": step}), **ev}
            window_t0 = time.time()  # tokens/s measures training, not evaluation
        if record is not None and main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            history.append(record)
            history_all.append(record)
            last_record = record
            if bar is not None:
                bar.set_postfix(loss=f"{record.get('loss', last_loss):.4f}", lr=f"{cfg.lr * factor:.2e}",
                                tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)
            if do_eval or over_time:
                evs = {k: v for k, v in record.items() if k.startswith(("val", "eval"))}
                if evs:
                    _print(f"[step {step}] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in evs.items()))
                _plots(history_all, run_dir)
        if bar is not None:
            bar.update(1)
        if (cfg.save_every > 0 and step % cfg.save_every == 0) and step != cfg.max_steps and not over_time:
            ckpt = save_checkpoint(step)
            last_saved = step
            window_t0 = time.time()
        if over_time:
            stopped = "time_limit"
            _print(f"time limit of {cfg.time_limit_s:.0f}s reached at step {step}; saving and stopping")
            break
    if bar is not None:
        bar.close()
    if step != last_saved:
        ckpt = save_checkpoint(step)
    elif ckpt is None and latest is not None:
        ckpt = latest
    if main:
        _plots(history_all, run_dir)
    return {"step": step, "loss": last_loss, "metrics": last_record, "history": history, "checkpoint": ckpt,
            "stopped": stopped, "run_dir": run_dir}


def _plots(records: list[dict], run_dir: Path) -> None:
    try:
        plot_metrics(records, run_dir / "plots")
    except Exception as e:  # a plot must never kill a training run
        print(f"warning: could not draw plots: {e}")


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
