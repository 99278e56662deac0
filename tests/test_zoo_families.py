"""Model families beyond LLaMA (issue 18): each against `transformers` on tiny random configs
that exercise its features, through every path lmforge runs a model on."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def sharpen(ref, factor: float = 3.0):
    """Larger weights: greedy choices are not near ties (a random tiny model's top two logits
    can sit 0.003 apart, and a cached and a recomputed forward round differently)."""
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return ref


def _ours_from(ref):
    from lmforge.loading.hf import config_from_hf
    from lmforge.loading.load import build_model

    return build_model(config_from_hf(ref.config.to_dict()), {k: v.clone() for k, v in ref.state_dict().items()})


def randomize_norms(ref):
    """Norm weights away from 1 and biases away from 0, so a misplaced one shows."""
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
            elif p.dim() == 1 and "norm" in n:  # around 1 (LLaMA's w) or around 0 (Gemma's 1 + w)
                p.uniform_(0.5, 1.5) if p.mean() > 0.5 else p.uniform_(-0.5, 0.5)
    return ref


SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def mistral(window: int = 8, vocab: int = 256, **kw):
    cfg = transformers.MistralConfig(vocab_size=vocab, head_dim=16, sliding_window=window, **{**SIZES, **kw})
    torch.manual_seed(0)
    return sharpen(transformers.MistralForCausalLM(cfg).eval())


def llama31(vocab: int = 256, **kw):
    """Llama 3.1's "llama3" RoPE: long wavelengths slowed 8x, short ones kept, a blend between
    (three of the 16 frequencies here, with an original context of 128)."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}
    cfg = transformers.LlamaConfig(vocab_size=vocab, head_dim=32, rope_parameters=rope, **{**SIZES, **kw})
    torch.manual_seed(5)
    return sharpen(transformers.LlamaForCausalLM(cfg).eval())


def qwen3(vocab: int = 256, **kw):
    """Qwen3: RMSNorm of every query and key head before RoPE, head_dim apart from the width."""
    cfg = transformers.Qwen3Config(vocab_size=vocab, head_dim=32, tie_word_embeddings=True, **{**SIZES, **kw})
    torch.manual_seed(2)
    return sharpen(randomize_norms(transformers.Qwen3ForCausalLM(cfg).eval()))


def qwen2_mixed_windows(window: int = 6):
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide, the first do not."""
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=window, max_window_layers=1, max_position_embeddings=256)
    torch.manual_seed(1)
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    return sharpen(randomize_norms(ref))


def qwen3_moe():
    """Qwen3-MoE: Qwen3's attention, routed experts (softmax, top-k, renormalized), no shared one."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=256, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32, norm_topk_prob=True, **SIZES)
    torch.manual_seed(3)
    return sharpen(randomize_norms(transformers.Qwen3MoeForCausalLM(cfg).eval()))


def mixtral():
    """Mixtral: LLaMA attention, routed experts (softmax, top-2, renormalized)."""
    cfg = transformers.MixtralConfig(vocab_size=256, head_dim=16, num_local_experts=4, num_experts_per_tok=2, **SIZES)
    torch.manual_seed(6)
    return sharpen(transformers.MixtralForCausalLM(cfg).eval())


def qwen2_moe():
    """Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, routed experts whose top-k weights stay as they are,
    and a shared expert behind a sigmoid gate."""
    cfg = transformers.Qwen2MoeConfig(vocab_size=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=96, norm_topk_prob=False, decoder_sparse_step=1,
                                      mlp_only_layers=[], **SIZES)
    torch.manual_seed(7)
    return sharpen(randomize_norms(transformers.Qwen2MoeForCausalLM(cfg).eval()))


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 8,
        "beta_slow": 1}


