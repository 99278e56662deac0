"""Write a model as a GGUF file that llama.cpp (and `transformers`' GGUF loader) opens.

    write_gguf(model, tokenizer, "out/model.gguf", "q8_0")

- The llama.cpp architecture the model's features make it (`llama`, `qwen2`, `qwen3`, `gemma2`,
  `gemma3`, `phi3`, `olmo2`, `gpt2`, `smollm3`, `qwen3moe`), in llama.cpp's own layout: its
  tensor names, fused and stacked tensors, value conventions (lmforge/loading/gguf_maps.py) and
  the `<arch>.*` keys its converter writes and llama.cpp reads.
- Tokenizer: byte-level BPE as `tokenizer.ggml.model = gpt2` with tokens, merges, token types
  (control for special tokens), the pre-tokenizer name llama.cpp knows (`smollm`, `gpt2`,
  `llama-bpe`, `qwen2`, found from the tokenizer's own pre-tokenizer), special ids and the
  chat template; a SentencePiece-style BPE (byte fallback, "▁" for spaces: Llama 2, Mistral,
  Gemma, Phi-3) as `tokenizer.ggml.model = llama` with scores and the space prefix
  (lmforge/tokenizer_spm.py).
- Types: `f16` (2-D weights f16), `q8_0` (2-D weights Q8_0), `q4_0` (2-D weights Q4_0, the token
  embedding Q8_0 as llama.cpp keeps the embedding/output at higher precision). Norms stay
  F32; a weight whose rows are not a multiple of 32 falls back to F16.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.loading import gguf_maps as maps
from lmforge.model import rope_attention_factor

GGUF_TYPES = ("f16", "q8_0", "q4_0")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved pairs (inverse of loading's unpermute_qk)."""
    out = w.shape[0]
    if w.ndim == 1:
        return w.reshape(n_head, 2, out // n_head // 2).swapaxes(1, 2).reshape(out)
    return w.reshape(n_head, 2, out // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


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
        return "gpt-2"  # llama.cpp's spelling (it refuses "gpt2"); lmforge's reader takes both
    if kinds == ["Digits", "ByteLevel"] and seq[0].get("individual_digits") and seq[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel":
        pattern = seq[0].get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        named = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", _GPT2_REGEX: "gpt-2", _GPT2_REGEX[:-4]: "gpt-2"}
        if len(seq) == 2 and regex in named:
            return named[regex]
    raise LmforgeError(f"cannot export this tokenizer to GGUF: llama.cpp has no pre-tokenizer matching {json.dumps(pre)[:200]}")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """The `tokenizer.ggml.*` fields: tokens, token types, and merges and the pre-tokenizer name
    (byte-level BPE, "gpt2") or scores and the space prefix (SentencePiece-style BPE, "llama")."""
    from lmforge import tokenizer_spm as spm

    tj = json.loads(tokenizer.backend.to_str())
    model = tj.get("model", {})
    sentencepiece = spm.is_spm(tj)
    if not sentencepiece and (model.get("type") != "BPE" or tj.get("decoder", {}).get("type") != "ByteLevel"):
        raise LmforgeError("GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece-style BPE tokenizers only")
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
        elif sentencepiece and re.fullmatch("<0x[0-9A-F]{2}>", tokens[i]) and i not in types:
            token_types.append(spm.BYTE)
        else:
            token_types.append(types.get(i, 1))  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if sentencepiece:
        unk = model.get("unk_token")
        if unk in vocab:
            token_types[vocab[unk]] = spm.UNKNOWN
        return {"model": "llama", "tokens": tokens, "token_types": token_types, "scores": spm.spm_scores(tokens, merges, token_types),
                "space_prefix": spm.adds_space_prefix(tj), "unk": vocab.get(unk) if unk else None}
    return {"model": "gpt2", "tokens": tokens, "token_types": token_types, "merges": merges, "pre": pre_tokenizer_name(tj)}


# -- writer -------------------------------------------------------------------------------
def _tensor_type(name: str, arr: np.ndarray, gguf_type: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or name.endswith("_norm.weight") or name.endswith(".bias"):
        return Q.F32
    if ".ffn_gate_inp" in name or name.startswith("position_embd."):  # kept F32, as llama.cpp's converter does
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
    `lmforge info` says. Each family is checked against what llama.cpp's architecture for it
    computes, so that a file it writes runs there as it runs here."""
    if cfg.kv_lora_rank:
        return "GGUF export: DeepSeek-V2's multi-head latent attention (llama.cpp's deepseek2) is not supported yet"
    arch = maps.arch_of(cfg)
    if (cfg.mlp_bias or cfg.attn_out_bias) and arch != "gpt2":
        return "GGUF export: MLP or attention-output biases outside GPT-2 match no llama.cpp architecture"
    if cfg.qk_norm and cfg.attention_bias:
        return "GGUF export: q/k norms with q/k/v biases match no llama.cpp architecture"
    if cfg.activation != ("gelu_tanh" if arch in maps.GEMMA + ("gpt2",) else "silu"):
        return f"GGUF export: llama.cpp's {arch} has no '{cfg.activation}' MLP"
    kinds = {"phi3": (None, "longrope"), "llama": (None, "linear", "llama3", "freq_factors")}.get(arch, (None, "linear"))
    if cfg.rope_kind not in kinds:
        return (f"GGUF export: rope scaling '{cfg.rope_kind}' is not supported for {arch} "
                "(linear; llama3 in Llama; LongRoPE in Phi-3)")
    if cfg.layer_types is not None and arch not in maps.GEMMA:
        return "GGUF export: per-layer attention windows (layer_types) are supported for Gemma only"
    check = {"gemma2": _gemma_reason, "gemma3": _gemma_reason, "phi3": _phi3_reason, "olmo2": _olmo2_reason,
             "gpt2": _gpt2_reason, "smollm3": _smollm3_reason, "qwen3moe": _qwen3moe_reason, "qwen2moe": _qwen2moe_reason,
             "llama": _mixtral_reason if cfg.is_moe else None}.get(arch)
    return check(cfg, arch) if check else None


def _gemma_reason(cfg, arch) -> str | None:
    if not (cfg.norm_unit_offset and cfg.embed_scale) or cfg.attention_bias or cfg.is_moe:
        return "GGUF export: sandwich norms need Gemma's other features ((1 + w) norms, scaled embeddings; no biases or experts)"
    if arch == "gemma2" and not cfg.tie_embeddings:
        return "GGUF export: llama.cpp's gemma2 ties the output head to the embeddings (this model has its own)"
    if arch == "gemma2" and not (cfg.attn_logit_softcap and cfg.final_logit_softcap):
        return "GGUF export: llama.cpp's gemma2 soft-caps attention scores and logits (this model does not)"
    if arch == "gemma3" and cfg.attn_logit_softcap:
        return "GGUF export: llama.cpp's gemma3 has no attention-score soft-cap"
    if cfg.rope_kind and (arch == "gemma2" or cfg.rope_local_theta is None):
        return "GGUF export: RoPE scaling in Gemma's sliding layers is not supported (global layers only, with a local base)"
    return None


def _phi3_reason(cfg, arch) -> str | None:
    if cfg.attention_bias or cfg.qk_norm or cfg.is_moe or cfg.n_heads * cfg.head_dim != cfg.d_model:
        return "GGUF export: llama.cpp's phi3 has no biases, q/k norms or experts, and heads that span the width"
    return None


def _olmo2_reason(cfg, arch) -> str | None:
    if not cfg.qk_norm_whole or cfg.attention_bias or cfg.is_moe or cfg.n_heads * cfg.head_dim != cfg.d_model:
        return "GGUF export: llama.cpp's olmo2 needs whole-projection q/k norms, heads that span the width, no biases or experts"
    if cfg.sliding_window:
        return "GGUF export: OLMo-style layers with sliding windows (OLMo 3) are not supported"
    return None


def _gpt2_reason(cfg, arch) -> str | None:
    if not (cfg.norm_kind == "layer" and cfg.learned_positions and not cfg.gated_mlp and cfg.attention_bias and cfg.mlp_bias
            and cfg.attn_out_bias) or cfg.is_moe or cfg.n_kv_heads != cfg.n_heads or cfg.sliding_window or cfg.qk_norm:
        return "GGUF export: LayerNorm/learned-position layers need all of GPT-2's features (llama.cpp's gpt2)"
    return None


def _smollm3_reason(cfg, arch) -> str | None:
    if cfg.rope_layers != maps.smollm3_rope_layers(cfg.n_layers):
        return "GGUF export: llama.cpp's smollm3 leaves RoPE out of every 4th layer only (this model's NoPE layers differ)"
    if cfg.attention_bias or cfg.qk_norm or cfg.is_moe or cfg.sliding_window:
        return "GGUF export: llama.cpp's smollm3 has no biases, q/k norms, experts or windows"
    return None


def _qwen3moe_reason(cfg, arch) -> str | None:
    if cfg.n_shared_experts or not cfg.moe_norm_topk_prob or cfg.sliding_window:
        return "GGUF export: llama.cpp's qwen3moe renormalizes the top-k weights and has no shared expert or window"
    return None


def _qwen2moe_reason(cfg, arch) -> str | None:
    if cfg.n_shared_experts != 1 or cfg.moe_norm_topk_prob or not cfg.attention_bias or cfg.sliding_window:
        return ("GGUF export: llama.cpp's qwen2moe has q/k/v biases and one shared expert, keeps the top-k router weights "
                "as they are (norm_topk_prob false) and has no window")
    return None


def _mixtral_reason(cfg, arch) -> str | None:
    if not cfg.moe_norm_topk_prob or cfg.sliding_window:
        return "GGUF export: Mixtral in llama.cpp (llama with experts) renormalizes the top-k router weights and has no window"
    return None


def _write_hparams(w, cfg, arch: str) -> None:
    """The `<arch>.*` keys llama.cpp's converter writes for this family (and llama.cpp reads)."""
    import gguf

    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":  # LayerNorm, learned positions: no RoPE keys
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if arch == "phi3":  # LongRoPE: the factors are tensors (rope_factors_long/short)
        w.add_sliding_window(int(cfg.sliding_window or 0))  # llama.cpp's phi3 ignores it; lmforge applies it
        if cfg.rope_kind == "longrope":
            w.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling["original_max_position_embeddings"]))
            w.add_rope_scaling_attn_factors(rope_attention_factor(cfg))
    elif arch in maps.GEMMA:
        _write_gemma(w, cfg, arch)
    elif cfg.sliding_window:  # llama.cpp's key; lmforge reads it back (llama.cpp's llama arch may not)
        w.add_sliding_window(int(cfg.sliding_window))
    if cfg.is_moe:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_token)
        w.add_expert_feed_forward_length(cfg.moe_d_ff or cfg.d_ff)
    if cfg.n_shared_experts:
        w.add_expert_shared_feed_forward_length(cfg.d_ff * cfg.n_shared_experts)


def _write_gemma(w, cfg, arch: str) -> None:
    if cfg.attn_logit_softcap:
        w.add_attn_logit_softcapping(float(cfg.attn_logit_softcap))
    if cfg.final_logit_softcap:
        w.add_final_logit_softcapping(float(cfg.final_logit_softcap))
    if cfg.rope_local_theta or arch == "gemma3":
        w.add_rope_freq_base_swa(float(cfg.rope_local_theta or cfg.rope_theta))
    local = [cfg.window(i) is not None for i in range(cfg.n_layers)]
    if cfg.sliding_window:
        w.add_sliding_window(int(cfg.sliding_window))
    # the converter leaves the pattern to llama.cpp's default (gemma2: every 2nd layer global,
    # gemma3: every 6th); a model whose layers differ says which slide (llama.cpp reads the list)
    if (cfg.sliding_window or arch == "gemma2") and local != maps.swa_layers(arch, cfg.n_layers, None):
        w.add_sliding_window_pattern(local)


def _gguf_tensors(cfg, state: dict, arch: str) -> dict[str, np.ndarray]:
    """lmforge's HF-named fp32 weights as llama.cpp's tensors, in its conventions."""
    fold = maps.attention_scale_fold(cfg, arch)
    # Gemma 3's q norm comes after the projection, so the fold goes into the norm's scale
    fold_into = "self_attn.q_norm.weight" if arch == "gemma3" else "self_attn.q_proj.weight"
    groups: dict[str, dict[str, np.ndarray]] = {}
    for hf, t in state.items():
        name = maps.gguf_name(hf, arch)
        if name is None:
            raise LmforgeError(f"GGUF export: no llama.cpp name for tensor '{hf}' ({arch})")
        arr = t.numpy()
        if arch in maps.PERMUTED and ".self_attn.q_proj." in hf:
            arr = permute_qk(arr, cfg.n_heads)
        elif arch in maps.PERMUTED and ".self_attn.k_proj." in hf:
            arr = permute_qk(arr, cfg.n_kv_heads)
        if maps.shifts_norm(arch, hf):
            arr = arr + 1.0
        if fold != 1.0 and hf.endswith(fold_into):
            arr = arr * fold
        groups.setdefault(name, {})[hf] = arr
    out = {}
    for name, parts in groups.items():
        pieces = maps.hf_pieces(name, arch, cfg)
        out[name] = maps.join_pieces([parts[hf] for hf, _ in pieces], pieces)
    if cfg.rope_kind in ("llama3", "freq_factors"):  # llama.cpp divides each frequency by its factor
        out["rope_freqs.weight"] = maps.rope_freq_factors(cfg)
    if cfg.rope_kind == "longrope":
        for which in ("long", "short"):
            out[f"rope_factors_{which}.weight"] = np.asarray(cfg.rope_scaling[f"{which}_factor"], dtype=np.float32)
    return out


def _model_name(name: str, tokens: list[str]) -> str:
    """`general.name`, unless llama.cpp would misread it: a name that says phi3 or phi-3 makes
    it mark Phi-3's SentencePiece specials (</s>, <unk>, <s>, <|endoftext|>), and a vocabulary
    without them then fails to load; such a name is written as "Phi 3"."""
    if re.search("(?i)phi-?3", name) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(tokens):
        return re.sub("(?i)phi-?3", "Phi 3", name)
    return name


def _write_vocabulary(w, tf: dict) -> None:
    w.add_tokenizer_model(tf["model"])
    w.add_token_list(tf["tokens"])
    w.add_token_types(tf["token_types"])
    if tf["model"] == "llama":
        w.add_token_scores(tf["scores"])
        w.add_add_space_prefix(tf["space_prefix"])
        if tf["unk"] is not None:
            w.add_unk_token_id(int(tf["unk"]))
    else:
        w.add_tokenizer_pre(tf["pre"])
        w.add_token_merges(tf["merges"])


def write_gguf(model, tokenizer, path, gguf_type: str = "f16") -> Path:
    """Write `model` (an lmforge Transformer) with `tokenizer` to `path` as GGUF."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise LmforgeError(f"unknown --gguf-type '{gguf_type}' (choose {', '.join(GGUF_TYPES)})")
    if tokenizer is None:
        raise LmforgeError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    cfg = model.cfg
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise LmforgeError(reason)
    arch = maps.arch_of(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")

    tf = tokenizer_fields(tokenizer, cfg.vocab_size)
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(_model_name(cfg.extra.get("gguf_name") or cfg.extra.get("name") or path.stem, tf["tokens"]))
    _write_hparams(w, cfg, arch)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    w.add_file_type(ftype[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _write_vocabulary(w, tf)
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id), (w.add_pad_token_id, tokenizer.pad_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(bool(tokenizer.add_bos))
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    state = _float_state(model)
    if cfg.tie_embeddings and arch != "olmo2":  # llama.cpp's olmo2 wants its output tensor even when tied
        state.pop("lm_head.weight", None)
    for name, arr in _gguf_tensors(cfg, state, arch).items():
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
