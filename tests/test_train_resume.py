"""SIGKILL a pretraining run between checkpoints and in the middle of writing one; the resumed
run reproduces the uninterrupted run's loss step for step and never loads a half-written checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.train import latest_checkpoint, read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from _pretrain_data import make_prepared

    return make_prepared(tmp_path_factory.mktemp("corpus"))


def _cmd(prepared, out, hooks=()):
    return [sys.executable, str(REPO / "tests/_pretrain_with_hooks.py"), *hooks, "pretrain", "--config", str(REPO / "recipes/pretrain/smoke.yaml"),
            "--data.dir", str(prepared["data"]), "--out", str(out), "--train.max_steps", str(STEPS),
            "--train.save_every", "4", "--train.keep_last", "0", "--train.eval_every", "0", "--data.eval_tokens", "256",
            "--threads", "1", "--sample_tokens", "0"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _run(prepared, out):
    p = subprocess.run(_cmd(prepared, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def _start_and_kill(prepared, out, ready, hooks, timeout=240):
    """Start a run, SIGKILL it as soon as `ready()` holds."""
    proc = subprocess.Popen(_cmd(prepared, out, hooks), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()[-2000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError("timed out waiting to kill the run")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def _last_step(run):
    recs = read_metrics(run / "metrics.jsonl")
    return recs[-1]["step"] if recs else 0


def test_sigkill_between_and_during_checkpoint_write_then_resume(prepared, tmp_path):
    ref_dir, run = tmp_path / "ref", tmp_path / "run"
    _run(prepared, ref_dir)
    ref = _losses(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))

    # 1. killed between checkpoints: steps past the last checkpoint were logged, then lost
    def between():
        return (run / "latest").exists() and _last_step(run) >= 6
    _start_and_kill(prepared, run, between, ["--step-sleep", "0.3"])
    saved = int(latest_checkpoint(run).name.split("-")[1])
    assert saved in (4, 8) and _last_step(run) > saved

    # 2. resumed, then killed while writing the step-12 checkpoint (model files written, state not)
    tmp12 = run / "checkpoints" / "step-000012.tmp"
    _start_and_kill(prepared, run, lambda: (tmp12 / "model.safetensors").exists(), ["--save-sleep", "12:120"])
    assert tmp12.exists() and not (tmp12 / "trainer_state.pt").exists()
    assert latest_checkpoint(run).name == "step-000008"  # `latest` never moved to the half-written one
    from lmforge.loading.load import resolve_run_folder

    assert resolve_run_folder(run).name == "step-000008"  # nor does the model loader read it

    # 3. resumed to the end: the very same losses as the run that was never interrupted
    _run(prepared, run)
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) for s in ref)
    assert worst < 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    assert latest_checkpoint(run).name == f"step-{STEPS:06d}"
    assert not list((run / "checkpoints").glob("*.tmp"))
