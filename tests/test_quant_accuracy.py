"""Runtime quantization: perplexity on held-out prose against full precision, and the kernels'
building blocks (exact fusion, 4-bit grids, per-token activations)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from lmforge.model import Transformer
from lmforge.quant import QuantLinear, fuse_quant_linears, int4_groupwise, quantize_int8, quantize_model

HELDOUT = Path(__file__).parent / "data" / "heldout_prose.txt"  # written for these tests; not training data


@torch.inference_mode()
def perplexity(model, ids: list[int], chunk: int = 512) -> float:
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, chunk):
        x = torch.tensor([ids[s : s + chunk + 1]])
        logits = model(x[:, :-1]).float()[0]
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    return math.exp(nll / n)


def test_default_model_perplexity_int8_int4(default_lm):
    lm = default_lm
    ids = lm.tokenizer.encode(HELDOUT.read_text())
    assert len(ids) > 900
    base = perplexity(lm.model, ids)
    assert base < 40  # sanity: the model reads English
    for quant, bar in (("int8", 0.02), ("int4", 0.10)):
        q = quantize_model(copy.deepcopy(lm.model), quant, tokenizer=lm.tokenizer)
        ppl = perplexity(q, ids)
        assert ppl / base - 1 <= bar, f"{quant}: perplexity {ppl:.3f} vs fp32 {base:.3f}"
        del q


def test_quant_linear_close_to_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(5, 96)
    ref = lin(x)
    for scheme, tol in (("int8", 0.02), ("int4", 0.15)):
        q = QuantLinear.from_float(lin.weight, lin.bias, scheme, smooth=torch.rand(96) + 0.5)
        for rows in (x, x[:1]):  # the several-token kernel and the one-token kernel
            err = (q(rows) - lin(rows)).abs().max() / ref.abs().max()
            assert err < tol, (scheme, rows.shape, err)
        w_err = (q.dequantized_weight() - lin.weight).abs().max() / lin.weight.abs().max()
        assert w_err < (0.02 if scheme == "int8" else 0.25)  # int4: half a 4-bit step, times 1/smoothing


def test_int4_grid_recovers_q4_weights():
    torch.manual_seed(0)
    d = torch.rand(8, 4, 1) * 0.1 + 0.01
    m = -torch.rand(8, 4, 1)
    q = torch.randint(0, 16, (8, 4, 32)).float()
    q[..., 0], q[..., 1] = 2, 13  # levels 2..13 used: the grid spacing is not span / 15
    w = (m + d * q).view(8, 128)
    assert torch.allclose(int4_groupwise(w), w, atol=1e-6)
    levels = int4_groupwise(torch.randn(8, 128)).view(8, 4, 32)
    assert all(len(torch.unique(g)) <= 16 for g in levels.reshape(-1, 32))


def test_fusion_is_exact():
    torch.manual_seed(0)
    ws = [torch.randn(n, 64) for n in (32, 16, 16)]
    s = torch.rand(64) + 0.5
    parts = [QuantLinear.from_float(w, None, "int8", smooth=s) for w in ws]
    order = torch.randperm(16)
    fused = fuse_quant_linears(parts, [None, order, None])
    x = torch.randn(3, 64)
    want = torch.cat([parts[0](x), parts[1](x)[:, order], parts[2](x)], dim=-1)
    assert torch.equal(fused(x), want)


def test_quantize_model_keeps_names_and_runs():
    torch.manual_seed(0)
    m = Transformer(tiny_config()).init_weights(seed=0).eval()
    names = set(dict(m.named_modules()))
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = m(x)
        q = quantize_model(copy.deepcopy(m), "int8")
        assert set(dict(q.named_modules())) == names
        assert isinstance(q.model.layers[1].self_attn.k_proj, QuantLinear) and isinstance(q.lm_head, QuantLinear)
        got = q(x)
    assert (got - ref).abs().max() / ref.abs().max() < 0.05
    with pytest.raises(Exception, match="int8 or int4"):
        quantize_model(copy.deepcopy(m), "int3")


def test_int8_weights_per_row():
    w = torch.tensor([[1.0, -2.0, 0.5], [100.0, 50.0, -25.0]])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(q.float() * s[:, None], w, rtol=0.01)


def test_quantized_model_state_dict_and_copy():
    torch.manual_seed(0)
    m = Transformer(tiny_config()).init_weights(seed=0).eval()
    q = quantize_model(copy.deepcopy(m), "int8")
    sd = q.state_dict()
    assert set(sd) == set(m.state_dict())  # float weights under the usual keys
    w = m.model.layers[0].mlp.down_proj.weight
    assert (sd["model.layers.0.mlp.down_proj.weight"] - w).abs().max() < 0.02 * w.abs().max()
    q2 = copy.deepcopy(q)
    x = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
