"""No stage mixes host and device tensors: a CI guard that needs no GPU.

Each stage's real code runs one step with the model on the `meta` device under DeviceGuard
(tests/_device_guard.py), which fails on any op whose inputs sit on two devices, the bug that
stopped pretraining at step 0 on an H200. The training step must also never read a value off
the device (that would stall a GPU every step); values are read only for the log line.
"""
from __future__ import annotations

import pytest
import torch

from _device_guard import DeviceGuard, DeviceMixError, meta_train_step
from conftest import tiny_config
from lmforge.model import Transformer


def _model(**kw):
    return Transformer(tiny_config(**kw)).init_weights(seed=0)


@pytest.fixture
def meta_generators(monkeypatch):
    """Meta tensors have no random generator; seeded sampling gets a CPU one (values are fake anyway)."""
    real = torch.Generator

    def make(device=None):
        return real(device="cpu" if device is not None and torch.device(device).type == "meta" else device or "cpu")

    monkeypatch.setattr(torch, "Generator", make)


def test_guard_catches_a_host_tensor_fed_to_a_meta_model(monkeypatch, tmp_path):
    """The guard can fail: a loss function that builds its targets on the host is caught."""
    from lmforge.train.batches import ListBatches

    def careless_loss(model, batch):
        ids = batch[:, :-1]
        logits = model(ids)
        targets = torch.zeros(ids.shape, dtype=torch.long)  # on the host, whatever the model's device
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()), {}

    data = ListBatches(list(torch.randint(0, 256, (8, 9))), 4, collate=torch.stack)
    with pytest.raises(DeviceMixError, match="meta"):
        meta_train_step(monkeypatch, _model(), careless_loss, data, tmp_path)


def test_pretrain_step_is_device_clean_and_never_waits(monkeypatch, tmp_path):
    from _pretrain_data import make_prepared
    from lmforge.data.prepare import open_prepared
    from lmforge.train.losses import lm_loss
    from lmforge.train.pretrain import TokenBatches

    prep = make_prepared(tmp_path / "corpus")
    data = open_prepared(prep["data"])
    batches = TokenBatches(data.train, batch_size=4, seq_len=16)
    guard = meta_train_step(monkeypatch, _model(vocab_size=data.vocab_size), lm_loss, batches, tmp_path / "run",
                            grad_accum=2)
    assert guard.reads_in_step == 0  # no host sync inside the optimizer step
    assert {"loss", "grad_norm", "tokens_per_s"} <= set(guard.record)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_step_is_device_clean(monkeypatch, tmp_path, method):
    from lmforge.finetune.lora import LoraSettings, apply_lora
    from lmforge.finetune.sft import SFTBatches, make_sft_loss

    rows = [([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]), ([7, 8, 9, 10], [0, 0, 1, 1]), ([11, 12, 13, 14, 15], [0, 1, 1, 1, 1])]
    model = _model()
    if method == "lora":
        apply_lora(model, LoraSettings(r=4))
    for pack in (False, True):
        batches = SFTBatches(rows, batch_size=2, seq_len=12, pad_id=0, pack=pack)
        meta_train_step(monkeypatch, model, make_sft_loss(), batches, tmp_path / f"{method}{pack}")


def _pair_rows():
    chosen = ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1])
    rejected = ([1, 2, 3, 9, 9, 9], [0, 0, 0, 1, 1, 1])
    return [{"chosen": chosen, "rejected": rejected, "ref_logps": (-3.0, -4.0)}] * 4


def test_reward_model_and_dpo_steps_are_device_clean(monkeypatch, tmp_path):
    from lmforge.align.dpo import dpo_batch_loss
    from lmforge.align.preference import collate_pairs
    from lmforge.align.reward_model import bt_loss, reward_model_from_lm
    from lmforge.train.batches import ListBatches

    rows = _pair_rows()
    pairs = ListBatches(rows, 2, collate=lambda xs: collate_pairs(xs, 0))
    meta_train_step(monkeypatch, _model(), dpo_batch_loss, pairs, tmp_path / "dpo")
    rm = reward_model_from_lm(_model())
    meta_train_step(monkeypatch, rm, bt_loss, ListBatches(rows, 2, collate=lambda xs: collate_pairs(xs, 0)), tmp_path / "rm")


def test_grpo_rollout_and_step_are_device_clean(monkeypatch, tmp_path, meta_generators):
    from lmforge.align.grpo import GRPOSettings, RolloutBatches, make_grpo_loss
    from lmforge.loading import load_tokenizer

    tok = load_tokenizer(None)
    model = _model(vocab_size=49152, tie_embeddings=True)
    settings = GRPOSettings(group_size=2, prompts_per_step=2, max_new_tokens=3, beta=0.0)
    records = [{"prompt": "What is 2 + 2?"}, {"prompt": "Say hi."}]
    batches = RolloutBatches(model, tok, records, lambda r, c: float(len(c) % 2), settings)
    meta_train_step(monkeypatch, model, make_grpo_loss(settings), batches, tmp_path / "rl")


def test_eval_scoring_and_perplexity_are_device_clean():
    from lmforge.eval.perplexity import score_token_ids
    from lmforge.eval.scoring import score_groups

    model = _model().to("meta").eval()
    with DeviceGuard():
        score_groups(model, [([1, 2, 3], [[4, 5], [6]]), ([7, 8], [[9]])])
        score_token_ids(model, [[1, 2, 3, 4, 5, 6, 7, 8]], window=4, stride=2)


@pytest.mark.parametrize("prompts", [[[1, 2, 3]], [[1, 2, 3], [4, 5]]], ids=["one-row", "batch"])
def test_engine_decoding_is_device_clean(prompts):
    from lmforge.engine import SamplingParams, generate_tokens

    model = _model().to("meta").eval()
    params = SamplingParams(max_new_tokens=4, temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.1)
    with DeviceGuard():
        out = list(generate_tokens(model, prompts, params))
    assert out and all(b < len(prompts) for b, _ in out)


def test_server_scheduler_step_is_device_clean(meta_generators):
    from lmforge.engine import SamplingParams
    from lmforge.loading import load_tokenizer
    from lmforge.serve.scheduler import GenRequest, Scheduler

    model = _model(vocab_size=49152, tie_embeddings=True).to("meta").eval()
    sched = Scheduler(model, load_tokenizer(None), slots=2, ctx=64)
    sched.cache = model.new_cache(2, 64)
    for prompt in ([1, 2, 3, 4], [5, 6]):
        sched.waiting.append(type("H", (), {"req": GenRequest(prompt, SamplingParams(max_new_tokens=3, temperature=0.7)),
                                            "cancelled": False, "push": lambda self, ev: None})())
    with DeviceGuard(), torch.inference_mode():
        for _ in range(3):
            sched._iteration()
    assert sched.stats.requests == 2
