"""Mixture of Experts: top-k routing, capacity dropping, the load-balancing loss and its gradient,
parity with transformers' Mixtral / Qwen2-MoE, and a MoE run that loads and chats like a dense one."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from lmforge.model import Transformer, aux_losses
from lmforge.moe import MoE, hf_state_to_lmforge, router_metrics


def _moe(**kw):
    torch.manual_seed(0)
    cfg = tiny_config(n_experts=4, n_experts_per_token=2, moe_d_ff=32, **kw)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m, cfg


def _reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over experts, top-k, renormalize, weighted sum of expert MLPs."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = F.softmax(m.gate(x[t]).float(), -1)
        w, ids = torch.topk(p, m.top_k)
        w = w / w.sum()
        for wi, e in zip(w, ids):
            out[t] += wi * m.experts[int(e)](x[t])
    return out


def test_topk_routing_matches_token_by_token_reference():
    m, _ = _moe()
    m.eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        got = m(x).reshape(-1, 64)
        want = _reference(m, x.reshape(-1, 64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert m.aux_loss is None  # no balancing loss outside training


def test_capacity_drops_overflow_in_training_only():
    m, _ = _moe(moe_capacity_factor=0.5)
    with torch.no_grad():  # make expert 0 everyone's first choice: it must overflow
        m.gate.weight[0] = 0
        m.gate.weight[0, 0] = 50.0
    x = torch.randn(32, 64)
    x[:, 0] = x[:, 0].abs() + 1.0
    N, E, k = 32, 4, 2
    capacity = math.ceil(0.5 * N * k / E)  # 8 of the 32 first choices fit
    m.train()
    y_train = m(x)
    assert m.last_dropped > 0
    # tokens 0..7 keep expert 0; a later token lost it: its output lacks expert 0's share
    _, w, ids = m.route(x)
    assert (ids[:, 0] == 0).all()
    kept = torch.zeros_like(x)
    for t in range(N):
        for j in range(k):
            e = int(ids[t, j])
            if e == 0 and t >= capacity:
                continue  # dropped: first choices are served in token order
            kept[t] += w[t, j] * m.experts[e](x[t])
    # the second choices may overflow too; compare only tokens whose second choice fitted
    second = ids[:, 1]
    slot = torch.stack([(second[: t + 1] == second[t]).sum() - 1 for t in range(N)])
    ok = slot < capacity
    assert ok.sum() > 0
    torch.testing.assert_close(y_train[ok], kept[ok], rtol=1e-5, atol=1e-5)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-5)  # inference never drops
    assert m.last_dropped == 0.0


def test_aux_loss_is_switch_balance_and_has_a_gradient():
    m, cfg = _moe(moe_aux_loss_coef=0.1)
    m.train()
    x = torch.randn(64, 64)
    m(x)
    probs, _, ids = m.route(x)
    f = torch.bincount(ids.reshape(-1), minlength=4).float() / ids.numel()
    want = 0.1 * 4 * (f * probs.mean(0)).sum()
    assert torch.allclose(m.aux_loss, want, atol=1e-6)
    m.aux_loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    # gradient descent on the aux loss alone evens out the load
    m2, _ = _moe(moe_aux_loss_coef=1.0)
    with torch.no_grad():
        m2.gate.weight[0] += 0.5 * x.mean(0) / x.mean(0).norm()  # skew toward expert 0
    opt = torch.optim.SGD(m2.gate.parameters(), lr=2.0)
    m2.train()
    m2(x)
    first = m2.aux_loss.item()
    for _ in range(30):
        opt.zero_grad()
        m2(x)
        m2.aux_loss.backward()
        opt.step()
    m2(x)
    assert m2.aux_loss.item() < first
    # in a full model: aux_losses sums the layers' losses
    model = Transformer(tiny_config(n_experts=4, moe_d_ff=32)).init_weights(seed=0).train()
    model(torch.randint(0, 256, (2, 8)))
    total = aux_losses(model)
    assert torch.allclose(total, sum(l.mlp.aux_loss for l in model.model.layers))
    stats = router_metrics(model)
    assert abs(sum(stats[f"router_load_e{i}"] for i in range(4)) - 1.0) < 1e-6


@pytest.mark.parametrize("shared", [0, 1], ids=["mixtral", "qwen2_moe"])
def test_moe_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, shared):
    import transformers

    from lmforge.loading import load_model, save_hf

    cfg = tiny_config(n_experts=4, n_experts_per_token=2, moe_d_ff=48, n_shared_experts=shared)
    m = Transformer(cfg).init_weights(seed=1).eval()
    save_hf(m, None, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(ref).__name__ == ("MixtralForCausalLM" if not shared else "Qwen2MoeForCausalLM")
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        ours = m(ids)
        assert (ours - ref(ids).logits).abs().max() < 1e-4
        # transformers' own in-memory layout (fused experts in v5) converts back to ours
        state = hf_state_to_lmforge({k: v for k, v in ref.state_dict().items()}, cfg)
        m2 = Transformer(cfg)
        m2.load_state_dict(state, strict=True)
        assert (m2.eval()(ids) - ours).abs().max() < 1e-5
        # and what transformers saves loads back into lmforge
        ref.save_pretrained(tmp_path / "hf_saved")
        m3, _ = load_model(tmp_path / "hf_saved")
        assert (m3(ids) - ours).abs().max() < 1e-5


def test_moe_pretrain_run_logs_router_load_and_chats(tmp_path_factory):
    from _pretrain_data import make_prepared

    from lmforge.config import from_dict, load_yaml
    from lmforge.engine import SamplingParams, generate_text
    from lmforge.loading import load_model
    from lmforge.train import read_metrics
    from lmforge.train.pretrain import PretrainConfig, run_pretrain
    from pathlib import Path

    prepared = make_prepared(tmp_path_factory.mktemp("corpus"))
    raw = load_yaml(Path(__file__).resolve().parents[1] / "recipes/pretrain/smoke.yaml")
    out = tmp_path_factory.mktemp("moe_run")
    raw["data"].update(dir=str(prepared["data"]), eval_tokens=256)
    raw["model"].update(n_experts=4, n_experts_per_token=2, moe_capacity_factor=1.25)
    raw["train"].update(max_steps=6, eval_every=0, save_every=0)
    raw.update(out=str(out), sample_tokens=0)
    res = run_pretrain(from_dict(PretrainConfig, raw))
    recs = read_metrics(out / "metrics.jsonl")
    assert all("router_load_e3" in r and "aux_loss" in r and "moe_drop_frac" in r for r in recs)
    assert res["params"]["active"] < res["params"]["total"]
    model, tok = load_model(out)
    assert model.cfg.n_experts == 4 and model.cfg.moe_capacity_factor == 1.25
    text = generate_text(model, tok, [tok.encode("The cat")], SamplingParams(max_new_tokens=8))[0]
    assert text["completion_tokens"] > 0
