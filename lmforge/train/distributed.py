"""torchrun support for the trainer: rank info, the process group, DDP / FSDP2 wrapping."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.device import resolve_device


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP / torch.compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def all_gather_objects(obj, di: DistInfo) -> list:
    if not di.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * di.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(di: DistInfo) -> None:
    if di.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap_for_ranks(raw: nn.Module, di: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """The module the loss function calls: `raw` itself on one process, DDP around it, or `raw`
    sharded in place by FSDP2 (every compile unit, e.g. each transformer block, is a shard unit)."""
    if not di.enabled:
        return raw
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for mod in raw.modules():
            if getattr(mod, "compile_unit", False) and any(True for _ in mod.parameters()):
                fully_shard(mod)
        fully_shard(raw)  # in place: `raw` keeps its class attributes (cfg, ...)
        return raw
    from torch.nn.parallel import DistributedDataParallel as DDP

    moe = any(hasattr(m, "aux_loss") for m in raw.modules())
    return DDP(raw, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=moe)  # MoE experts may get no tokens in a step


def all_reduce_mean(values: dict[str, float], extra: float, di: DistInfo, device: torch.device) -> tuple[dict, float]:
    """(values averaged over ranks, `extra` summed over ranks): one collective for a log line."""
    if not di.enabled:
        return values, extra
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(extra)], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(t[i]) / di.world_size for i, k in enumerate(keys)}, float(t[-1])


def agree(flag: bool, di: DistInfo, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every rank (all must stop together or a collective hangs)."""
    return agree_value(1.0 if flag else 0.0, di, device) > 0


def agree_value(value: float, di: DistInfo, device: torch.device) -> float:
    """Rank 0's `value` on every rank (e.g. the clock, where ranks must use one learning rate)."""
    if not di.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return float(t.item())
