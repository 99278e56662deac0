"""Write a model as a GGUF file that llama.cpp (and `transformers`' GGUF loader) opens.

    write_gguf(model, tokenizer, "out/model.gguf", "q8_0")

- Architecture `llama` (or `qwen2` when the model has q/k/v biases), hyperparameters in the
  `<arch>.*` keys llama.cpp reads.
- Tokenizer: byte-level BPE as `tokenizer.ggml.model = gpt2` with tokens, merges, token types
  (control for special tokens), the pre-tokenizer name llama.cpp knows (`smollm`, `gpt2`,
  `llama-bpe`, `qwen2`, found from the tokenizer's own pre-tokenizer), special ids and the
  chat template.
- Q/K rows are permuted for llama.cpp's interleaved RoPE (the inverse of what the loader undoes).
- Types: `f16` (2-D weights f16), `q8_0` (2-D weights Q8_0), `q4_0` (2-D weights Q4_0, the token
  embedding Q8_0 as llama.cpp keeps the embedding/output at higher precision). Norms stay
  F32; a weight whose rows are not a multiple of 32 falls back to F16.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError

GGUF_TYPES = ("f16", "q8_0", "q4_0")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved pairs (inverse of loading's unpermute_qk)."""
    out = w.shape[0]
    if w.ndim == 1:
        return w.reshape(n_head, 2, out // n_head // 2).swapaxes(1, 2).reshape(out)
    return w.reshape(n_head, 2, out // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        key = ".".join(parts[3:-1])
        if key in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[key]}.{parts[-1]}"
    return None


def _float_state(model) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors (a quantized model's state dict holds its dequantized weights)."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if torch.is_tensor(v)}


# -- tokenizer ----------------------------------------------------------------------------
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer (it splits text the same way)."""
    from lmforge.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

    pre = tok_json.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in seq]
    if kinds == ["ByteLevel"] and seq[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and seq[0].get("individual_digits") and seq[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel":
        pattern = seq[0].get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        named = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", _GPT2_REGEX: "gpt2", _GPT2_REGEX[:-4]: "gpt2"}
        if len(seq) == 2 and regex in named:
            return named[regex]
    raise LmforgeError(f"cannot export this tokenizer to GGUF: llama.cpp has no pre-tokenizer matching {json.dumps(pre)[:200]}")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokens, token types, merges and the pre-tokenizer name for a byte-level BPE tokenizer."""
    tj = json.loads(tokenizer.backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or tj.get("decoder", {}).get("type") != "ByteLevel":
        raise LmforgeError("GGUF export supports byte-level BPE tokenizers only (GPT-2 style)")
    vocab: dict[str, int] = dict(model["vocab"])
    types: dict[int, int] = {}
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        types[t["id"]] = 3 if t.get("special") else 4  # CONTROL : USER_DEFINED
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise LmforgeError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    token_types = []
    for i in range(n):
        if tokens[i] is None:  # unused embedding rows, named as llama.cpp's converter does
            tokens[i] = f"[PAD{i}]"
            token_types.append(5)  # UNUSED
        else:
            token_types.append(types.get(i, 1))  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "token_types": token_types, "merges": merges, "pre": pre_tokenizer_name(tj)}


# -- writer -------------------------------------------------------------------------------
def _tensor_type(name: str, arr: np.ndarray, gguf_type: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or name.endswith("_norm.weight") or name.endswith(".bias"):
        return Q.F32
    if arr.shape[-1] % 32:
        return Q.F16
    if gguf_type == "f16":
        return Q.F16
    if gguf_type == "q8_0" or name == "token_embd.weight":
        return Q.Q8_0
    return Q.Q4_0


def unsupported_reason(cfg) -> str | None:
    """Why a model with this config cannot be written as GGUF (None when it can); also what
    `lmforge info` says."""
    if cfg.is_moe:
        return "GGUF export supports dense models only (this one is a mixture of experts)"
    if cfg.mlp_bias:
        return "GGUF export: MLP biases are not supported by llama.cpp's llama architecture"
    if cfg.rope_kind not in (None, "linear"):
        return f"GGUF export: rope scaling '{cfg.rope_kind}' is not supported (linear only)"
    if cfg.qk_norm and cfg.attention_bias:
        return "GGUF export: q/k norms with q/k/v biases match no llama.cpp architecture"
    if cfg.layer_types is not None:
        return "GGUF export: per-layer attention windows (layer_types) are not supported"
    if cfg.sandwich_norms or cfg.norm_unit_offset or cfg.activation != "silu":
        return "GGUF export: Gemma-style layers are not supported yet"
    if cfg.post_norms or cfg.qk_norm_whole:
        return "GGUF export: OLMo 2-style norms are not supported yet"
    if cfg.rope_layers is not None:
        return "GGUF export: layers without RoPE (SmolLM3) are not supported yet"
    if cfg.norm_kind != "rms" or cfg.learned_positions or not cfg.gated_mlp or cfg.attn_out_bias:
        return "GGUF export: GPT-2-style layers are not supported yet"
    return None


def write_gguf(model, tokenizer, path, gguf_type: str = "f16") -> Path:
    """Write `model` (a dense lmforge Transformer) with `tokenizer` to `path` as GGUF."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise LmforgeError(f"unknown --gguf-type '{gguf_type}' (choose {', '.join(GGUF_TYPES)})")
    if tokenizer is None:
        raise LmforgeError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    cfg = model.cfg
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise LmforgeError(reason)
    kind = cfg.rope_kind
    arch = "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"
    permute = arch == "llama"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")

    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(cfg.extra.get("gguf_name") or cfg.extra.get("name") or path.stem)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:  # llama.cpp's key; lmforge reads it back (llama.cpp's llama arch may not)
        w.add_sliding_window(int(cfg.sliding_window))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    w.add_file_type(ftype[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tf = tokenizer_fields(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tf["pre"])
    w.add_token_list(tf["tokens"])
    w.add_token_types(tf["token_types"])
    w.add_token_merges(tf["merges"])
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id), (w.add_pad_token_id, tokenizer.pad_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(bool(tokenizer.add_bos))
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    state = _float_state(model)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, t in state.items():
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise LmforgeError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
        arr = t.numpy()
        if permute and ".attn_q." in name:
            arr = permute_qk(arr, cfg.n_heads)
        elif permute and ".attn_k." in name:
            arr = permute_qk(arr, cfg.n_kv_heads)
        qtype = _tensor_type(name, arr, gguf_type)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