def llama_yarn():
    """LLaMA layers with YaRN (Qwen2.5's long-context setting): frequencies blended between kept
    and interpolated over a ramp, cos and sin scaled by YaRN's mscale."""
    cfg = transformers.LlamaConfig(vocab_size=256, head_dim=16, rope_parameters=YARN, **SIZES)
    torch.manual_seed(12)
    return sharpen(transformers.LlamaForCausalLM(cfg).eval())


def deepseek_v2(q_lora_rank=None, method="greedy", rope=None):
    """DeepSeek-V2: multi-head latent attention (keys and values from a latent, a RoPE part turned
    in adjacent pairs, values narrower than keys), a dense first layer, then routed experts whose
    weights are scaled and never renormalized, ungated shared experts, group-limited routing."""
    cfg = transformers.DeepseekV2Config(vocab_size=256, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_nope_head_dim=16,
                                        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
                                        n_shared_experts=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                        routed_scaling_factor=1.5, topk_method=method, n_group=2, topk_group=1,
                                        **({"rope_parameters": rope} if rope else {}), **{**SIZES, "num_key_value_heads": 4})
    torch.manual_seed(11)
    ref = transformers.DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():  # a router and experts far from zero, so routing mistakes show
        for n, p in ref.named_parameters():
            if p.dim() == 3 or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)
    return sharpen(randomize_norms(ref))


def gemma2():
    """Gemma 2: GeGLU, (1 + w) norms before and after attention and MLP, scaled embeddings,
    soft-capped scores (low caps, so they bite) and logits, local/global layers, its own scale."""
    cfg = transformers.Gemma2Config(vocab_size=256, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=5.0, **SIZES)
    torch.manual_seed(4)
    return sharpen(randomize_norms(transformers.Gemma2ForCausalLM(cfg).eval()), 2.0)


def gemma3():
    """Gemma 3 text: Gemma 2's layers without soft-caps, (1 + w) q/k norms, and a local RoPE base
    for the sliding layers beside a scaled global one (5 local : 1 global; here 2 : 1)."""
    cfg = transformers.Gemma3TextConfig(vocab_size=256, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}},
                                        **SIZES)
    torch.manual_seed(5)
    return sharpen(randomize_norms(transformers.Gemma3ForCausalLM(cfg).eval()), 2.0)


