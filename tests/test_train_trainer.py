"""The trainer loop in process: schedule, accumulation, checkpointing, resume, the smoke recipe."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.train import ListBatches, TrainConfig, latest_checkpoint, lr_factor, read_metrics, train
from lmforge.train.losses import lm_loss

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from _pretrain_data import make_prepared

    return make_prepared(tmp_path_factory.mktemp("corpus"))


def _data(n=48, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 256, (n, T), generator=g))


def _run(run_dir, steps=8, batch=8, accum=1, resume=None, **kw):
    model = Transformer(tiny_config()).init_weights(seed=0)
    batches = ListBatches(_data(), batch, collate=torch.stack, seed=1)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=steps, log_every=1, grad_accum=accum, **kw)
    return train(model, lm_loss, batches, cfg, run_dir, resume=resume, progress=False), model


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_lr_schedule_shapes():
    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.55)  # cosine midpoint between 1 and 0.1
    assert lr_factor(110, c) == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, warmup_steps=0, max_steps=100, min_lr_ratio=0.0, schedule="linear")
    assert lr_factor(25, lin) == pytest.approx(0.75)
    const = TrainConfig(warmup_steps=0, schedule="constant")
    assert lr_factor(500, const) == 1.0
    with pytest.raises(LmforgeError):
        lr_factor(5, TrainConfig(warmup_steps=0, schedule="bogus"))


def test_grad_accum_equals_big_batch(tmp_path):
    """4 examples x 2 micro-batches make the same optimizer steps as one batch of 8."""
    _run(tmp_path / "big", steps=5, batch=8, accum=1)
    _run(tmp_path / "acc", steps=5, batch=4, accum=2)
    a, b = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_activation_checkpointing_same_losses(tmp_path):
    _run(tmp_path / "plain", steps=3)
    _run(tmp_path / "ckpt", steps=3, activation_checkpointing=True)
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_bf16_autocast_trains(tmp_path):
    res, _ = _run(tmp_path / "bf16", steps=6, dtype="bf16")
    losses = _losses(tmp_path / "bf16")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert res["checkpoint"] is not None


def test_checkpoint_layout_and_resume_in_process(tmp_path):
    run = tmp_path / "run"
    res, model = _run(run, steps=12, save_every=4, keep_last=2)
    ref = _losses(run)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000008", "step-000012"]  # keep_last=2; the final one is always written
    assert (run / "latest").read_text().strip() == "checkpoints/step-000012"
    for f in ("config.json", "model.safetensors", "trainer_state.pt"):
        assert (run / "checkpoints/step-000012" / f).exists()
    assert (run / "config.yaml").exists() and (run / "plots" / "loss.png").exists()
    rec = read_metrics(run / "metrics.jsonl")[0]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rec)
    # go back to step 8 as if the run had died there, and resume: the same losses, step for step
    (run / "latest").write_text("checkpoints/step-000008\n")
    res2, model2 = _run(run, steps=12, save_every=4, keep_last=2)
    assert res2["history"][0]["step"] == 9
    assert len(_losses(run)) == 12
    assert max(abs(x - y) for x, y in zip(ref, _losses(run))) < 1e-6
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(LmforgeError, match="already holds a run"):
        _run(run, steps=12, resume=False)


def test_latest_never_points_at_tmp(tmp_path):
    (tmp_path / "checkpoints" / "step-000004.tmp").mkdir(parents=True)
    (tmp_path / "latest").write_text("checkpoints/step-000004.tmp\n")
    with pytest.raises(LmforgeError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    with pytest.raises(LmforgeError, match="no complete checkpoint"):
        _run(tmp_path / "fresh", resume=True)


def test_list_batches_ranks_are_disjoint_slices():
    data = list(range(20))
    whole = ListBatches(data, 4, seed=3)
    r0, r1 = ListBatches(data, 4, seed=3), ListBatches(data, 4, seed=3)
    r0.set_rank(0, 2)
    r1.set_rank(1, 2)
    for _ in range(7):  # crosses an epoch boundary
        g = whole.next_batch()
        assert r0.next_batch() + r1.next_batch() == g


def test_token_batches_global_batch_is_independent_of_world_size():
    from lmforge.train.pretrain import TokenBatches

    class Arr:
        def __init__(self, n):
            self.a = torch.arange(n)

        def __len__(self):
            return len(self.a)

        def read(self, s, n):
            return self.a[s:s + n].numpy()

    whole = TokenBatches(Arr(1000), 6, 16, seed=2)
    ranks = [TokenBatches(Arr(1000), 6, 16, seed=2) for _ in range(3)]
    for r, tb in enumerate(ranks):
        tb.set_rank(r, 3)
    for _ in range(25):
        g = whole.next_batch()
        parts = [tb.next_batch() for tb in ranks]
        assert torch.equal(torch.cat(parts), g)
        firsts = [set(p[:, 0].tolist()) for p in parts]
        assert not (firsts[0] & firsts[1]) and not (firsts[1] & firsts[2])


def test_smoke_recipe_loss_falls_and_checkpoint_loads(prepared, tmp_path):
    """The smoke recipe end to end in process; transformers loads the result with equal logits."""
    from lmforge.config import from_dict, load_yaml
    from lmforge.loading import load_model
    from lmforge.train.pretrain import PretrainConfig, run_pretrain

    raw = load_yaml(REPO / "recipes/pretrain/smoke.yaml")
    raw["data"].update(dir=str(prepared["data"]), heldout=str(prepared["heldout"]))
    raw["out"] = str(tmp_path / "smoke")
    cfg = from_dict(PretrainConfig, raw)
    res = run_pretrain(cfg)
    losses = _losses(tmp_path / "smoke")
    assert len(losses) == cfg.train.max_steps
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0  # a clear fall, not noise
    last = res["metrics"]
    assert last["val_bpb"] > 0 and last["heldout_bpb"] > 0 and last["val_loss"] < losses[0]
    samples = [json.loads(x) for x in (tmp_path / "smoke" / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[-1]["text"].startswith("The")
    # the run folder loads with our loader and with transformers, with equal logits
    ours, tok = load_model(tmp_path / "smoke")
    assert tok is not None
    import transformers

    ckpt = latest_checkpoint(tmp_path / "smoke")
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The cat sees the red ball today.")])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def test_resume_skips_a_damaged_checkpoint_and_matches_the_uninterrupted_run(tmp_path, capsys):
    """Each file of the newest checkpoint truncated in turn: resume (and `--model RUN`) fall back
    to the intact earlier checkpoint, say which one was skipped, and the losses from there on
    equal an uninterrupted run's."""
    import shutil

    from lmforge.loading.load import resolve_run_folder

    base = tmp_path / "base"
    _run(base, steps=10, save_every=4, keep_last=0)  # checkpoints at steps 4, 8 and 10
    ref = _losses(base)
    shutil.rmtree(base / "checkpoints" / "step-000010")  # as if the run had died after step 8
    (base / "latest").write_text("checkpoints/step-000008\n")
    newest = base / "checkpoints" / "step-000008"
    files = sorted(p.name for p in newest.iterdir())
    assert "manifest.json" in files and "trainer_state.pt" in files and "model.safetensors" in files
    for name in files:
        run = tmp_path / f"cut-{name}"
        shutil.copytree(base, run)
        victim = run / "checkpoints" / "step-000008" / name
        victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 2)])
        assert resolve_run_folder(run).name == "step-000004", name  # the loader never reads it
        capsys.readouterr()
        res, _ = _run(run, steps=10, save_every=4, keep_last=0)
        assert "damaged" in capsys.readouterr().out
        assert res["history"][0]["step"] == 5, name  # resumed after step 4
        assert max(abs(x - y) for x, y in zip(ref, _losses(run))) < 1e-6, name
        assert latest_checkpoint(run).name == "step-000010"


