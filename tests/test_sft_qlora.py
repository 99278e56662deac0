"""QLoRA: quantized frozen base (int8 / nf4 / int4) with fp32 LoRA on top."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from lmforge.finetune.lora import LoraSettings, apply_lora, lora_layers
from lmforge.finetune.qlora import KINDS, QuantLinear, nf4_codebook, quantize_base
from lmforge.model import Transformer


def _weight(out_f=96, in_f=128, seed=0):
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    return lin


def test_nf4_codebook():
    book = nf4_codebook()
    assert book.numel() == 16 and book[0] == -1 and book[-1] == 1 and (book == 0).sum() == 1
    assert torch.all(book[1:] > book[:-1])
    assert (book > 0).sum() == 8 and (book < 0).sum() == 7  # asymmetric: 0 exact, one more positive level


@pytest.mark.parametrize("kind,max_rel", [("int8", 0.02), ("nf4", 0.15), ("int4", 0.2)])
def test_quantization_error_and_size(kind, max_rel):
    lin = _weight()
    q = QuantLinear(lin, kind)
    w = q.dequantize()
    rel = float((w - lin.weight.detach()).abs().mean() / lin.weight.detach().abs().mean())
    assert rel < max_rel
    bits = q.qweight.numel() * q.qweight.element_size() * 8 / lin.weight.numel()
    assert bits == (8 if kind == "int8" else 4)


@pytest.mark.parametrize("kind", KINDS)
def test_quant_linear_matches_dense_with_dequantized_weight(kind):
    lin = _weight(seed=1)
    q = QuantLinear(lin, kind)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, q.dequantize(), lin.bias)
    y2.square().sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


def test_graph_never_holds_a_dequantized_weight():
    """Only the quantized codes stay alive between forward and backward (that is the saving)."""
    lin = _weight(out_f=256, in_f=256)
    layer = apply_lora_to_single(QuantLinear(lin, "nf4"))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (256, 256) not in [s for s, _ in saved]
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None


def apply_lora_to_single(base):
    from lmforge.finetune.lora import LoRALinear

    m = LoRALinear(base, r=4, alpha=8)
    torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    return m


def test_qlora_model_trains_only_adapters():
    torch.manual_seed(0)
    m = Transformer(tiny_config()).init_weights(seed=0)
    x = torch.randint(0, 256, (2, 16))
    ref = m(x).detach()
    n = quantize_base(m, "nf4")
    assert n == 2 * 7  # every linear layer of the blocks; the output head stays
    params = apply_lora(m, LoraSettings(r=4, alpha=8))
    out = m(x)
    err = float((out.detach() - ref).abs().mean() / ref.abs().mean())
    assert 0 < err < 0.25  # 4-bit weights: close to the fp32 model, not equal
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in params)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(isinstance(layer.base_layer, QuantLinear) for layer in lora_layers(m).values())
