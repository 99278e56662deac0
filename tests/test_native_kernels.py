"""lmforge's native kernels (lmforge/native): matrix products straight from GGUF blocks, and the
one-call decoding step, against references they must equal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge import native

needs_native = pytest.mark.skipif(native.library() is None, reason="the native kernels could not be built here (no C compiler)")
TYPES = sorted(native.TYPES.items(), key=lambda kv: kv[1])


def random_blocks(qtype: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Valid blocks of any type: random bytes with small finite float16 scales."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    rng = np.random.default_rng(seed)
    values, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    raw = rng.integers(0, 256, size=(rows, cols // values, nbytes), dtype=np.uint8)
    from lmforge.loading.gguf_file import _SCALE_FIELDS

    lo, hi = _SCALE_FIELDS[qtype]
    scales = rng.uniform(-0.05, 0.05, size=(rows, cols // values, (hi - lo) // 2)).astype(np.float16)
    raw[..., lo:hi] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1).copy())


@needs_native
@pytest.mark.parametrize("name,qtype", TYPES)
@pytest.mark.parametrize("m", [1, 6])
def test_every_block_type_equals_the_reference(name, qtype, m):
    """Both the SIMD and the plain-C path equal x @ (gguf's own dequantized weights)^T in
    float64, to float32 rounding: the file's numbers, activations not rounded. 6 rows cover the
    shared-unpacking path and its remainder, 512 columns two K-quant super-blocks."""
    from lmforge.native.linear import matmul, reference_dequantize

    rows, cols = 24, 512
    w = random_blocks(qtype, rows, cols, seed=qtype)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
    ref = x.double() @ reference_dequantize(w, qtype, cols).double().T
    for scalar in (False, True):
        y = matmul(w, qtype, cols, x, scalar=scalar)
        err = (y.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (name, scalar, float(err))


@needs_native
def test_the_pure_pytorch_fallback_computes_the_same_layer(monkeypatch):
    """Without the kernels a BlockLinear runs its dequantized weight through F.linear: the same
    layer, to float32 rounding."""
    import gguf

    from lmforge.native import linear

    w = torch.randn(64, 256) * 0.05
    b = torch.randn(64)
    x = torch.randn(3, 5, 256)
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        blocks = torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype))
        layer = linear.BlockLinear(blocks, int(qtype), 256, bias=b)
        fast = layer(x)
        monkeypatch.setattr(linear, "runs_natively", lambda t: False)
        slow = linear.BlockLinear(blocks, int(qtype), 256, bias=b)(x)
        monkeypatch.undo()
        exact = torch.nn.functional.linear(x, layer.weight, b)
        assert torch.allclose(slow, exact, atol=1e-5)
        assert torch.allclose(fast, exact, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """Tiny random models (2 layers, the default tokenizer) written as Q4_0 and Q8_0 GGUFs, one
    LLaMA-style and one Qwen2-style (q/k/v biases)."""
    from conftest import tiny_config
    from lmforge.export.gguf import write_gguf
    from lmforge.loading import load_tokenizer
    from lmforge.loading.resolve import default_model_path
    from lmforge.model import Transformer

    if default_model_path() is None:
        pytest.skip("default model (its tokenizer) not installed")
    tok = load_tokenizer(None)
    out = {}
    for arch, kw in (("llama", {}), ("qwen2", {"attention_bias": True})):
        cfg = tiny_config(vocab_size=49152, d_model=128, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=256, tie_embeddings=True, **kw)
        model = Transformer(cfg).init_weights(seed=1).eval()
        with torch.no_grad():  # larger weights (greedy choices are not near ties), biases that matter
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.mul_(6)
                elif name.endswith(".bias"):
                    p.copy_(torch.randn_like(p) * 0.5)
        for kind in ("q4_0", "q8_0"):
            out[arch, kind] = write_gguf(model, tok, tmp_path_factory.mktemp(arch) / f"m-{kind}.gguf", kind)
    return out


@needs_native
def test_a_quantized_gguf_runs_its_own_blocks_by_default(tiny_ggufs):
    """--quant auto on a CPU keeps every linear layer as the file's blocks; its logits are the
    dequantized model's."""
    import lmforge
    from lmforge.native.linear import BlockLinear

    for (arch, kind), path in tiny_ggufs.items():
        auto = lmforge.load(str(path), quant="auto", device="cpu")
        exact = lmforge.load(str(path), quant="none", device="cpu")
        assert auto.model.quant == "gguf"
        linears = [m for m in auto.model.modules() if isinstance(m, (BlockLinear, torch.nn.Linear))]
        assert linears and all(isinstance(m, BlockLinear) for m in linears), (arch, kind)
        ids = torch.tensor([auto.tokenizer.encode("Hello there, how are you today?")])
        with torch.no_grad():
            a, e = auto.model(ids), exact.model(ids)
        assert ((a - e).abs().max() / e.abs().max()) < 1e-5, (arch, kind)


@needs_native
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_native_step_equals_the_fast_decoder(tiny_ggufs, arch, monkeypatch):
    """One-call steps (lmforge.native.step) give the fast decoder's logits at every position after
    a prompt, and the same greedy continuation."""
    import lmforge
    from lmforge.fast.decode import FastDecoder

    lm = lmforge.load(str(tiny_ggufs[arch, "q4_0"]), quant="auto", device="cpu")
    prompt = torch.tensor(lm.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    runs = {}
    for step in ("1", "0"):
        monkeypatch.setenv("LMFORGE_NATIVE_STEP", step)
        dec = FastDecoder(lm.model)
        dec.reset(64)
        with torch.no_grad():
            logits = [dec.forward(prompt)]
            for _ in range(12):
                logits.append(dec.forward(logits[-1].argmax(-1)))
        assert (dec.native_step() is not None) == (step == "1")
        runs[step] = torch.cat(logits)
    a, b = runs["1"], runs["0"]
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert ((a - b).abs().max() / b.abs().max()) < 1e-5


@needs_native
def test_quant_gguf_needs_a_quantized_gguf(tmp_path):
    from conftest import tiny_config

    import lmforge
    from lmforge.errors import LmforgeError
    from lmforge.loading import load_tokenizer, save_hf
    from lmforge.loading.resolve import default_model_path
    from lmforge.model import Transformer

    if default_model_path() is None:
        pytest.skip("default model (its tokenizer) not installed")
    save_hf(Transformer(tiny_config(vocab_size=49152)).init_weights(seed=0), load_tokenizer(None), tmp_path / "m")
    with pytest.raises(LmforgeError, match="--quant gguf runs a quantized GGUF file's own blocks"):
        lmforge.load(str(tmp_path / "m"), quant="gguf", device="cpu")


@needs_native
def test_a_non_finite_block_scale_names_the_tensor(tiny_ggufs, tmp_path):
    """A block whose float16 scale is NaN fails the load with the file and tensor named."""
    import lmforge
    from lmforge.errors import LmforgeError
    from lmforge.loading.gguf_file import read_gguf_file

    src = tiny_ggufs["llama", "q8_0"]
    _, tensors = read_gguf_file(src)
    data = next(t for t in tensors if t.name == "blk.1.ffn_down.weight").data
    root = data
    while isinstance(root.base, np.ndarray):  # the map of the whole file
        root = root.base
    offset = data.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    raw = bytearray(src.read_bytes())
    raw[offset : offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()  # the first block's scale
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(LmforgeError, match=r"bad\.gguf: tensor 'blk\.1\.ffn_down\.weight' holds non-finite values"):
        lmforge.load(str(bad), quant="auto", device="cpu")


def test_without_a_compiler_lmforge_says_so_once_and_runs_in_pytorch(tmp_path, monkeypatch, capsys):
    """No C compiler (or a failing one): one line on stderr, `library()` is None, and a quantized
    GGUF runs on fp16 copies of its weights (the PyTorch path)."""
    from lmforge.quant import resolve_precision

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    native.library.cache_clear()
    try:
        assert native.library() is None
        err = capsys.readouterr().err
        assert "native kernels unavailable" in err and len(err.strip().splitlines()) == 2  # the build line, the reason
        assert resolve_precision("fp32", "auto", "cpu", quantized_source=True) == ("fp16", "none")
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@needs_native
@pytest.mark.parametrize("name,qtype", TYPES)
def test_native_dequantization_equals_gguf(name, qtype):
    from lmforge.native.linear import dequantize, reference_dequantize

    w = random_blocks(qtype, 5, 512, seed=qtype + 1)
    assert torch.allclose(dequantize(w, qtype, 512), reference_dequantize(w, qtype, 512), rtol=1e-6, atol=1e-7), name


@needs_native
@pytest.mark.parametrize("variant,flags", [("AVX2 without AVX-512", ["-mavx2", "-mfma", "-mf16c"]), ("plain C", [])])
def test_other_builds_of_the_kernels_equal_the_reference(tmp_path, variant, flags):
    """The same source built for machines without AVX-512 (AVX2 + FMA) and without any vector
    extension computes the same products (this machine runs both)."""
    import shutil

    from lmforge.native.linear import matmul, reference_dequantize

    cc = shutil.which("gcc") or shutil.which("cc")
    out = tmp_path / "variant.so"
    native.build(cc, out, ["-O2", "-fopenmp", "-shared", "-fPIC", "-std=c11", *flags])
    lib = native.load(out)
    assert lib.lmf_simd_level() == (1 if flags else 0)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    for name, qtype in TYPES:
        w = random_blocks(qtype, 16, 512, seed=qtype + 7)
        ref = x.double() @ reference_dequantize(w, qtype, 512).double().T
        err = (matmul(w, qtype, 512, x, lib=lib).double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (variant, name, float(err))


@needs_native
def test_lora_on_gguf_blocks_runs_beside_them(tiny_ggufs):
    """An adapter on a quantized GGUF leaves the blocks as the file has them: the fast decoder
    adds the updates beside them (the one-call native step stands aside) with the general
    engine's logits."""
    import lmforge
    from lmforge.fast.decode import FastDecoder
    from lmforge.finetune.lora import LoraSettings, apply_lora, lora_layers
    from lmforge.native.linear import BlockLinear

    lm = lmforge.load(str(tiny_ggufs["llama", "q4_0"]), quant="auto", device="cpu")
    apply_lora(lm.model, LoraSettings(r=4, alpha=8, targets=["attention", "mlp"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_layers(lm.model).values():
            assert isinstance(m.base_layer, BlockLinear)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    lm.model.eval()
    ids = torch.tensor(lm.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    with torch.no_grad():
        ref = lm.model(ids[None])[0]
        dec = FastDecoder(lm.model)
        dec.reset(64)
        got = torch.cat([dec.forward(ids[:5], all_logits=True)] + [dec.forward(t[None]) for t in ids[5:]])
    assert dec.native_step() is None
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5


@needs_native
@pytest.mark.parametrize("rows_out", [96, 1000])
def test_many_rows_run_through_a_dense_scratch_with_the_kernels_numbers(rows_out, monkeypatch):
    """From DENSE_FROM_ROWS activation rows on, a layer unpacks its blocks into a scratch matrix
    (in slices when it exceeds the scratch) and runs sgemm: the same products as the kernels."""
    from lmforge.native import linear as L

    monkeypatch.setattr(L, "SCRATCH_FLOATS", 256 * 40)  # 1000 output rows: four slices
    blocks = random_blocks(2, rows_out, 256, seed=3)  # Q4_0
    layer = L.BlockLinear(blocks, 2, 256)
    ref = L.reference_dequantize(blocks, 2, 256)
    for m in (L.DENSE_FROM_ROWS - 1, L.DENSE_FROM_ROWS, 130):
        x = torch.randn(m, 256)
        y = layer(x)
        assert torch.allclose(y, x @ ref.T, atol=1e-4, rtol=1e-4), m
        assert torch.allclose(y, L.matmul(blocks, 2, 256, x), atol=1e-4, rtol=1e-4), m


@needs_native
def test_a_lone_server_row_runs_the_native_step_with_the_batched_tokens(tiny_ggufs, monkeypatch):
    """The server's scheduler moves a single decoding row to the fast decoder's native step and
    back into the batch when others join; greedy replies equal each request run alone."""
    import asyncio

    import lmforge
    from lmforge.engine import SamplingParams, generate_tokens
    from lmforge.serve.scheduler import GenRequest, Scheduler

    lm = lmforge.load(str(tiny_ggufs["qwen2", "q4_0"]), quant="auto", device="cpu")
    s = Scheduler(lm.model, lm.tokenizer, slots=2, ctx=128)
    prompts = [lm.tokenizer.encode(t) for t in ("Once upon a time", "The weather today is", "Numbers: 1 2 3")]
    budgets = [80, 6, 9]

    async def main():
        first = s.submit(GenRequest(prompts[0], SamplingParams(max_new_tokens=budgets[0])))
        await asyncio.sleep(0.05)  # the first decodes alone for a while, then two more join
        rest = [s.submit(GenRequest(p, SamplingParams(max_new_tokens=k))) for p, k in zip(prompts[1:], budgets[1:])]
        return [[ev.token async for ev in h.events() if ev.token is not None] for h in [first, *rest]]

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
        assert s.lone is not None and s.lone.fast.native_step() is not None
        assert 0 < s.stats.lone_steps < s.stats.steps
    finally:
        s.stop()
    monkeypatch.setenv("LMFORGE_FAST", "0")  # the reference: the general model forward, one request at a time
    for p, k, ids in zip(prompts, budgets, got):
        ref = [t for _, t in generate_tokens(lm.model, [p], SamplingParams(max_new_tokens=k), stop_ids=lm.tokenizer.stop_ids())]
        assert ids == ref
