"""DDP on CPU with gloo and 2 processes (torchrun): equals one process on the same global batch,
and each rank trains on its own data (changing only rank 1's windows changes the result)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.train import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from _pretrain_data import make_prepared

    return make_prepared(tmp_path_factory.mktemp("corpus"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(data_dir, out, nproc=1, extra=()):
    args = ["pretrain", "--config", str(REPO / "recipes/pretrain/smoke.yaml"), "--data.dir", str(data_dir),
            "--out", str(out), "--train.max_steps", str(STEPS), "--train.eval_every", "0", "--train.save_every", "0",
            "--data.eval_tokens", "256", "--threads", "1", "--sample_tokens", "0", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge.cli.main", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "lmforge.cli.main", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_TEST_")}
    p = subprocess.run(cmd, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")]


def _rank_windows(data_dir, rank, world, steps):
    """The windows `rank` reads in the first `steps` steps (the same sampler the run uses)."""
    from lmforge.config import load_yaml
    from lmforge.data.prepare import open_prepared
    from lmforge.train.pretrain import TokenBatches

    d = load_yaml(REPO / "recipes/pretrain/smoke.yaml")["data"]
    tb = TokenBatches(open_prepared(data_dir).train, d["batch_size"], d["seq_len"], seed=d.get("seed", 0))
    tb.set_rank(rank, world)
    return [w for _ in range(steps) for w in tb.rank_windows(tb.global_windows())], d["seq_len"]


def test_ddp_two_ranks_equals_single_process_and_ranks_read_their_own_data(prepared, tmp_path):
    single = _pretrain(prepared["data"], tmp_path / "single")
    ddp = _pretrain(prepared["data"], tmp_path / "ddp", nproc=2)
    assert len(single) == len(ddp) == STEPS
    assert max(abs(a - b) for a, b in zip(single, ddp)) < 1e-5, (single, ddp)

    # rank 1's windows only: overwrite their interior tokens in a copy of the data
    r0, _ = _rank_windows(prepared["data"], 0, 2, STEPS)
    r1, T = _rank_windows(prepared["data"], 1, 2, STEPS)
    assert r1 and not set(r0) & set(r1)
    changed = tmp_path / "changed"
    shutil.copytree(prepared["data"], changed)
    arr = np.memmap(changed / "train_000.bin", dtype=np.uint16, mode="r+")
    for w in r1:
        arr[w * T + 1:w * T + T] = (arr[w * T + 1:w * T + T].astype(np.int64) * 7 + 3) % 256
    arr.flush()
    del arr
    ddp_changed = _pretrain(changed, tmp_path / "ddp_changed", nproc=2)
    assert abs(ddp_changed[0] - ddp[0]) > 1e-3  # rank 1's data counts in the very first step
    assert all(abs(a - b) > 1e-4 for a, b in zip(ddp, ddp_changed))


@pytest.mark.slow
def test_fsdp_two_ranks_equals_single_process(prepared, tmp_path):
    single = _pretrain(prepared["data"], tmp_path / "single")
    fsdp = _pretrain(prepared["data"], tmp_path / "fsdp", nproc=2, extra=["--train.fsdp"])
    assert max(abs(a - b) for a, b in zip(single, fsdp)) < 1e-5, (single, fsdp)
    from lmforge.loading import load_model
    import torch

    a, _ = load_model(tmp_path / "single")
    b, _ = load_model(tmp_path / "fsdp")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() < 1e-4
