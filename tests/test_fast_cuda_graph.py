"""The fixed-shape decode step of lmforge.fast.cuda_graph against FastDecoder, the full forward
and the oracle (`generate_naive`).

On the CPU the step runs eagerly (the same function a CUDA graph captures): its logits, its
op trace (fixed shapes, no host reads), the FastDecoder loop pointed at it by patching the
backend choice, and the capture/replay bookkeeping against a simulated torch.cuda graph API.
Real capture and replay are the tests marked needs_cuda."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_config
from lmforge.engine import SamplingParams, generate_naive, generate_tokens
from lmforge.fast import decode
from lmforge.fast.cuda_graph import GraphDecoder, bucket, graph_decoder_for, unsupported_reason, wanted
from lmforge.fast.decode import FastDecoder, fast_decoder_for
from lmforge.model import Transformer, rope_inv_freq

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
SHAPES = {"gqa": {"n_heads": 4, "n_kv_heads": 2}, "mha": {"n_heads": 4, "n_kv_heads": 4}, "mqa": {"n_heads": 4, "n_kv_heads": 1},
          "bias": {"attention_bias": True}}


def sharp_tiny(device="cpu", dtype=torch.float32, **kw):
    """A tiny random fp32 model with larger weights, so greedy choices are not near ties."""
    m = Transformer(tiny_config(**kw)).init_weights(seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    m = m.to(device=device, dtype=dtype)
    m.inv_freq = rope_inv_freq(m.cfg).to(device)  # RoPE frequencies stay fp32, as lmforge.load keeps them
    return m


def step_logits(model, ids: list[int], n_prefill: int, capacity: int = 64) -> torch.Tensor:
    """Logits [len(ids) - n_prefill + 1, V]: the prefill's last, then one per graph-style step
    (captured and replayed on CUDA, eager elsewhere)."""
    fast = FastDecoder(model)
    return steps_on(GraphDecoder(fast, use_graphs=fast.device.type == "cuda"), ids, n_prefill, capacity)


def steps_on(g: GraphDecoder, ids: list[int], n_prefill: int, capacity: int) -> torch.Tensor:
    fast = g.fast
    g.begin(capacity)
    dev = fast.device
    out = [fast.forward(torch.tensor(ids[:n_prefill], device=dev))]
    for t in ids[n_prefill:]:
        out.append(g.step(t).clone())  # the step's buffer is static: copy before the next step
    assert fast.pos == len(ids)
    return torch.cat(out)


def fast_forward_logits(model, ids: list[int], n_prefill: int) -> torch.Tensor:
    """The same logits from FastDecoder.forward, one token at a time after the prefill."""
    dec = FastDecoder(model)
    dec.reset(64)
    dev = dec.device
    out = [dec.forward(torch.tensor(ids[:n_prefill], device=dev))]
    out += [dec.forward(torch.tensor([t], device=dev)) for t in ids[n_prefill:]]
    return torch.cat(out)


@pytest.fixture
def graph_backend_on_cpu(monkeypatch):
    """Make FastDecoder.generate_tokens take the graph path on the CPU (eager steps)."""
    monkeypatch.setattr(decode, "_graph_backend", lambda fast: graph_decoder_for(fast))
    monkeypatch.setenv("LMFORGE_FAST", "1")


def engine_tokens(model, prompt, params, **kw):
    return [t for _, t in generate_tokens(model, [prompt], params, **kw)]


# -- the step on the CPU -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step_logits_equal_fast_forward_and_full_forward(shape):
    m = sharp_tiny(**SHAPES[shape])
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    n_prefill = 5
    with torch.inference_mode():
        got = step_logits(m, ids, n_prefill)
        full = m(torch.tensor([ids]))[0, n_prefill - 1 :]
        ref = fast_forward_logits(m, ids, n_prefill)
    assert got.shape == full.shape
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - full).abs().max().item() <= 1e-4


class OpLog(TorchDispatchMode):
    """Every aten op of a region with the shapes of its outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), tuple(shapes)))
        return out


