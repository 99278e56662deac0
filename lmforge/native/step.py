"""`NativeStep`: the fast decoder's per-token step run by `lmf_decode_step` (qmatmul.c), the
whole model in one call, for models whose every linear layer is GGUF blocks the kernels know.

At batch 1 a 135M model's matrix products from Q4 blocks take a few milliseconds a token and
its ~450 other PyTorch ops (norms, rotary, cache writes, attention, activations) nearly as
many again, mostly dispatch; one native call removes the latter. The arithmetic is the fast
decoder's (`FastDecoder.forward` for one token), and `tests/test_native_kernels.py` holds
the two equal. The KV cache and rotary table are the fast decoder's own tensors, so the
prompt is prefilled by `FastDecoder.forward` and the tokens after it by this.
"""
from __future__ import annotations

import ctypes

import torch

from lmforge import native
from lmforge.native.linear import BlockLinear

c = ctypes


class _Model(c.Structure):
    _fields_ = [(n, c.c_int64) for n in ("n_layers", "d", "heads", "kv_heads", "head_dim", "ff", "vocab", "capacity")] + [
        ("eps", c.c_float), ("scale", c.c_float),
        ("embed", c.c_void_p), ("norm1", c.c_void_p), ("norm2", c.c_void_p), ("final_norm", c.c_void_p),
        ("qkv_bias", c.c_void_p), ("w", c.c_void_p), ("rows", c.c_void_p), ("types", c.c_void_p),
        ("head", c.c_void_p), ("head_type", c.c_int32), ("kv", c.c_void_p), ("freqs", c.c_void_p), ("windows", c.c_void_p),
        ("q_norm", c.c_void_p), ("k_norm", c.c_void_p), ("rope", c.c_void_p)]


SLOTS = 7  # q, k, v, o, gate, up, down (q|k|v and gate|up may be one fused matrix each)


def _blocks(lin) -> list[BlockLinear] | None:
    """The BlockLinears behind one of the fast decoder's layers (fused: one; else its parts)."""
    parts = getattr(lin, "parts", None)
    mods = [p.q for p in parts] if parts is not None else [getattr(lin, "q", None)]
    ok = all(isinstance(m, BlockLinear) and m.qtype in native.TYPES.values() for m in mods)
    return mods if ok else None


def native_step_for(fast) -> "NativeStep | None":
    """A NativeStep for this FastDecoder, or None when any piece is not native: the kernels
    missing, weights not all GGUF blocks, not fp32, not CPU."""
    if fast.device.type != "cpu" or fast.dtype != torch.float32:
        return None
    table = []
    for n1, qkv, o, n2, gu, down in fast.layers:
        groups = [_blocks(qkv), _blocks(o), _blocks(gu), _blocks(down)]
        if any(g is None for g in groups):
            return None
        table.append(groups)
    head = _blocks(fast.head)
    if head is None or len(head) != 1 or head[0].qbias is not None:
        return None
    if any(m.qbias is not None for layer in table for g in layer[1:] for m in g):
        return None
    if native.library() is None:  # asked last: a dense or GPU model never builds the kernels
        return None
    return NativeStep(fast, table, head[0])


class NativeStep:
    def __init__(self, fast, table, head: BlockLinear):
        L = len(fast.layers)
        ptr, rows, types = torch.zeros(L, SLOTS, dtype=torch.int64), torch.zeros(L, SLOTS, dtype=torch.int64), torch.zeros(L, SLOTS, dtype=torch.int32)
        biases = []
        for li, (qkv, o, gu, down) in enumerate(table):
            for first, mods in ((0, qkv), (3, o), (4, gu), (6, down)):
                for j, m in enumerate(mods):
                    ptr[li, first + j], rows[li, first + j], types[li, first + j] = m.blocks.data_ptr(), m.out_features, m.qtype
            biases.append(torch.cat([m.qbias if m.qbias is not None else torch.zeros(m.out_features) for m in qkv]))
        has_bias = any(m.qbias is not None for layer in table for m in layer[0])
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        self.keep = {  # every buffer the C struct points at stays alive with it
            "embed": f32(fast.embed), "norm1": torch.stack([f32(ly[0]) for ly in fast.layers]),
            "norm2": torch.stack([f32(ly[3]) for ly in fast.layers]), "final": f32(fast.final_norm),
            "bias": torch.stack(biases).contiguous() if has_bias else None, "ptr": ptr, "rows": rows, "types": types,
            "mods": table, "head": head,
            "windows": torch.tensor([w or 0 for w in fast.windows], dtype=torch.int64),
            "q_norm": None, "k_norm": None,
            "rope": torch.tensor([int(r) for r in fast.ropes], dtype=torch.int64),
        }
        if fast.qk_norms and fast.qk_norms[0] is not None:
            self.keep["q_norm"] = torch.stack([f32(n[0]) for n in fast.qk_norms])
            self.keep["k_norm"] = torch.stack([f32(n[1]) for n in fast.qk_norms])
        k = self.keep
        cfg = fast.cfg
        self.m = _Model(n_layers=L, d=cfg.d_model, heads=fast.H, kv_heads=fast.KV, head_dim=fast.D, ff=fast.ff,
                        vocab=head.out_features, capacity=0, eps=fast.eps, scale=fast.scale,
                        embed=k["embed"].data_ptr(), norm1=k["norm1"].data_ptr(), norm2=k["norm2"].data_ptr(),
                        final_norm=k["final"].data_ptr(), qkv_bias=None if k["bias"] is None else k["bias"].data_ptr(),
                        w=ptr.data_ptr(), rows=rows.data_ptr(), types=types.data_ptr(), head=head.blocks.data_ptr(),
                        head_type=head.qtype, kv=None, freqs=None, windows=k["windows"].data_ptr(),
                        q_norm=None if k["q_norm"] is None else k["q_norm"].data_ptr(),
                        k_norm=None if k["k_norm"] is None else k["k_norm"].data_ptr(), rope=k["rope"].data_ptr())
        self.lib = native.library()

    def __call__(self, fast, token: int) -> torch.Tensor:
        """Logits [1, V] after `token` at the decoder's position, which then advances."""
        if fast.kv.dtype != torch.float32 or not fast.kv.is_contiguous():
            raise RuntimeError("the native step needs the fast decoder's fp32 cache")
        self.m.kv, self.m.freqs, self.m.capacity = fast.kv.data_ptr(), fast.freqs.data_ptr(), fast.capacity
        logits = torch.empty(1, self.m.vocab, dtype=torch.float32)
        rc = self.lib.lmf_decode_step(c.byref(self.m), int(token), fast.pos, logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"KV cache full: {fast.pos + 1} tokens > capacity {fast.capacity}" if rc == -1 else f"native decode step failed ({rc})")
        fast.pos += 1
        return logits
