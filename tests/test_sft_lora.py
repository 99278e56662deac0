"""LoRA: math, merge, and PEFT interop both ways (transformers + peft as independent references)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.finetune.lora import (
    LoRALinear, LoraSettings, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter,
    set_adapters_enabled, target_module_names,
)
from lmforge.model import Transformer

TOL = 1e-4


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(tiny_config()).init_weights(seed=seed).eval()


def _randomize(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


@pytest.fixture
def base_dir(tmp_path):
    from lmforge.loading import save_hf

    m = _tiny()
    save_hf(m, None, tmp_path / "base")
    return tmp_path / "base"


def _hf(base_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def _ours(base_dir):
    from lmforge.loading import load_model

    return load_model(str(base_dir))[0]


X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def test_lora_starts_at_zero_and_scales():
    m = _tiny()
    ref = m(X)
    params = apply_lora(m, LoraSettings(r=4, alpha=8, targets=["attention"]))
    assert torch.equal(m(X), ref)  # B = 0
    assert len(params) == 2 * 4 * 2  # A and B for q,k,v,o in 2 layers
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scaling == 2.0
    assert LoRALinear(torch.nn.Linear(8, 8), r=4, alpha=8, rslora=True).scaling == 4.0
    assert not isinstance(m.model.layers[0].mlp.up_proj, LoRALinear)
    assert "lm_head" not in target_module_names(_tiny(), ["all-linear"])


def test_merge_unmerge_and_disable():
    m = _tiny()
    ref = m(X)
    apply_lora(m, LoraSettings(r=4, alpha=16, targets=["all-linear"], dropout=0.1))
    _randomize(m)
    with torch.no_grad():
        out = m(X)  # eval mode: dropout off
        assert (out - ref).abs().max() > 1e-2
        set_adapters_enabled(m, False)
        assert torch.allclose(m(X), ref, atol=1e-6)
        set_adapters_enabled(m, True)
        q = m.model.layers[0].self_attn.q_proj
        q.merge()
        assert torch.allclose(m(X), out, atol=TOL)
        q.unmerge()
        merged = merge_lora(m)
        assert not lora_layers(merged)
        assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
        assert torch.allclose(merged(X), out, atol=TOL)


def test_our_adapter_in_peft(base_dir, tmp_path):
    """transformers + PeftModel on our saved adapter gives our logits."""
    peft = pytest.importorskip("peft")
    m = _ours(base_dir)
    apply_lora(m, LoraSettings(r=4, alpha=8, targets=["all-linear"], rslora=True))
    _randomize(m)
    save_adapter(m, tmp_path / "ad", base_model=str(base_dir))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True and cfg["r"] == 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 7 * 2
    with torch.no_grad():
        ours = m(X)
        hf = _hf(base_dir)
        base_logits = hf(X).logits
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()(X).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes something
    assert (ours - theirs).abs().max() <= TOL


def test_peft_adapter_in_lmforge(base_dir, tmp_path):
    """An adapter PEFT made (rsLoRA, per-module rank/alpha patterns) loads into lmforge."""
    peft = pytest.importorskip("peft")
    hf = _hf(base_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                          rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft_ad"))
    with torch.no_grad():
        theirs = pm(X).logits
    m = _ours(base_dir)
    settings = load_adapter(m, tmp_path / "peft_ad")
    assert settings.rslora
    layers = lora_layers(m)
    assert layers["model.layers.0.mlp.down_proj"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].alpha == 3
    with torch.no_grad():
        assert (m(X) - theirs).abs().max() <= TOL


def test_merge_command_gives_a_transformers_folder(base_dir, tmp_path):
    """`lmforge merge` folds a PEFT adapter into a full folder that transformers loads."""
    peft = pytest.importorskip("peft")
    from lmforge.cli.main import main

    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    with torch.no_grad():
        want = pm(X).logits
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        got = _hf(tmp_path / "merged")(X).logits
    assert (got - want).abs().max() <= TOL
    # lmforge loads the adapter folder directly too (the base comes from --model here, so name it)
    cfgp = tmp_path / "ad" / "adapter_config.json"
    c = json.loads(cfgp.read_text())
    c["base_model_name_or_path"] = str(base_dir)
    cfgp.write_text(json.dumps(c))
    from lmforge.loading import load_model

    m, _ = load_model(str(tmp_path / "ad"))
    with torch.no_grad():
        assert (m(X) - want).abs().max() <= TOL


def test_unsupported_adapters_are_refused(base_dir, tmp_path):
    m = _ours(base_dir)
    apply_lora(m, LoraSettings(r=2, targets=["q_proj"]))
    save_adapter(m, tmp_path / "ad")
    cfgp = tmp_path / "ad" / "adapter_config.json"
    c = json.loads(cfgp.read_text())
    c["use_dora"] = True
    cfgp.write_text(json.dumps(c))
    with pytest.raises(LmforgeError, match="use_dora"):
        load_adapter(_ours(base_dir), tmp_path / "ad")
    c["use_dora"] = False
    cfgp.write_text(json.dumps(c))
    other = Transformer(tiny_config(d_model=32, n_heads=2, n_kv_heads=1))
    with pytest.raises(LmforgeError, match="do not fit"):
        load_adapter(other, tmp_path / "ad")
