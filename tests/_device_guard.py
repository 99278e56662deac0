"""A CPU-only stand-in for "the model is on a GPU": the model goes to the `meta` device and every
op is checked for mixing devices, so a stage that builds a tensor on the host and feeds it to
the model fails here exactly as it would on CUDA ("Expected all tensors to be on the same
device"). Meta tensors hold no values: a host read (`.item()`, `int()`, `bool()`) gets a fixed
stand-in value and is counted, so a test can also assert how often a step waits for the device.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# Ops whose whole point is to move data between devices.
COPIES = {aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}  # (dst, src)
CASTS = {aten._to_copy.default, aten.to.dtype_layout, aten.to.device, aten.to.dtype, aten.to.other}  # (src, ...)
TRANSFERS = COPIES | CASTS
READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
STAND_IN = 7  # what an integer read of a meta tensor returns (a token id, a length)


class DeviceMixError(AssertionError):
    pass


class DeviceGuard(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0
        self.ops = 0

    def __enter__(self):
        # boolean-mask indexing (h[mask]) has no data-free shape: let meta assume every element is kept
        import torch.fx.experimental._config as fx_config

        self._nonzero = fx_config.meta_nonzero_assume_all_nonzero
        fx_config.meta_nonzero_assume_all_nonzero = True
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.fx.experimental._config as fx_config

        fx_config.meta_nonzero_assume_all_nonzero = self._nonzero
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func not in TRANSFERS:
            # 0-dim CPU tensors are scalars that torch itself lets every device use
            devices = {t.device for t in tensors if not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise DeviceMixError(f"{func} mixes devices {sorted(map(str, devices))}")
        if func in TRANSFERS and _source(func, args).is_meta and _target(func, args, kwargs).type != "meta":
            self.reads += 1  # a meta tensor read back to the host: zeros stand in for its values
            return _host_stand_in(func, args, kwargs)
        if func in READS and tensors[0].is_meta:
            self.reads += 1
            if func is aten.is_nonzero.default or tensors[0].dtype == torch.bool:
                return False
            return 0.0 if tensors[0].is_floating_point() else STAND_IN
        return func(*args, **kwargs)


def _source(func, args) -> torch.Tensor:
    return args[1] if func in COPIES else args[0]


def _target(func, args, kwargs) -> torch.device:
    if func in COPIES:
        return args[0].device
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    if func is aten.to.device:
        return torch.device(args[1])
    if func is aten.to.other:
        return args[1].device
    return args[0].device


def _host_stand_in(func, args, kwargs):
    if func in COPIES:
        return args[0].zero_()
    src = args[0]
    dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None) or src.dtype
    return torch.zeros(src.shape, dtype=dtype, device=_target(func, args, kwargs))


def meta_train_step(monkeypatch, model, loss_fn, batches, tmp_path, **cfg):
    """One optimizer step of the real trainer (setup, batch to device, loss, backward, clip,
    AdamW, the log line) with the model on `meta`, under the guard. Returns the guard."""
    import lmforge.train.trainer as trainer

    monkeypatch.setattr(trainer, "resolve_device", lambda spec="auto": torch.device("meta"))
    run = trainer._setup(model, loss_fn, batches, trainer.TrainConfig(**{"warmup_steps": 1, "max_steps": 1, **cfg}),
                         tmp_path, None, trainer.TrainHooks())
    with DeviceGuard() as guard:
        sums, tokens, grad_norm = trainer._step(run)
        reads_in_step = guard.reads
        run.step = 1
        run.window_tokens = tokens
        record = trainer._log_record(run, sums, grad_norm)
    assert all(p.is_meta for p in model.parameters())
    guard.reads_in_step = reads_in_step
    guard.record = record
    return guard
