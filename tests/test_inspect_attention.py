"""Attention maps are the probabilities the layer really used: rebuilt output == real output, and
they equal transformers' eager attention weights on the same weights."""
from __future__ import annotations

import pytest
import torch

from lmforge.inspect.attention import attention_maps, render_attention_png
from lmforge.model import Transformer
from conftest import tiny_config


def test_recomputed_attention_reproduces_the_layer_output():
    model = Transformer(tiny_config(n_layers=3)).init_weights(seed=4).eval()
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    for layer in range(3):
        res = attention_maps(model, ids, layer)
        assert res.probs.shape == (model.cfg.n_heads, 20, 20)
        assert (res.output - res.real_output).abs().max().item() <= 1e-5
        assert torch.allclose(res.probs.sum(-1), torch.ones(model.cfg.n_heads, 20), atol=1e-5)
        assert res.probs.triu(1).abs().max().item() == 0.0  # causal
    with pytest.raises(Exception, match="between 0 and 2"):
        attention_maps(model, ids, 3)


def test_attention_equals_transformers_eager_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.loading.hf import config_to_hf

    model = Transformer(tiny_config(n_layers=2, n_kv_heads=2)).init_weights(seed=5).eval()
    hf_cfg = transformers.LlamaConfig(**config_to_hf(model.cfg))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    ids = list(range(3, 19))
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True).attentions
    for layer in range(2):
        assert (attention_maps(model, ids, layer).probs - ref[layer][0]).abs().max().item() <= 1e-5


def test_attention_png_for_the_france_prompt(default_lm, tmp_path):
    tok = default_lm.tokenizer
    ids = tok.encode("The capital of France is")
    layer = default_lm.model.cfg.n_layers // 2
    res = attention_maps(default_lm.model, ids, layer, tok)
    assert (res.output - res.real_output).abs().max().item() <= 1e-4
    png = render_attention_png(res, tmp_path / "attn.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert res.tokens[-1] == " is"
