"""Sampling defaults: min-p, the model's generation_config.json, llama.cpp's top-k 40 / top-p 0.95
/ min-p 0.05 otherwise, the same in the CLI, the Python API and the server."""
from __future__ import annotations

import json

import pytest
import torch

from _align_tiny import tiny_lm_dir
from conftest import run_cli
from lmforge.engine import RECOMMENDED_SAMPLING, SamplingParams, recommended_sampling, sample_next


def test_min_p_keeps_exactly_what_transformers_keeps():
    from transformers.generation.logits_process import MinPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    for min_p in (0.05, 0.2, 0.6):
        ref = MinPLogitsWarper(min_p=min_p)(None, logits.clone())
        probs = logits.softmax(-1)
        ours = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        assert torch.equal(torch.isinf(ref), torch.isinf(ours))
        draws = torch.stack([sample_next(logits, SamplingParams(temperature=1.0, min_p=min_p), g) for _ in range(200)])
        kept = ~torch.isinf(ref)
        assert kept.gather(1, draws.T).all()  # never a token min-p removed


def test_generation_config_is_the_models_recommendation(tmp_path):
    from lmforge.loading import load_model

    d = tiny_lm_dir(tmp_path / "m")
    model, _ = load_model(str(d))
    assert recommended_sampling(model) == RECOMMENDED_SAMPLING  # no generation_config.json: llama.cpp's
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1}))
    model, _ = load_model(str(d))
    assert recommended_sampling(model) == {"top_k": 40, "top_p": 0.9, "min_p": 0.05, "temperature": 0.6}
    (d / "generation_config.json").write_text("{not json")
    model, _ = load_model(str(d))
    assert recommended_sampling(model) == RECOMMENDED_SAMPLING


@pytest.fixture(scope="module")
def top1_model(tmp_path_factory):
    """A model whose generation_config.json says top_k 1: sampling at any temperature is greedy."""
    d = tiny_lm_dir(tmp_path_factory.mktemp("top1") / "m")
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 1}))
    return d


def test_cli_and_api_take_the_models_recommendation(top1_model, capsys):
    import lmforge

    common = ["--model", str(top1_model), "--dtype", "fp32", "--quant", "none", "--raw", "--max-new-tokens", "8",
              "--prompt", "The capital of France is", "--draft", "none"]
    greedy = run_cli(capsys, "generate", *common, "--stream", "false")
    hot = run_cli(capsys, "generate", *common, "--temperature", "1.5", "--seed", "1", "--stream", "false")
    assert greedy.returncode == hot.returncode == 0, hot.stderr
    assert hot.stdout == greedy.stdout  # top_k 1 from the model's file
    free = run_cli(capsys, "generate", *common, "--temperature", "1.5", "--seed", "1", "--top-k", "0", "--min-p", "0",
                   "--top-p", "1", "--stream", "false")
    assert free.returncode == 0 and free.stdout != greedy.stdout  # the user's flags win

    lm = lmforge.load(str(top1_model), device="cpu")
    assert lm.generate("The capital of France is", max_new_tokens=8, temperature=1.5, seed=1) == \
        lm.generate("The capital of France is", max_new_tokens=8)


def test_server_takes_the_models_recommendation(top1_model):
    from fastapi.testclient import TestClient

    from lmforge.loading import load_model
    from lmforge.serve.app import create_app

    model, tok = load_model(str(top1_model))
    with TestClient(create_app(model, tok)) as client:
        def complete(**kw):
            r = client.post("/v1/completions", json={"model": "x", "prompt": "The capital of France is", "max_tokens": 8, **kw})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert complete(seed=1) == complete(temperature=0)  # temperature 1.0 by default, but top_k 1 from the file
        assert complete(seed=1, top_k=0, min_p=0.0, top_p=1.0, temperature=1.5) != complete(temperature=0)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_top_p_min_p_draws_follow_transformers_warpers(ties):
    """sample_next draws among the top-k candidates only (the server samples every row every
    step); the draws must follow the distribution transformers' warpers leave over the whole vocabulary."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 500, generator=g) * 2
    if ties:  # tokens tied with the k-th: both keep them all
        kth = logits.topk(8).values[0, -1]
        logits[0, logits[0] < kth] = torch.where(torch.rand(int((logits[0] < kth).sum()), generator=g) < 0.01, kth, -5.0)
    top_p = 1.0 if ties else 0.9  # (which of several tied tokens top-p cuts is either library's choice)
    p = SamplingParams(temperature=0.8, top_k=8, top_p=top_p, min_p=0.05)
    ref = logits.clone()
    for w in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(8), TopPLogitsWarper(top_p), MinPLogitsWarper(0.05)):
        ref = w(None, ref)
    want = ref.softmax(-1)[0]
    n = 40000
    draws = sample_next(logits.expand(n, -1).contiguous(), p, g)
    got = torch.bincount(draws, minlength=500).float() / n
    assert set(draws.unique().tolist()) <= set(torch.nonzero(want).flatten().tolist())
    assert (got - want).abs().max() < 0.012, (got - want).abs().max()