def test_step_is_capturable():
    """The same ops on the same shapes at every position, and no host read (`.item()`,
    data-dependent shapes): what a CUDA graph needs of the step."""
    fast = FastDecoder(sharp_tiny())
    g = GraphDecoder(fast, use_graphs=False)
    g.begin(40)
    logs = []
    with torch.inference_mode():
        fast.forward(torch.tensor([1, 2, 3]))
        for t in range(4, 12):
            g.tok.fill_(t)
            g.pos.fill_(fast.pos)
            with OpLog() as log:
                g.decode_step(g.window)
            fast.pos += 1
            logs.append(log.ops)
    assert all(ops == logs[0] for ops in logs)
    names = {op for op, _ in logs[0]}
    assert not names & {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
    assert ("aten.bmm.default", ((2, 2, g.window),)) in logs[0]  # attention over the whole window


@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_graph_path_greedy_equals_naive(shape, graph_backend_on_cpu):
    m = sharp_tiny(**SHAPES[shape])
    prompt = [5, 17, 99, 3, 42]
    p = SamplingParams(max_new_tokens=40)
    assert engine_tokens(m, prompt, p) == generate_naive(m, prompt, p)
    assert fast_decoder_for(m)._graph_decoder.window == 256  # the graph path really ran


def test_graph_path_keeps_engine_semantics(monkeypatch):
    """Stops, budget, should_stop, repetition penalty and seeded sampling: same tokens as the
    eager fast path."""
    m = sharp_tiny()
    prompt = [7, 8, 9]
    monkeypatch.setenv("LMFORGE_FAST", "1")
    eager = engine_tokens(m, prompt, SamplingParams(max_new_tokens=30))
    cases = [
        (SamplingParams(max_new_tokens=30, stop_ids={eager[5]}), {}),
        (SamplingParams(max_new_tokens=7), {}),
        (SamplingParams(max_new_tokens=30), {"should_stop": lambda b, ids: len(ids) == 4}),
        (SamplingParams(max_new_tokens=30, repetition_penalty=1.3), {}),
        (SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=123), {}),
        (SamplingParams(max_new_tokens=300), {}),  # runs into the context (128 tokens, the last one never fed back)
    ]
    want = [engine_tokens(m, prompt, p, **kw) for p, kw in cases]
    monkeypatch.setattr(decode, "_graph_backend", lambda fast: graph_decoder_for(fast))
    got = [engine_tokens(m, prompt, p, **kw) for p, kw in cases]
    assert got == want
    assert len(got[1]) == 7 and len(got[2]) == 4 and len(got[-1]) == 128 - len(prompt) + 1


def test_windows_are_buckets_and_graphs_drop_with_the_cache():
    assert [bucket(c) for c in (1, 256, 257, 600)] == [256, 256, 512, 768]
    m = sharp_tiny(max_seq_len=1024)
    fast = FastDecoder(m)
    g = GraphDecoder(fast, use_graphs=False)
    assert g.begin(100) == 256 and fast.capacity == 256
    g.graphs[256] = "captured"  # stands for a graph on these buffers
    g.begin(200)
    assert g.graphs == {256: "captured"}  # same buffers: kept
    g.begin(300)  # the cache grows: a graph on the old buffers would write freed memory
    assert fast.capacity == 512 and g.graphs == {}
    g.graphs[512] = "captured"
    fast.reset(1000)  # someone else regrows the cache between steps (pos back to 0)
    with torch.inference_mode():
        g.step(4)
    assert g.graphs == {} and fast.pos == 1


def test_step_refuses_past_the_window():
    fast = FastDecoder(sharp_tiny())
    g = GraphDecoder(fast, use_graphs=False)
    g.begin(10)
    fast.pos = g.window
    with pytest.raises(ValueError, match="full"):
        g.step(1)


def test_backend_choice(monkeypatch):
    m = sharp_tiny()
    fast = FastDecoder(m)
    assert decode._graph_backend(fast) is None  # CPU: eager steps
    assert graph_decoder_for(fast) is graph_decoder_for(fast)  # cached per FastDecoder
    assert graph_decoder_for(fast.draft([0])) is not graph_decoder_for(fast)  # a draft gets its own

    class OnCuda:
        device = torch.device("cuda")

    monkeypatch.delenv("LMFORGE_CUDA_GRAPHS", raising=False)
    assert wanted(OnCuda) and not wanted(fast)
    monkeypatch.setenv("LMFORGE_CUDA_GRAPHS", "0")
    assert not wanted(OnCuda)


def test_quantized_model_falls_back_to_eager_steps(monkeypatch):
    from lmforge.quant import quantize_model

    m = quantize_model(sharp_tiny(), "int8", smooth=False)
    monkeypatch.setenv("LMFORGE_FAST", "1")
    fast = fast_decoder_for(m)
    assert fast is not None and unsupported_reason(fast) == "quantized layers"
    assert graph_decoder_for(fast) is None
    with pytest.raises(ValueError):
        GraphDecoder(fast)
    p = SamplingParams(max_new_tokens=12)
    eager = engine_tokens(m, [1, 2, 3], p)
    monkeypatch.setattr(decode, "_graph_backend", lambda fast: graph_decoder_for(fast))
    assert engine_tokens(m, [1, 2, 3], p) == eager


