"""`resolve_device(spec)`: what `--device auto|cpu|cuda|cuda:N|mps` means on this machine.

The one device story of every command that runs a model (and of `lmforge.load`): `auto` is
CUDA when present, else Apple's MPS, else the CPU. A device that is asked for but not there is a
one-line error naming the flag, never a stack trace from deep inside torch. Imports only torch
and lmforge.errors, so any module can use it without an import cycle.
"""
from __future__ import annotations

import re

import torch

from lmforge.errors import LmforgeError

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str = "auto") -> torch.device:
    """The torch.device that `--device` `device` names here (a torch.device is checked too)."""
    spec = str(device).strip().lower() if device is not None else "auto"
    if spec in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise LmforgeError(f"--device mps: MPS is not available on this machine (choose {CHOICES})")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise LmforgeError(f"unknown --device '{device}' (choose {CHOICES})")
    if not torch.cuda.is_available():
        raise LmforgeError(f"--device {spec}: CUDA is not available on this machine (choose {CHOICES}; auto falls back to cpu)")
    if m.group(1) is None:
        return torch.device("cuda")
    index, count = int(m.group(1)), torch.cuda.device_count()
    if index >= count:
        raise LmforgeError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1} (choose {CHOICES})")
    return torch.device("cuda", index)