def phi3(window: int | None = 10):
    """Phi-3: fused q|k|v and gate|up weights, LongRoPE (short factors up to the original 48
    positions, long ones and an attention factor past them), a sliding window."""
    head = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    cfg = transformers.Phi3Config(vocab_size=256, original_max_position_embeddings=48, sliding_window=window, pad_token_id=0,
                                  rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(head // 2)],
                                                "long_factor": [2.0 + 0.7 * i for i in range(head // 2)]},
                                  **{**SIZES, "max_position_embeddings": 192})
    torch.manual_seed(6)
    return sharpen(randomize_norms(transformers.Phi3ForCausalLM(cfg).eval()))


def olmo2():
    """OLMo 2: norms after attention and MLP only, RMSNorm of the whole q and k projections."""
    cfg = transformers.Olmo2Config(vocab_size=256, pad_token_id=0, eos_token_id=1, **SIZES)
    torch.manual_seed(7)
    return sharpen(randomize_norms(transformers.Olmo2ForCausalLM(cfg).eval()))


def smollm3(vocab: int = 256, **kw):
    """SmolLM3: LLaMA layers, every 4th without RoPE ("NoPE"), tied embeddings."""
    cfg = transformers.SmolLM3Config(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layer_interval=2,
                                     rope_theta=10000.0, **{**SIZES, "num_hidden_layers": 4, **kw})
    torch.manual_seed(8)
    return sharpen(randomize_norms(transformers.SmolLM3ForCausalLM(cfg).eval()))


def gpt2():
    """GPT-2: LayerNorm, learned positions, GELU MLP, Conv1D weights, biases, tied head."""
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(9)
    return sharpen(randomize_norms(transformers.GPT2LMHeadModel(cfg).eval()))


FAMILIES = {"llama3.1": llama31, "mistral-window-8": mistral, "qwen2-mixed-windows": qwen2_mixed_windows, "qwen3": qwen3, "qwen3-moe": qwen3_moe,
            "gemma2": gemma2, "gemma3": gemma3, "phi3": phi3, "olmo2": olmo2, "smollm3": smollm3, "gpt2": gpt2,
            "llama-yarn": llama_yarn, "deepseek-v2-moe": deepseek_v2,
            # V2-Lite's YaRN: DeepSeek's mscale and mscale_all_dim, the latter also in the scores' scale
            "deepseek-v2-moe-q-latent-groups-yarn": lambda: deepseek_v2(24, "group_limited_greedy",
                                                                         {**YARN, "mscale": 0.707, "mscale_all_dim": 0.8})}
DENSE = [f for f in FAMILIES if "moe" not in f]  # PEFT cannot target transformers-5's fused expert weights
# with the default tokenizer's vocabulary, for GGUF files (a GGUF carries its tokenizer)
GGUF_FAMILIES = {"mistral-window-5": lambda: mistral(window=5, vocab=49152, tie_word_embeddings=True),
                 "qwen3": lambda: qwen3(vocab=49152)}



@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_past_the_window(family):
    """A 28-token prompt (windows of 6-8: every position past the window differs unless the
    window is applied; it did by 0.6 before)."""
    ref = FAMILIES[family]()
    ours = _ours_from(ref)
    ids = torch.randint(0, 256, (2, 28), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_phi3_long_factors_past_the_original_context():
    """Past 48 positions LongRoPE's long factors and attention factor apply (to the whole call,
    as transformers does): a 60-token prompt."""
    ref = phi3()
    ours = _ours_from(ref)
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["engine", "fast"])
def test_cached_greedy_decoding_equals_transformers_generate(family, path, monkeypatch):
    """Greedy continuation far past the window: lmforge's KV-cache engine and its fast decoder
    give transformers.generate's tokens."""
    from lmforge.engine import SamplingParams, generate_tokens

    monkeypatch.setenv("LMFORGE_FAST", "1" if path == "fast" else "0")
    ref = FAMILIES[family]()
    ours = _ours_from(ref)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
        want = out[0, 12:].tolist()
        recomputed = ours(out)[0, 11:-1].argmax(-1).tolist()  # every token from the full sequence at once
        got = [t for _, t in generate_tokens(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=24, temperature=0.0, stop_ids=set()))]
    assert got == want == recomputed


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_to_hf_loads_in_transformers_with_equal_logits(family, tmp_path):
    from lmforge.loading import save_hf

    ref = FAMILIES[family]()
    ours = _ours_from(ref)
    save_hf(ours, None, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(ref)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.fixture
def tokenizer():
    from lmforge.loading import load_tokenizer
    from lmforge.loading.resolve import default_model_path

    if default_model_path() is None:
        pytest.skip("default model (its tokenizer) not installed")
    return load_tokenizer(None)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_round_trip(family, tmp_path, tokenizer):
    """convert --to gguf and back: the family's features survive (window, q/k norms)."""
    import lmforge
    from lmforge.export.gguf import write_gguf

    ref = GGUF_FAMILIES[family]()
    ours = _ours_from(ref)
    path = write_gguf(ours, tokenizer, tmp_path / "m.gguf", "f16")
    back = lmforge.load(str(path), quant="none", device="cpu").model
    assert (back.cfg.sliding_window, back.cfg.qk_norm) == (ours.cfg.sliding_window, ours.cfg.qk_norm)
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
        assert (back(ids) - want).abs().max().item() <= 2e-3 * want.abs().max().item()  # f16 weights


@pytest.mark.parametrize("family", list(GGUF_FAMILIES) + ["nope-layers"])
def test_the_native_step_runs_the_family(family, monkeypatch, tmp_path, tokenizer):
    """GGUF blocks of each family: the one-call native step, the layer-by-layer fast decoder
    and the plain forward agree at every position (past the window, through the q/k norms)."""
    from lmforge import native

    if native.library() is None:
        pytest.skip("no native kernels here")
    import lmforge
    from lmforge.export.gguf import write_gguf
    from lmforge.fast.decode import FastDecoder

    ours = _ours_from(GGUF_FAMILIES.get(family, GGUF_FAMILIES["qwen3"])())
    lm = lmforge.load(str(write_gguf(ours, tokenizer, tmp_path / "m.gguf", "q8_0")), quant="auto", device="cpu")
    assert lm.model.quant == "gguf"
    if family == "nope-layers":  # SmolLM3's layers without RoPE (its GGUF export is not there yet)
        lm.model.cfg.rope_layers = [True, False, True]
        for i, layer in enumerate(lm.model.model.layers):
            layer.self_attn.rope = lm.model.cfg.uses_rope(i)
    ids = torch.randint(0, 49152, (16,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = lm.model(ids[None])[0]
        for step in ("1", "0"):
            monkeypatch.setenv("LMFORGE_NATIVE_STEP", step)
            dec = FastDecoder(lm.model)
            dec.reset(32)
            rows = [dec.forward(ids[:4])] + [dec.forward(ids[i : i + 1]) for i in range(4, 16)]
            assert (dec.native_step() is not None) == (step == "1")
            assert (torch.cat(rows) - full[3:]).abs().max().item() <= 1e-4 * full.abs().max().item(), step


# MoE families: PEFT cannot target transformers-5's fused expert tensors, so the adapter both
# sides can hold is on attention (the router and experts stay as they are)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_lora_adapter_loads_in_peft_with_equal_outputs(family, tmp_path):
    peft = pytest.importorskip("peft")
    from lmforge.finetune.lora import LoraSettings, apply_lora, lora_layers, save_adapter
    from lmforge.loading import load_model

    ref = FAMILIES[family]()
    ref.save_pretrained(tmp_path / "base")
    ours = load_model(str(tmp_path / "base"))[0]
    apply_lora(ours, LoraSettings(r=4, alpha=8, targets=["attention"] if family not in DENSE else ["all-linear"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_layers(ours).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    save_adapter(ours, tmp_path / "ad", base_model=str(tmp_path / "base"))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        mine, base = ours(ids), ref(ids).logits
        theirs = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()(ids).logits
    assert (mine - base).abs().max().item() > 1e-2  # the adapter changes something
    assert (mine - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


@pytest.mark.parametrize("family,says", [("qwen3", "family:      Qwen3: grouped-query attention (4 query heads, 2 key/value heads); RMSNorm of each query and key head"),
                                         ("mistral-window-8", "sliding-window attention (8 positions, every layer)"),
                                         ("qwen2-mixed-windows", "sliding-window attention (6 positions, 2 of 3 layers); q/k/v biases"),
                                         ("gemma2", "family:      Gemma 2: grouped-query attention (4 query heads, 2 key/value heads); "
                                                    "sliding-window attention (6 positions, 2 of 3 layers); norms before and after"),
                                         ("deepseek-v2-moe-q-latent-groups-yarn",
                                          "family:      DeepSeek-V2: multi-head latent attention (keys and values from a 32-wide latent, "
                                          "queries from a 24-wide latent; RoPE on 8 of 24 key dimensions); RoPE scaling yarn; mixture of "
                                          "experts (4 experts, top-2 + 2 shared; the first 1 layers dense)")])
def test_info_names_the_family_and_its_features(family, says, tmp_path, capsys):
    from conftest import run_cli

    FAMILIES[family]().save_pretrained(tmp_path / "m")
    r = run_cli(capsys, "info", "--model", str(tmp_path / "m"))
    assert r.returncode == 0 and says in r.stdout, r.stdout


def test_an_unsupported_family_is_one_line_naming_it(tmp_path, capsys):
    from conftest import run_cli

    cfg = transformers.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    transformers.FalconForCausalLM(cfg).save_pretrained(tmp_path / "f")
    r = run_cli(capsys, "info", "--model", str(tmp_path / "f"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert "unsupported architecture 'falcon'" in r.stderr and "gpt2" in r.stderr


def test_training_losses_see_the_capped_logits():
    """The loss inside forward (pretraining) and SFT's chunked loss use the soft-capped logits
    that inference and transformers use."""
    import torch.nn.functional as F

    from lmforge.finetune.sft import lm_loss_sum

    ours = _ours_from(gemma2())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))
    targets = torch.roll(ids, -1, 1)
    with torch.no_grad():
        want = F.cross_entropy(ours(ids).flatten(0, 1), targets.flatten())
        assert torch.allclose(ours(ids, targets=targets), want, atol=1e-5)
        h = ours(ids, hidden_only=True).flatten(0, 1)
        sft = lm_loss_sum(h, ours.lm_head.weight, targets.flatten(), chunk=7, cap=ours.cfg.final_logit_softcap) / targets.numel()
        assert torch.allclose(sft, want, atol=1e-5)
        assert not torch.allclose(lm_loss_sum(h, ours.lm_head.weight, targets.flatten()) / targets.numel(), want, atol=1e-3)


@pytest.mark.parametrize("family,targets", [("phi3", ["qkv_proj", "gate_up_proj", "o_proj"]),
                                             ("gpt2", ["c_attn", "c_proj", "c_fc"])])
def test_peft_adapters_on_fused_layers_load_into_lmforge(family, targets, tmp_path):
    """Ours -> PEFT is tested above (fused on save); a PEFT adapter on the family's own fused
    layers (Phi-3's qkv_proj / gate_up_proj, GPT-2's Conv1D c_attn) loads into lmforge's
    separate ones with equal outputs."""
    peft = pytest.importorskip("peft")
    from lmforge.finetune.lora import load_adapter
    from lmforge.loading import load_model

    ref = FAMILIES[family]()
    ref.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, task_type="CAUSAL_LM",
                                                  fan_in_fan_out=family == "gpt2"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(12))
    ours = load_model(str(tmp_path / "base"))[0]
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        want = pm(ids).logits
        assert (ours(ids) - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.slow
def test_llama_cpp_runs_our_qwen3_gguf(tmp_path, tokenizer):
    """Our Qwen3 GGUF (arch qwen3, attn_q_norm/attn_k_norm tensors) is one llama.cpp reads: its
    greedy tokens are lmforge's."""
    from test_export_gguf import llama_and_lmforge_greedy, llama_python

    from lmforge.export.gguf import write_gguf

    py = llama_python()
    if py is None:
        pytest.skip("llama-cpp-python is not installed (set LMFORGE_LLAMA_PYTHON to a Python that has it)")
    ours = _ours_from(qwen3(vocab=49152))
    path = write_gguf(ours, tokenizer, tmp_path / "qwen3.gguf", "f16")
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog", add_bos=False)
    theirs, mine = llama_and_lmforge_greedy(py, path, ids, 8)
    assert len(theirs) >= 4 and theirs == mine


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_maps_rebuild_the_layers_output(family):
    """`lmforge inspect attention` recomputes each layer's probabilities from the layer's own
    queries and keys (q/k norms, NoPE layers, soft-caps, windows shorter than the prompt, MLA's
    latents): rebuilt from them, the attention output is what the layer computed."""
    from lmforge.inspect.attention import attention_maps

    ours = _ours_from(FAMILIES[family]())
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    for layer in range(ours.cfg.n_layers):
        res = attention_maps(ours, ids, layer)
        assert torch.allclose(res.output, res.real_output, atol=1e-4), (family, layer)
        assert torch.allclose(res.probs.sum(-1), torch.ones(res.probs.shape[:2]), atol=1e-5)
