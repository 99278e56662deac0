"""CUDA graphs for the fast decoder's per-token step: `GraphDecoder(fast)`.

On a GPU at batch 1 a small model's decode step is bound by launching kernels from Python
(~15 ops a layer, a few microseconds each), not by the math. `FastDecoder.forward` slices the
cache to the current length, so its shapes change every step and it cannot be captured. The
step here has the same math with every shape fixed, and reads what changes per token (the
token and its position) from device tensors, so it is captured once into a CUDA graph and
replayed with one launch per token:

- inputs: static `tok [1]` and `pos [1]` (long, on the device), filled before each replay;
- RoPE: `freqs[pos]` gathered on the device;
- cache: k/v written with `index_copy_` at `pos` into the FastDecoder's own buffer;
- attention over a fixed window (the capacity rounded up to a multiple of 256), future slots
  masked by `slot > pos`; grouped-query without repeating K/V, as FastDecoder's T == 1 branch;
- logits: the graph's own output tensor, a static buffer overwritten by the next step.

It reuses the FastDecoder's fused weights, KV buffer and RoPE table; prefill stays on
`FastDecoder.forward` (eager, any length). One graph per window size is kept and reused across
calls. A graph holds raw device pointers, so graphs are dropped whenever the FastDecoder's
buffers are reallocated. Quantized layers are not supported (the caller keeps the eager path).

Off CUDA the same step runs eagerly (no capture): that is how the tests check it on a CPU.
`FastDecoder.generate_tokens` uses it on CUDA unless LMFORGE_CUDA_GRAPHS=0.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

BUCKET = 256  # window sizes are multiples of this, so a graph serves many prompt/budget sizes
WARMUP_STEPS = 3  # eager runs on a side stream before capture (lazy cuBLAS/allocator setup)


def bucket(capacity: int) -> int:
    """The attention window (and cache size) that serves `capacity` tokens."""
    return max(BUCKET, -(-capacity // BUCKET) * BUCKET)


def wanted(fast) -> bool:
    """Whether the caller should decode with CUDA graphs: on CUDA, unless LMFORGE_CUDA_GRAPHS=0."""
    off = os.environ.get("LMFORGE_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "off")
    return fast.device.type == "cuda" and not off


def unsupported_reason(fast) -> str | None:
    """Why `fast` cannot run here (None when it can): only plain (unquantized) weights."""
    linears = [fast.head] + [lin for layer in fast.layers for lin in (layer[1], layer[2], layer[4], layer[5])]
    if any(lin.q is not None or lin.w is None for lin in linears):
        return "quantized layers"
    return None


def graph_decoder_for(fast) -> "GraphDecoder | None":
    """The GraphDecoder cached on `fast` (built on first use); None when unsupported."""
    if unsupported_reason(fast) is not None:
        return None
    g = fast.__dict__.get("_graph_decoder")
    if g is None or g.fast is not fast:  # a FastDecoder.draft() copies the attribute: not its own
        g = GraphDecoder(fast)
        fast._graph_decoder = g
    return g


class GraphDecoder:
    """Fixed-shape decode steps over a FastDecoder's weights and cache.

    Use: `begin(capacity)` (empties the cache), `fast.forward(prompt_ids)` (prefill), then
    `step(token)` per token -> fp32 logits [1, V], valid until the next step.
    `use_graphs` (default: on CUDA) captures and replays; otherwise each step runs eagerly.
    """

    def __init__(self, fast, use_graphs: bool | None = None):
        reason = unsupported_reason(fast)
        if reason is not None:
            raise ValueError(f"CUDA graph decoding does not support {reason}")
        self._fast = weakref.ref(fast)  # the decoder caches us: no reference cycle
        self.use_graphs = fast.device.type == "cuda" if use_graphs is None else use_graphs
        self.tok = torch.zeros(1, dtype=torch.long, device=fast.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=fast.device)
        self.window = 0
        self.graphs: dict[int, tuple] = {}  # window -> (CUDAGraph, its static logits)
        self._buffers = None  # identity of the cache/RoPE buffers the graphs were captured on

    @property
    def fast(self):
        return self._fast()

    # -- per sequence -----------------------------------------------------------------------
    def begin(self, capacity: int) -> int:
        """Empty the cache for a sequence of at most `capacity` tokens; returns the window."""
        self.window = bucket(capacity)
        self.fast.reset(self.window)
        self._check_buffers()
        return self.window

    @torch.inference_mode()
    def step(self, tok) -> torch.Tensor:
        """Append one token (an int or a device tensor of one id) at `fast.pos`; fp32 logits [1, V]."""
        fast = self.fast
        if fast.pos >= self.window:
            raise ValueError(f"KV cache full: position {fast.pos} >= window {self.window} (call begin first)")
        self._check_buffers()
        if isinstance(tok, torch.Tensor):
            self.tok.copy_(tok.reshape(1))
        else:
            self.tok.fill_(int(tok))  # a kernel argument, not a host-to-device copy
        self.pos.fill_(fast.pos)
        if self.use_graphs:
            logits = self._replay(self.window)
        else:
            logits = self.decode_step(self.window)
        fast.pos += 1
        return logits

    def _check_buffers(self) -> None:
        """Drop graphs captured on buffers that FastDecoder.reset has since replaced."""
        fast = self.fast
        if fast.kv is None or fast.capacity < self.window:
            raise ValueError(f"the cache holds {fast.capacity} slots, fewer than the window {self.window} (call begin)")
        ident = (fast.kv.data_ptr(), tuple(fast.kv.shape), fast.freqs.data_ptr())
        if ident != self._buffers:
            self.graphs.clear()
            self._buffers = ident

    # -- CUDA graphs ------------------------------------------------------------------------
    def _replay(self, window: int) -> torch.Tensor:
        hit = self.graphs.get(window)
        if hit is None:
            hit = self.graphs[window] = self._capture(window)
        graph, logits = hit
        graph.replay()
        return logits

    def _capture(self, window: int) -> tuple:
        """Record decode_step(window) into a CUDA graph.

        The static inputs already hold this step's token and position, so the eager warm-up
        runs write the same k/v the first replay writes: they leave the cache as it should be.
        """
        device = self.fast.device
        with torch.cuda.device(device), torch.inference_mode():
            # Warm up on a side stream (as torch.cuda.graphs documents): first calls set up
            # cuBLAS handles and workspaces, which must not happen inside the capture.
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.decode_step(window)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.decode_step(window)  # allocated in the graph's pool: a static output
        return graph, logits

    # -- the step (captured on CUDA, eager elsewhere) ---------------------------------------
    def decode_step(self, window: int) -> torch.Tensor:
        """One token through every layer; shapes depend only on `window`.

        Token and position come from `self.tok` / `self.pos`; nothing reads them on the host.
        """
        f = self.fast
        x = F.embedding(self.tok, f.embed)  # [1, C]
        # e^{i pos freq} for this position: a device gather (through the real view of the table)
        freqs = torch.view_as_complex(torch.view_as_real(f.freqs).index_select(0, self.pos))[:, None, :]  # [1, 1, D/2]
        slots = torch.arange(window, device=self.pos.device)
        hide = slots > self.pos  # [window]: slots after pos
        hides = {None: hide}  # a sliding window also hides the slots it has left behind
        for w in set(f.windows) - {None}:
            hides[w] = hide | (slots <= self.pos - w)
        for li, (n1, qkv_l, o_l, n2, gu_l, down_l) in enumerate(f.layers):
            h = F.rms_norm(x, (x.shape[-1],), n1, f.eps)
            x = x + o_l(self._attend(li, qkv_l(h), freqs, hides[f.windows[li]], window))
            h = F.rms_norm(x, (x.shape[-1],), n2, f.eps)
            gu = gu_l(h)
            x = x + down_l(F.silu(gu[:, : f.ff]) * gu[:, f.ff :])
        x = F.rms_norm(x, (x.shape[-1],), f.final_norm, f.eps)
        return f.head(x).float()

    def _attend(self, li: int, qkv: torch.Tensor, freqs, hide, window: int) -> torch.Tensor:
        """RoPE, cache write at pos and masked attention over the window for layer `li`."""
        f = self.fast
        H, KV, D = f.H, f.KV, f.D
        if f.qk_norms[li] is not None:
            from lmforge.fast.ops import qk_norm_

            qk_norm_(qkv, f.qk_norms[li], H, KV, D, f.eps)
        qk = qkv[:, : (H + KV) * D].view(1, H + KV, D // 2, 2)  # interleaved (re, im) pairs
        if not f.ropes[li]:
            pass  # a NoPE layer
        elif f.dtype != torch.float32:
            qk.copy_(torch.view_as_real(torch.view_as_complex(qk.float()) * freqs))
        else:
            torch.view_as_complex(qk).mul_(freqs)
        kv = f.kv[li]  # [2, KV, capacity, D]
        kv.index_copy_(2, self.pos, qkv[0, H * D :].view(2, KV, 1, D))
        q = qkv[0, : H * D].view(KV, H // KV, D)  # query heads grouped by their kv head
        k, v = kv[0, :, :window], kv[1, :, :window]  # [KV, window, D]
        s = torch.bmm(q, k.transpose(1, 2)).mul_(f.scale).masked_fill_(hide, float("-inf"))
        return torch.bmm(s.softmax(-1), v).reshape(1, H * D)
