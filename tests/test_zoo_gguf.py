"""GGUF in and out for the zoo's families (issue 18), in llama.cpp's own layout: tiny random
models of each family (tests/test_zoo_families.py's builders) written as GGUF, read back by
lmforge with equal logits, run by llama.cpp (slow) with lmforge's greedy tokens, and holding
the keys and tensors llama.cpp's converter (convert_hf_to_gguf.py) writes for the family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_export_gguf import TEMPLATE, llama_and_lmforge_greedy, llama_python  # noqa: E402
from test_zoo_families import _ours_from, gemma2, gemma3, llama31, mixtral, olmo2, phi3, qwen2_moe, qwen3_moe, smollm3  # noqa: E402
from test_zoo_families import gpt2 as gpt2_model  # noqa: E402

import lmforge  # noqa: E402
from lmforge.export.gguf import unsupported_reason, write_gguf  # noqa: E402

VOCAB = 320  # the tokenizer's: a GGUF carries its tokenizer, so the model's vocabulary holds it


@pytest.fixture(scope="module")
def tiny_tok():
    """A byte-level BPE of 320 tokens trained here, splitting digits first as SmolLM's does
    (llama.cpp's pre-tokenizer "smollm")."""
    from pathlib import Path

    from tokenizers import Tokenizer as HFT, decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer import Tokenizer

    text = (Path(__file__).parent / "data" / "heldout_prose.txt").read_text().split("\n")
    bk = HFT(models.BPE())
    bk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bk.train_from_iterator(text, trainer)
    return Tokenizer(bk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE)


def widened(ref, n: int = VOCAB):
    """The family's tiny model with `n` embeddings (new rows random, as large as the old)."""
    old = ref.get_input_embeddings().weight.shape[0]
    ref.resize_token_embeddings(n, mean_resizing=False)
    g = torch.Generator().manual_seed(n)
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (ref.get_input_embeddings(), ref.get_output_embeddings())}.values():
            w[old:] = torch.randn(w[old:].shape, generator=g) * w[:old].std()
    return ref.eval()


# the families and llama.cpp's architecture for each; SmolLM3's NoPE layers as llama.cpp has
# them (every 4th, fixed there)
FAMILIES = {
    "llama3.1": (llama31, "llama"),
    "gemma2": (gemma2, "gemma2"),
    "gemma3": (gemma3, "gemma3"),
    "phi3": (phi3, "phi3"),
    "olmo2": (olmo2, "olmo2"),
    "gpt2": (gpt2_model, "gpt2"),
    "smollm3": (lambda: smollm3(no_rope_layers=[1, 1, 1, 0]), "smollm3"),
    "qwen3-moe": (qwen3_moe, "qwen3moe"),
    "mixtral": (mixtral, "llama"),
    "qwen2-moe": (qwen2_moe, "qwen2moe"),
}
# what llama.cpp's converter writes for each architecture (beside general.* and tokenizer.*),
# and tensors that show its layout
COMMON = ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count"]
ROPE = ["attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base"]
KEYS = {
    "llama": COMMON + ROPE,
    "mixtral": COMMON + ROPE + ["expert_count", "expert_used_count"],
    "gemma2": COMMON + ROPE + ["attention.key_length", "attention.value_length", "attn_logit_softcapping",
                               "final_logit_softcapping", "attention.sliding_window"],
    "gemma3": COMMON + ROPE + ["attention.key_length", "attention.value_length", "attention.sliding_window",
                               "rope.freq_base_swa", "rope.scaling.type", "rope.scaling.factor"],
    "phi3": COMMON + ROPE + ["rope.dimension_count", "rope.scaling.original_context_length", "rope.scaling.attn_factor",
                             "attention.sliding_window"],
    "olmo2": COMMON + ROPE,
    "gpt2": COMMON + ["attention.layer_norm_epsilon"],
    "smollm3": COMMON + ROPE + ["vocab_size", "rope.dimension_count"],
    "qwen3moe": COMMON + ROPE + ["attention.key_length", "attention.value_length", "expert_count", "expert_used_count",
                                 "expert_feed_forward_length"],
    "qwen2moe": COMMON + ROPE + ["expert_count", "expert_used_count", "expert_feed_forward_length",
                                 "expert_shared_feed_forward_length"],
}
TENSORS = {
    "llama": ["rope_freqs.weight"],
    "mixtral": ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"],
    "gemma2": ["blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"],
    "gemma3": ["blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight"],
    "phi3": ["blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "rope_factors_long.weight", "rope_factors_short.weight"],
    "olmo2": ["blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight", "output.weight"],
    "gpt2": ["position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "blk.0.attn_output.bias",
             "output_norm.bias", "blk.0.ffn_up.bias"],
    "smollm3": ["blk.0.attn_q.weight", "blk.0.ffn_gate.weight"],
    "qwen3moe": ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"],
    "qwen2moe": ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_gate_inp_shexp.weight",
                 "blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight", "blk.0.attn_q.bias"],
}
ABSENT = {"gemma2": ["output.weight"], "phi3": ["blk.0.attn_q.weight", "blk.0.ffn_gate.weight"], "gpt2": ["blk.0.attn_q.weight"],
          "qwen3moe": ["blk.0.ffn_gate.weight"], "qwen2moe": ["blk.0.ffn_gate.weight"]}


