"""Read a GGUF file (llama.cpp's format) into a `Config`, an HF-named state dict and a tokenizer."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.loading import gguf_maps as maps
from lmforge.model import Config

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = maps.ARCHS


# GGUF metadata value types (gguf spec): id -> struct format, or a marker for strings/arrays
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous, "in" dimension) first
    tensor_type: int
    data: np.ndarray  # raw bytes (quantized) or values, memory-mapped


class _Cursor:
    """Reads little-endian GGUF fields from a bytes-like buffer; far faster than per-item memmaps."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of items of at least `min_bytes` each, checked against the bytes left, so a
        corrupt header is an error before anything is allocated for it."""
        n = self.take("<Q")
        if n * min_bytes > len(self.buf) - self.pos:
            raise ValueError(f"{what} count {n} does not fit in the {len(self.buf) - self.pos} bytes left")
        return n

    def string(self) -> str:
        n = self.count("string byte", 1)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int) -> list[str]:
        """n strings in a row (a vocabulary: ~50k tokens and as many merges), in one tight loop:
        a tenth of a second of every start."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.unpack_from
        for _ in range(n):
            (size,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + size > end:
                raise ValueError(f"string of {size} bytes does not fit in the {end - pos} bytes left")
            out.append(str(buf[pos : pos + size], "utf-8", "replace"))
            pos += size
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.take("<I")
            n = self.count("array element", struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 1)
            if etype in _SCALARS and etype != 7:
                fmt = _SCALARS[etype]
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos)
                self.pos += n * arr.itemsize
                return arr.tolist()
            if etype == _STRING:
                return self.strings(n)
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_file(path: Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file; tensor data stays memory-mapped."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if not path.is_file():
        raise LmforgeError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LmforgeError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")
    # a plain ndarray view of the map: numpy memmap subclass bookkeeping is slow per slice
    # copy-on-write: block views become torch tensors without a copy (torch wants writable
    # arrays); nothing is ever written back to the file
    buf = np.memmap(path, dtype=np.uint8, mode="c").view(np.ndarray)
    try:
        c = _Cursor(memoryview(buf))
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise LmforgeError(f"{path}: unsupported GGUF version {version}")
        # smallest entries: a tensor is a name length, a dim count, one dim, a type and an offset
        n_tensors, n_kv = c.count("tensor", 32), c.count("metadata key", 12)
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor '{name}' has {n_dims} dimensions (GGUF allows 1 to 4)")
            dims = tuple(c.take("<Q") for _ in range(n_dims))
            infos.append((name, dims, c.take("<I"), c.take("<Q")))
        align = int(meta.get("general.alignment", 32))
        start = (c.pos + align - 1) // align * align
        tensors = []
        for name, dims, ttype, offset in infos:
            qtype = GGMLQuantizationType(ttype)
            block, nbytes = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims))
            size = n // block * nbytes
            lo = start + offset
            if lo + size > len(buf):
                raise LmforgeError(f"cannot read {path}: truncated or corrupt (tensor '{name}' ends past the end of the file)")
            raw = buf[lo : lo + size]
            if qtype == GGMLQuantizationType.F32:
                raw = raw.view(np.float32)
            elif qtype == GGMLQuantizationType.F16:
                raw = raw.view(np.float16)
            else:  # rows of quantized blocks, as gguf.quants.dequantize expects
                raw = raw.reshape(n // dims[0], dims[0] // block * nbytes)
            tensors.append(GGUFTensor(name, dims, ttype, raw))
    except LmforgeError:
        raise
    except (struct.error, ValueError, UnicodeDecodeError, IndexError, KeyError, OverflowError, MemoryError) as e:
        raise LmforgeError(f"cannot read GGUF file {path}: truncated or corrupt ({type(e).__name__}: {e})") from None
    return meta, tensors


def gguf_is_quantized(path: Path) -> bool:
    """Whether a GGUF file's weights are quantized (Q4_0, Q4_1, Q8_0, K-quants...), from its
    `general.file_type` (0 = F32, 1 = F16, else quantized), read without parsing the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # general.* keys come first, before the tokenizer's arrays
        c = _Cursor(memoryview(head))
        c.pos = 4 + 4 + 8
        for _ in range(c.take("<Q")):
            key, vtype = c.string(), c.take("<I")
            value = c.value(vtype)
            if key == "general.file_type":
                return int(value) not in (0, 1)
    except (struct.error, ValueError, IndexError, OSError):
        pass
    return False


def read_gguf_metadata(path: Path) -> dict:
    return read_gguf_file(Path(path))[0]


def config_from_gguf(meta: dict, path: Path | str = "") -> Config:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmforgeError(f"unsupported architecture '{arch}' in {path} (supported: {', '.join(SUPPORTED_ARCHS)})")
    a = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_heads = int(a("attention.head_count"))
    d_model = int(a("embedding_length"))
    rope_scaling = None
    stype = a("rope.scaling.type")
    if stype and stype != "none":
        if stype != "linear":
            raise LmforgeError(f"unsupported rope scaling '{stype}' in {path}")
        rope_scaling = {"type": "linear", "factor": float(a("rope.scaling.factor"))}
    tokens = meta.get("tokenizer.ggml.tokens")
    eps = a("attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon", 1e-5)
    kw = dict(
        vocab_size=int(a("vocab_size") or (len(tokens) if tokens else 32000)),
        d_model=d_model,
        n_layers=int(a("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)),
        head_dim=int(a("attention.key_length") or a("rope.dimension_count") or d_model // n_heads),
        d_ff=int(a("feed_forward_length")),
        norm_eps=float(eps),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_seq_len=int(a("context_length", 2048)),
        tie_embeddings=False,  # decided from the tensors present
        attention_bias=arch in ("qwen2", "qwen2moe"),
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3", "olmo2"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        extra={"source_format": "gguf", "architecture": arch, "gguf_name": meta.get("general.name", "")},
    )
    kw.update(_windows(arch, a, kw["n_layers"]))
    kw.update(_family_fields(arch, a, kw))
    return Config(**kw)


def _windows(arch: str, a, n_layers: int) -> dict:
    """The sliding window and which layers use it, as llama.cpp reads them (Gemma 2 always
    slides, 4096 unless the file says; its layers and Gemma 3's and OLMo's follow a pattern)."""
    window = a("attention.sliding_window", 4096 if arch == "gemma2" else None)
    if not window:
        return {"sliding_window": None}
    if arch not in maps.DEFAULT_SWA_EVERY:
        return {"sliding_window": int(window)}
    local = maps.swa_layers(arch, n_layers, a("attention.sliding_window_pattern"))
    if not any(local):
        return {"sliding_window": None}
    types = None if all(local) else ["sliding_attention" if f else "full_attention" for f in local]
    return {"sliding_window": int(window), "layer_types": types}


def _family_fields(arch: str, a, kw: dict) -> dict:
    """The Config fields that make each llama.cpp architecture the family it is."""
    if arch in maps.GEMMA:
        scalar = maps.llama_cpp_query_scalar(kw["n_layers"], kw["d_model"], kw["n_heads"], kw["head_dim"], arch)
        local = a("rope.freq_base_swa", 10000.0 if arch == "gemma3" else None)
        return dict(norm_unit_offset=True, sandwich_norms=True, embed_scale=True, activation="gelu_tanh",
                    attn_logit_softcap=float(a("attn_logit_softcapping", 50.0)) if arch == "gemma2" else None,
                    final_logit_softcap=float(a("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0)) or None,
                    query_pre_attn_scalar=None if scalar == kw["head_dim"] else scalar,
                    rope_local_theta=float(local) if local and kw.get("sliding_window") else None)
    if arch == "olmo2":
        return dict(post_norms=True, qk_norm_whole=True)
    if arch == "smollm3":
        return dict(rope_layers=maps.smollm3_rope_layers(kw["n_layers"]))
    if arch == "gpt2":
        return dict(n_kv_heads=kw["n_heads"], head_dim=kw["d_model"] // kw["n_heads"], norm_kind="layer", learned_positions=True,
                    gated_mlp=False, attention_bias=True, mlp_bias=True, attn_out_bias=True, activation="gelu_tanh")
    if arch in ("qwen3moe", "qwen2moe") or a("expert_count"):  # (llama with experts: Mixtral)
        moe = dict(n_experts=int(a("expert_count")), n_experts_per_token=int(a("expert_used_count")),
                   moe_d_ff=int(a("expert_feed_forward_length") or kw["d_ff"]), moe_norm_topk_prob=arch != "qwen2moe")
        if arch == "qwen2moe":  # llama.cpp keeps Qwen2-MoE's top-k weights as they are; one shared expert
            moe.update(n_shared_experts=1, d_ff=int(a("expert_shared_feed_forward_length") or kw["d_ff"]))
        return moe
    return {}


def _longrope(meta: dict, arch: str, factors: dict) -> dict | None:
    """Phi-3's LongRoPE from the rope_factors_long/short tensors and the keys beside them."""
    if "long" not in factors or "short" not in factors:
        return None
    a = lambda k: meta.get(f"{arch}.{k}")  # noqa: E731
    sc = {"rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
          "original_max_position_embeddings": int(a("rope.scaling.original_context_length") or a("context_length"))}
    if a("rope.scaling.attn_factor") is not None:
        sc["attention_factor"] = float(a("rope.scaling.attn_factor"))
    return sc


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K (its RoPE pairs adjacent dims; HF rotates halves)."""
    out, inp = w.shape[0], w.shape[-1]
    if w.ndim == 1:  # a bias
        return w.reshape(n_head, out // n_head // 2, 2).swapaxes(1, 2).reshape(out)
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


# byte ranges of the float16 scale (and min) fields inside one block, per ggml type: finite
# scales are enough for finite weights, since the quantized values are bounded integers
_SCALE_FIELDS = {2: (0, 2), 3: (0, 4), 6: (0, 2), 7: (0, 4), 8: (0, 2), 12: (0, 4), 13: (0, 4), 14: (208, 210)}


def _blocks_finite(t: GGUFTensor) -> bool:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    lo, hi = _SCALE_FIELDS[t.tensor_type]
    nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.tensor_type)][1]
    scales = t.data.reshape(-1, nbytes)[:, lo:hi]
    return bool(np.isfinite(np.ascontiguousarray(scales).view(np.float16)).all())


def _keeps_blocks(t: GGUFTensor, name: str) -> bool:
    """Whether this tensor runs from its own blocks (`lmforge.native`): a quantized matrix of a
    type the kernels know, read by a linear layer (the embedding table is looked up, not
    multiplied, and stays dense)."""
    from lmforge import native

    return len(t.shape) == 2 and t.tensor_type in native.TYPES.values() and not name.startswith("model.embed_tokens")


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, blocks: bool = False):
    """(config, state_dict, metadata) with every tensor dequantized to `dtype`; with `blocks`,
    the linear layers' quantized weights stay as the file's blocks instead, as `BlockWeight`
    entries of the state dict (uint8 rows, memory-mapped where no reordering is needed)."""
    path = Path(path)
    meta, tensors = read_gguf_file(path)
    cfg = config_from_gguf(meta, path)
    arch = cfg.extra["architecture"]
    pieces = {t.name: maps.hf_pieces(t.name, arch, cfg) for t in tensors}
    tied = not any(p and p[0][0] == "lm_head.weight" for p in pieces.values())
    _check_complete(path, [t.name for t in tensors], cfg.n_layers)
    state, factors = {}, {}
    for t in tensors:
        if t.name.startswith(("rope_factors_", "rope_freqs")):  # RoPE's factors: configuration, not weights
            factors[t.name.split(".")[0].removeprefix("rope_factors_")] = [float(x) for x in _dequantize(t)]
            continue
        if pieces[t.name] is None:
            raise LmforgeError(f"unexpected tensor '{t.name}' in {path} ({arch})")
        if blocks and tied and t.name == "token_embd.weight" and _keeps_blocks(t, "lm_head.weight"):
            state["lm_head.weight"] = _block_weight(t, t.data, path)
        if blocks and _keeps_blocks(t, pieces[t.name][0][0]):
            for name, rows in maps.split_rows(t.data, pieces[t.name]).items():  # blocks never span rows
                state[name] = _block_weight(t, _from_llama_cpp(rows, name, arch, cfg), path)
            continue
        with np.errstate(all="ignore"):  # garbage blocks overflow; the check below names the tensor
            w = _dequantize(t).reshape([int(x) for x in reversed(t.shape)])
        if not np.isfinite(w).all():
            raise LmforgeError(f"{path}: tensor '{t.name}' holds non-finite values (corrupt data?)")
        for name, part in maps.split_rows(w, pieces[t.name]).items():
            part = _from_llama_cpp(part, name, arch, cfg)
            state[name] = torch.from_numpy(np.array(part, dtype=np.float32, copy=True)).to(dtype)
    cfg.tie_embeddings = tied
    cfg.rope_scaling = _longrope(meta, arch, factors) or cfg.rope_scaling
    if "rope_freqs" in factors:  # Llama 3.1's scaled frequencies
        cfg.rope_scaling = maps.rope_scaling_from_freqs(factors["rope_freqs"], cfg)
    return cfg, state, meta


def _from_llama_cpp(w: np.ndarray, name: str, arch: str, cfg: Config) -> np.ndarray:
    """Undo llama.cpp's conventions for one HF-named weight (values or rows of blocks): its q/k
    row order (blocks never span rows) and Gemma's (1 + w) norms."""
    if arch in maps.PERMUTED and ".self_attn.q_proj." in name:
        return unpermute_qk(w, cfg.n_heads)
    if arch in maps.PERMUTED and ".self_attn.k_proj." in name:
        return unpermute_qk(w, cfg.n_kv_heads)
    if maps.shifts_norm(arch, name):
        return w - 1.0
    if name.endswith("mlp.shared_expert_gate.weight") and w.ndim == 1:  # a converter may store it as a vector
        return w[None]
    return w


def _check_complete(path: Path, names: list[str], n_layers: int) -> None:
    """Every layer holds the tensors layer 0 does, and the embedding and final norm are there:
    else the file lost some (a missing one is named)."""
    layers: dict[int, set[str]] = {}
    for n in names:
        parts = n.split(".")
        if parts[0] == "blk" and parts[1].isdigit():
            layers.setdefault(int(parts[1]), set()).add(".".join(parts[2:]))
    want = {f"blk.{i}.{k}" for i in range(n_layers) for k in layers.get(0, ())} | {"token_embd.weight", "output_norm.weight"}
    missing = sorted(want - set(names))
    if missing or not layers:
        raise LmforgeError(f"{path} lacks tensor '{missing[0] if missing else 'blk.0.*'}' of a {n_layers}-layer model (truncated?)")


def _dequantize(t: GGUFTensor) -> np.ndarray:
    """A tensor's values as float32 (F32/F16 as they are; blocks by the native kernels when they
    run, else by gguf's reference dequantizer)."""
    import gguf

    from lmforge.native.linear import dequantize, runs_natively

    if len(t.shape) == 2 and runs_natively(t.tensor_type):
        return dequantize(torch.from_numpy(t.data), t.tensor_type, int(t.shape[0])).numpy()
    return gguf.quants.dequantize(t.data, t.tensor_type)


@dataclass
class BlockWeight:
    """A linear layer's weight as the file's quantized rows: `blocks` uint8 [out, row_bytes]."""

    blocks: torch.Tensor
    qtype: int
    in_features: int


def _block_weight(t: GGUFTensor, rows: np.ndarray, path: Path) -> BlockWeight:
    if not _blocks_finite(t):
        raise LmforgeError(f"{path}: tensor '{t.name}' holds non-finite values (corrupt data?)")
    return BlockWeight(torch.from_numpy(np.ascontiguousarray(rows)), int(t.tensor_type), int(t.shape[0]))
