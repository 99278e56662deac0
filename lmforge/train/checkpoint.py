"""Atomic checkpoints of a training run: `checkpoints/step-NNNNNN/` written as `.tmp`, fsynced,
renamed, then `latest` replaced atomically; RNG states so a resumed run continues exactly."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.train.manifest import damage, newest_intact, write_manifest


def rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(py[1]) + [py[2] if py[2] is not None else -1],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((3, tuple(int(x) for x in py[:-1]), None if py[-1] == -1 else py[-1]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
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


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` points at when it is complete and matches
    its manifest, else (with a warning naming the damaged one) the newest intact one; None when
    the run has no `latest`. Never a `.tmp` folder."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest"
    if not latest.exists():
        return None
    target = Path(os.readlink(latest)) if latest.is_symlink() else Path(latest.read_text().strip())
    target = target if target.is_absolute() else run_dir / target
    if target.name.endswith(".tmp") or not (target / "trainer_state.pt").exists():
        raise LmforgeError(f"{latest} points at {target}, which is not a complete checkpoint")
    why = damage(target)
    if why is None:
        return target
    print(f"warning: checkpoint {target.name} is damaged ({why}); looking for an earlier one", flush=True)
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir() and p != target)
    found = newest_intact(done, lambda p: (p / "trainer_state.pt").exists())
    if found is None:
        raise LmforgeError(f"{run_dir}: checkpoint {target.name} is damaged ({why}) and no intact earlier one is left")
    print(f"warning: resuming from {found.name} instead", flush=True)
    return found


def write_latest(run_dir: Path, target: Path) -> None:
    tmp = run_dir / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(str(target.relative_to(run_dir)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "latest")
    fsync_dir(run_dir)


def prune(ckpt_root: Path, keep_last: int, keep: Path) -> None:
    for stale in ckpt_root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        if old.resolve() != keep.resolve():
            shutil.rmtree(old, ignore_errors=True)


def commit_checkpoint(run_dir: Path, at_step: int, write_model, trainer_state: dict, keep_last: int,
                      mid_save=None) -> Path:
    """Write one checkpoint atomically: `write_model(tmp_dir)`, then `trainer_state.pt`, fsync,
    rename, move `latest`, prune. `mid_save(step, tmp_dir)` runs between the model files and the
    trainer state (tests kill the process there to prove a half-written checkpoint is never read)."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / step_dir_name(at_step)
    tmp = ckpt_root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_model(tmp)
    if mid_save is not None:
        mid_save(at_step, tmp)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    write_manifest(tmp)  # last: a checkpoint without it complete is one that never finished
    fsync_tree(tmp)
    if final.exists():  # the same step written before a crash left `latest` behind it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    write_latest(run_dir, final)
    prune(ckpt_root, keep_last, final)
    return final