class SimulatedCudaGraphs:
    """torch.cuda's stream and graph API on the CPU: "capture" runs the step eagerly (its output
    becomes the static buffer) and replay re-runs it into that buffer, as a real replay
    rewrites its static output. Checks GraphDecoder's bookkeeping, not CUDA."""

    def __init__(self, monkeypatch, g: GraphDecoder):
        self.events = []
        sim = self

        class Graph:
            def replay(self):
                sim.events.append("replay")
                window, out = next((w, out) for w, (graph, out) in g.graphs.items() if graph is self)
                out.copy_(g.decode_step(window))

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        def context(event):
            @contextlib.contextmanager
            def enter(*args, **kwargs):
                self.events.append(event)
                yield
                self.events.append(f"end {event}")

            return enter

        for name, value in {"CUDAGraph": Graph, "Stream": Stream, "current_stream": lambda device=None: Stream(),
                            "graph": context("capture"), "stream": context("side stream"), "device": context("device")}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_graph_bookkeeping_with_simulated_cuda_graphs(monkeypatch):
    m = sharp_tiny(max_seq_len=1024)
    fast = FastDecoder(m)
    g = GraphDecoder(fast, use_graphs=True)
    sim = SimulatedCudaGraphs(monkeypatch, g)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    with torch.inference_mode():
        got = steps_on(g, ids, 5, 64)
        ref = fast_forward_logits(m, ids, 5)
    assert (got - ref).abs().max().item() <= 1e-4  # the static buffer holds each step's logits
    n_steps = len(ids) - 5
    warm = ["device", "side stream"] + ["end side stream", "capture", "end capture", "end device"]
    assert sim.events == warm + ["replay"] * n_steps  # warm up, capture once, then replay only
    first = g.graphs[256]
    with torch.inference_mode():
        steps_on(g, ids, 5, 200)  # another sequence in the same bucket
    assert g.graphs[256] is first and sim.events.count("capture") == 1
    with torch.inference_mode():
        steps_on(g, ids, 5, 300)  # a bigger bucket: the cache grows
    assert list(g.graphs) == [512] and sim.events.count("capture") == 2


# -- CUDA: capture and replay ------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("shape", ["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_logits_equal_fast_forward(shape, dtype):
    m = sharp_tiny("cuda", dtype, **SHAPES[shape])
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    with torch.inference_mode():
        got = step_logits(m, ids, 5)  # captured once, replayed per token
        ref = fast_forward_logits(m, ids, 5)
        full = m(torch.tensor([ids], device="cuda"))[0, 4:].float()
    if dtype == torch.float32:  # TF32 matmuls (off by default) would round like bf16-ish
        tol = 1e-4 if not torch.backends.cuda.matmul.allow_tf32 else 2e-2
    else:  # bf16: the window's masked slots change the summation order, not the math
        tol = 3e-2 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    assert (got - full).abs().max().item() <= tol * (1 if dtype == torch.float32 else 2)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_uses_graphs_and_matches_eager(dtype, monkeypatch):
    m = sharp_tiny("cuda", dtype, max_seq_len=1024)
    prompt = [5, 17, 99, 3, 42]
    p = SamplingParams(max_new_tokens=60)
    monkeypatch.setenv("LMFORGE_FAST", "1")
    monkeypatch.setenv("LMFORGE_CUDA_GRAPHS", "0")
    eager = engine_tokens(m, prompt, p)
    assert "_graph_decoder" not in fast_decoder_for(m).__dict__  # the switch keeps the eager steps
    monkeypatch.setenv("LMFORGE_CUDA_GRAPHS", "1")
    graphed = engine_tokens(m, prompt, p)
    g = fast_decoder_for(m)._graph_decoder
    assert list(g.graphs) == [256]
    graph = g.graphs[256][0]
    assert engine_tokens(m, prompt, p) == graphed  # replays are deterministic
    assert g.graphs[256][0] is graph  # and reuse the graph across calls in the same bucket
    if dtype == torch.float32:
        assert graphed == eager == generate_naive(m, prompt, p)
    else:  # bf16 sums in another order than the eager path: a late near-tie may flip
        assert graphed[:8] == eager[:8]
    seeded = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, seed=5, repetition_penalty=1.2)
    assert engine_tokens(m, prompt, seeded) == engine_tokens(m, prompt, seeded)
    stop = SamplingParams(max_new_tokens=60, stop_ids={graphed[10]})
    assert engine_tokens(m, prompt, stop) == graphed[: graphed.index(graphed[10])]
    longer = engine_tokens(m, prompt, SamplingParams(max_new_tokens=400))  # a second window (512)
    assert sorted(g.graphs) == [512] and len(longer) == 400  # the cache grew: old graphs dropped