def test_time_limit_stops_without_the_final_eval(tmp_path, capsys):
    """A run stopped by its time limit checkpoints and ends: the final eval and sample, which
    can take longer than the training itself, are skipped with a note."""
    calls = []
    model = Transformer(tiny_config()).init_weights(seed=0)
    batches = ListBatches(_data(), 8, collate=torch.stack, seed=1)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=50, log_every=100, eval_every=0, time_limit_s=1e-6)
    res = train(model, lm_loss, batches, cfg, tmp_path / "run", progress=False,
                eval_fn=lambda m: calls.append("eval") or {"val_loss": 0.0}, sample_fn=lambda m: calls.append("sample"))
    assert res["stopped"] == "time_limit" and res["step"] == 1 and calls == []
    assert "final eval and sample are skipped" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step-000001"
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 1  # the loss is still logged


def test_time_clock_schedule_decays_on_the_clock(tmp_path):
    """`schedule_clock: time` decays over `time_limit_s` of wall-clock time, whatever the steps:
    a run sized by a budget ends at its minimum learning rate on a fast or a slow machine."""
    c = TrainConfig(lr=1.0, warmup_steps=2, max_steps=10**6, min_lr_ratio=0.1, time_limit_s=100, schedule_clock="time")
    assert lr_factor(0, c, 0.0) == pytest.approx(0.5)  # warmup still counts steps
    assert lr_factor(7, c, 0.0) == pytest.approx(1.0)
    assert lr_factor(7, c, 50.0) == pytest.approx(0.55)  # cosine midpoint at half the time
    assert lr_factor(7, c, 150.0) == pytest.approx(0.1)
    steps = TrainConfig(lr=1.0, warmup_steps=2, max_steps=12, min_lr_ratio=0.1, time_limit_s=100)
    assert lr_factor(7, steps, 99.0) == pytest.approx(0.55)  # the default clock ignores time
    with pytest.raises(LmforgeError, match="schedule_clock"):
        lr_factor(7, TrainConfig(warmup_steps=0, schedule_clock="sundial"), 1.0)
    import time as _time

    model = Transformer(tiny_config()).init_weights(seed=0)
    batches = ListBatches(_data(), 8, collate=torch.stack, seed=1)
    cfg = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=10**6, log_every=1, time_limit_s=5.0, schedule_clock="time")
    t0 = _time.time()
    res = train(model, lm_loss, batches, cfg, tmp_path / "run", progress=False)
    assert res["stopped"] == "time_limit" and _time.time() - t0 < 30
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert len(lrs) > 3 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # falls with the clock
    assert lrs[-1] < 0.2 * cfg.lr  # near lr * min_lr_ratio when the time is up