def f16_rounded(model):
    """The model with its matrices rounded to f16 (what an f16 file holds; norms stay f32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def written(tiny_tok, tmp_path_factory):
    """family -> (lmforge model with f16-exact weights, its f16 GGUF), built once per family."""
    cache = {}

    def get(family: str, make=None):
        if family not in cache:
            ours = f16_rounded(_ours_from(widened((make or FAMILIES[family][0])())))
            path = write_gguf(ours, tiny_tok, tmp_path_factory.mktemp(family) / f"{family}.gguf", "f16")
            cache[family] = ours, path
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_round_trip_equal_logits(family, written):
    """convert --to gguf and back through lmforge's reader: the same model (the family's
    features come back from the keys and tensors), logits within 1e-4, past the window."""
    ours, path = written(family)
    back = lmforge.load(str(path), quant="none", device="cpu").model
    for field in ("sandwich_norms", "post_norms", "qk_norm", "qk_norm_whole", "learned_positions", "norm_kind", "n_experts",
                  "sliding_window", "layer_types", "rope_layers", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
        assert getattr(back.cfg, field) == getattr(ours.cfg, field), field
    ids = torch.randint(3, VOCAB, (2, 60 if family == "phi3" else 28), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(ids) - ours(ids)).abs().max().item() <= 1e-4
        if family == "phi3":  # the short factors too (up to the original 48 positions)
            assert (back(ids[:, :40]) - ours(ids[:, :40])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_holds_llama_cpps_keys_and_tensors(family, written):
    """The `<arch>.*` keys llama.cpp's converter writes for the family, its tensor names (fused,
    stacked, sandwich norms), and its value conventions (Gemma's norms as 1 + w)."""
    import gguf

    ours, path = written(family)
    arch = FAMILIES[family][1]
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == arch
    missing = [k for k in KEYS.get(family, KEYS[arch]) if f"{arch}.{k}" not in r.fields]
    assert not missing, missing
    tensors = {t.name: t for t in r.tensors}
    want = TENSORS.get(family, TENSORS[arch])  # (by family where two share an architecture)
    assert set(want) <= set(tensors), sorted(set(want) - set(tensors))
    assert not set(ABSENT.get(arch, [])) & set(tensors)
    values = lambda n: np.asarray(tensors[n].data, dtype=np.float32)  # noqa: E731
    layer0 = ours.model.layers[0]
    if arch in ("gemma2", "gemma3"):  # stored as llama.cpp multiplies: 1 + w
        assert np.allclose(values("blk.0.attn_norm.weight"), 1 + layer0.input_layernorm.weight.detach().numpy())
        assert np.allclose(values("output_norm.weight"), 1 + ours.model.norm.weight.detach().numpy())
    if arch == "phi3":  # q|k|v rows in one tensor; gate|up in ffn_up
        a = layer0.self_attn
        want = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().numpy()
        assert np.array_equal(values("blk.0.attn_qkv.weight"), want)
        assert values("blk.0.ffn_up.weight").shape == (2 * ours.cfg.d_ff, ours.cfg.d_model)
        assert values("rope_factors_long.weight").tolist() == pytest.approx(ours.cfg.rope_scaling["long_factor"])
    if arch == "qwen3moe":  # experts stacked: [n_experts, moe_d_ff, d_model] in torch order
        assert values("blk.0.ffn_gate_exps.weight").shape == (4, 32, 64)
        assert np.array_equal(values("blk.0.ffn_down_exps.weight")[1], layer0.mlp.experts[1].down_proj.weight.detach().numpy())
    if arch == "gpt2":
        assert values("position_embd.weight").shape == tuple(ours.model.embed_positions.weight.shape)
    if family == "llama3.1":  # each frequency's divisor, from transformers' own llama3 frequencies
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        ref = FAMILIES[family][0]().config
        scaled = ROPE_INIT_FUNCTIONS["llama3"](ref, "cpu")[0]
        plain = 1.0 / 10000.0 ** (torch.arange(0, 32, 2).float() / 32)
        assert np.allclose(values("rope_freqs.weight"), (plain / scaled).numpy(), rtol=1e-6)


def test_llama31_rope_freqs_read_back_as_the_llama3_scheme(written, tmp_path):
    """llama.cpp's converter keeps Llama 3.1's RoPE only as the rope_freqs tensor: the reader
    recovers the llama3 parameters from it, so the model converts on to an HF folder that
    transformers runs with equal logits."""
    from lmforge.loading import save_hf

    ours, path = written("llama3.1")
    back = lmforge.load(str(path), quant="none", device="cpu").model
    assert back.cfg.rope_scaling == ours.cfg.rope_scaling
    save_hf(back, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_rope_freqs_that_fit_no_hf_scheme_still_run_and_refuse_hf_export(tmp_path):
    """Divisors no HF scheme makes run as they are ("freq_factors"), write back to GGUF, and
    an HF export says in one line why it cannot hold them."""
    import dataclasses

    from lmforge.errors import LmforgeError
    from lmforge.loading import gguf_maps, save_hf
    from lmforge.loading.hf import config_from_hf

    cfg = config_from_hf(llama31().config.to_dict())
    odd = [1.0, 3.0, 1.5, 2.0] * 4
    sc = gguf_maps.rope_scaling_from_freqs(odd, cfg)
    assert sc == {"rope_type": "freq_factors", "factors": odd}
    assert np.allclose(gguf_maps.rope_freq_factors(dataclasses.replace(cfg, rope_scaling=sc)), odd)
    assert gguf_maps.rope_scaling_from_freqs([1.0] * 16, cfg) is None
    # Llama 3.1's and 3.2's own settings come back as their configs write them (float32 divisors)
    for factor in (8.0, 32.0):
        real = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        big = dataclasses.replace(cfg, head_dim=128, rope_theta=500000.0, rope_scaling=real)
        assert gguf_maps.rope_scaling_from_freqs(gguf_maps.rope_freq_factors(big), big) == real
    assert gguf_maps.rope_scaling_from_freqs([4.0] * 16, cfg) == {"rope_type": "linear", "factor": 4.0}
    ours = _ours_from(llama31())
    ours.cfg.rope_scaling = sc
    with pytest.raises(LmforgeError, match="rope_freqs"):
        save_hf(ours, None, tmp_path)


def test_gemma_query_scale_is_folded_where_llama_cpp_cannot_say_it(written):
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (27B: by its width per head), not
    by query_pre_attn_scalar: a model whose scalar differs (here 24, head_dim 16) has the ratio
    folded into its query weights, and reads back with llama.cpp's scale."""
    import gguf

    ours, path = written("gemma2")
    assert ours.cfg.query_pre_attn_scalar == 24 and ours.cfg.head_dim == 16
    q = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    want = ours.model.layers[0].self_attn.q_proj.weight.detach().numpy() * (16 / 24) ** 0.5
    assert np.allclose(np.asarray(q.data, dtype=np.float32), want, atol=1e-3)
    assert lmforge.load(str(path), quant="none", device="cpu").model.cfg.query_pre_attn_scalar is None


@pytest.mark.parametrize("family", ["phi3", "gpt2", "smollm3", "gemma3", "qwen2-moe"])
def test_quantized_blocks_of_fused_and_permuted_tensors(family, tiny_tok, tmp_path):
    """A Q8_0 file run from its own blocks (fused q|k|v and gate|up split by rows, q/k rows put
    back in HF's order, Gemma's norms) gives the logits of the same file dequantized."""
    from lmforge import native

    if native.library() is None:
        pytest.skip("no native kernels here")
    ours = _ours_from(widened(FAMILIES[family][0]()))
    path = write_gguf(ours, tiny_tok, tmp_path / "m.gguf", "q8_0")
    blocks = lmforge.load(str(path), quant="auto", device="cpu").model
    dense = lmforge.load(str(path), quant="none", device="cpu").model
    assert blocks.quant == "gguf"
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = dense(ids)
        assert (blocks(ids) - want).abs().max().item() <= 1e-3 * want.abs().max().item()
        assert (want - ours(ids)).abs().max().item() <= 0.05 * want.abs().max().item()  # and near the source


def test_only_what_remains_unsupported_is_refused_by_name(tmp_path, capsys):
    from lmforge.families import describe
    from lmforge.loading.hf import config_from_hf

    for make, _ in FAMILIES.values():
        cfg = config_from_hf(make().config.to_dict())
        assert unsupported_reason(cfg) is None
        assert describe(cfg)["lmforge"]["convert --to gguf"] == "yes"
    renormalizing = config_from_hf(qwen2_moe().config.to_dict())  # llama.cpp's qwen2moe never renormalizes
    renormalizing.moe_norm_topk_prob = True
    assert "norm_topk_prob" in unsupported_reason(renormalizing)
    every_2nd = config_from_hf(smollm3().config.to_dict())  # NoPE in every 2nd layer: llama.cpp has every 4th only
    assert "every 4th" in unsupported_reason(every_2nd)


# -- llama.cpp (slow; llama-cpp-python in another venv) ----------------------------------
LLAMA_CASES = {  # Phi-3 without its window (llama.cpp's phi3 ignores windows) ...
    **{f: FAMILIES[f][0] for f in FAMILIES if f != "phi3"},
    "phi3": lambda: phi3(window=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", LLAMA_CASES)
def test_llama_cpp_runs_our_gguf_with_our_greedy_tokens(family, written, tiny_tok):
    """llama.cpp loads our file as its own architecture for the family and continues a prompt
    with lmforge's greedy tokens on the same file."""
    py = llama_python()
    if py is None:
        pytest.skip("llama-cpp-python is not installed (set LMFORGE_LLAMA_PYTHON to a Python that has it)")
    ours, path = written(f"{family}-llama", LLAMA_CASES[family])
    text = "The keeper's lamp burned at 9:15, and 48 ships came home. A map is a promise; bread is a lesson in patience."
    ids = tiny_tok.encode(text)
    # llama.cpp picks Phi-3's long factors by the context it is given (past the original 48
    # positions here), lmforge by the sequence: a prompt past 48 tokens uses the long ones in both
    ids = (ids * 3)[:52] if family == "phi3" else ids[:24]
    theirs, mine = llama_and_lmforge_greedy(py, path, ids, 12)
    assert len(theirs) >= 4 and theirs == mine
