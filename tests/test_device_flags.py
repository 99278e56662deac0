"""One device story: `--device auto|cpu|cuda|cuda:N|mps` on every command that runs a model
(auto by default), `lmforge.device.resolve_device`, and what `--dtype`/`--quant auto` mean per
device (`lmforge.quant.resolve_precision`). CUDA is faked by monkeypatching `torch.cuda`; the
fake never gets as far as moving a tensor (the model builder is stopped first)."""
from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import run_cli
from test_eval_scoring import byte_tokenizer, tiny_byte_model

from lmforge.device import resolve_device
from lmforge.errors import LmforgeError
from lmforge.quant import _fbgemm_available, resolve_precision

INT8 = "int8" if _fbgemm_available() else "none"


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("lmforge.device._mps_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices with bf16, as far as lmforge's checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


# -- resolve_device ---------------------------------------------------------------------------
def test_auto_is_cpu_without_an_accelerator(monkeypatch):
    _no_gpu(monkeypatch)
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real machine's auto when it has no CUDA")
def test_auto_on_this_machine_is_not_cuda():
    assert resolve_device("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("spec", ["bogus", "gpu", "cuda:x", "cuda:-1", "cpu:0", "tpu"])
def test_unknown_device_is_a_one_line_error_naming_the_flag_and_choices(spec):
    with pytest.raises(LmforgeError) as e:
        resolve_device(spec)
    msg = str(e.value)
    assert "\n" not in msg and f"--device '{spec}'" in msg and "auto, cpu, cuda, cuda:N or mps" in msg


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "mps"])
def test_missing_accelerator_is_an_error(monkeypatch, spec):
    _no_gpu(monkeypatch)
    with pytest.raises(LmforgeError, match=f"--device {spec}: .* not available") as e:
        resolve_device(spec)
    assert "\n" not in str(e.value)


def test_cuda_branches(fake_cuda):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(LmforgeError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("lmforge.device._mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") and resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


# -- (dtype, quant) per device ------------------------------------------------------------------
@pytest.mark.parametrize("device, dtype, quant, want", [
    ("cpu", "fp32", "auto", ("fp32", INT8)),  # CPU: auto keeps its meaning, int8 over fp32 weights
    ("cpu", "bf16", "auto", ("bf16", "none")),
    ("cpu", "fp16", "auto", ("fp16", "none")),
    ("cpu", "fp32", "none", ("fp32", "none")),
    ("cpu", "fp32", "int4", ("fp32", "int4")),
    ("cpu", "fp32", None, ("fp32", "none")),
    ("cuda", "fp32", "auto", ("bf16", "none")),  # CUDA: auto = bf16 weights, no runtime quantization
    ("cuda:1", "fp32", "auto", ("bf16", "none")),
    ("cuda", "fp16", "auto", ("fp16", "none")),  # an asked-for half precision is kept
    ("cuda", "bf16", "auto", ("bf16", "none")),
    ("cuda", "fp32", "none", ("fp32", "none")),  # exact weights when asked for
    ("mps", "fp32", "auto", ("fp32", "none")),
])
def test_precision_table(fake_cuda, device, dtype, quant, want):
    assert resolve_precision(dtype, quant, torch.device(device)) == want


def test_cuda_without_bf16_runs_fp16(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("fp32", "auto", torch.device("cuda")) == ("fp16", "none")


def test_precision_rejects_unknown_quant():
    with pytest.raises(LmforgeError, match="unknown --quant 'int3'"):
        resolve_precision("fp32", "int3", torch.device("cpu"))


# -- the loader and the commands ----------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny byte-level model, a LoRA adapter on it, prompts and a text to score."""
    from lmforge.finetune.lora import LoraSettings, apply_lora, lora_layers, save_adapter
    from lmforge.loading import load_model, save_hf

    root = tmp_path_factory.mktemp("devices")
    base = save_hf(tiny_byte_model(seed=3, max_seq_len=2048), byte_tokenizer(), root / "base")  # room for critique prompts
    m, _ = load_model(str(base))
    settings = LoraSettings(r=4, alpha=8, targets=["q_proj", "v_proj"])
    apply_lora(m, settings)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.weight.normal_(0, 0.1)
    save_adapter(m, root / "adapter", base_model=str(base), settings=settings)
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "abc"}) + "\n")
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    return root


def command_args(name: str, files, out) -> list[str]:
    """Arguments that make `name` run quickly on the tiny model (writing under `out`)."""
    m = str(files / "base")
    return {
        "generate": ["generate", "--model", m, "--prompt", "abc", "--max-new-tokens", "3", "--json"],
        "chat": ["chat", "--model", m, "--max-new-tokens", "3"],
        "serve": ["serve", "--model", m],
        "eval": ["eval", "--model", m, "--tasks", f"ppl:{files / 'text.txt'}", "--ppl-window", "32", "--progress", "false",
                 "--out", str(out / "eval")],
        "inspect-logit-lens": ["inspect", "logit-lens", "--model", m, "--prompt", "abc", "--out", str(out / "lens")],
        "inspect-attention": ["inspect", "attention", "--model", m, "--prompt", "abc", "--out", str(out / "attn")],
        "merge": ["merge", "--model", str(files / "adapter"), "--out", str(out / "merged")],
        "convert": ["convert", "--model", m, "--to", "hf", "--out", str(out / "hf")],
        "constitution": ["constitution", "--model", m, "--data", str(files / "prompts.jsonl"), "--max-new-tokens", "3",
                         "--out", str(out / "const")],
    }[name]


COMMANDS = ["generate", "chat", "serve", "eval", "inspect-logit-lens", "inspect-attention", "merge", "convert", "constitution"]


@pytest.fixture
def cli_env(monkeypatch):
    """stdin for chat, and serve that builds its app but does not listen."""
    import lmforge.cli.commands.serve as serve

    served = []
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    monkeypatch.setattr(serve, "serve_on_threads", lambda app, server: served.append(app))
    return served


@pytest.fixture
def stop_at_build(monkeypatch):
    """Record the device and weight dtype the loader builds with, then stop (an LmforgeError)."""
    import lmforge.loading.load as load

    seen = []

    def spy(cfg, state, device="cpu"):
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        seen.append((torch.device(device), dtypes))
        raise LmforgeError(f"stopped before building on {device}")

    monkeypatch.setattr(load, "build_model", spy)
    return seen


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("name", COMMANDS)
def test_every_model_command_runs_with_device(name, device, files, tmp_path, capsys, cli_env):
    r = run_cli(capsys, *command_args(name, files, tmp_path), "--device", device)
    assert r.returncode == 0, r.stderr
    if name == "serve":
        assert len(cli_env) == 1
        assert "cpu" in r.stderr  # the banner says where the model runs (auto is cpu on this machine)


@pytest.mark.parametrize("name", COMMANDS)
def test_bogus_device_is_a_one_line_error(name, files, tmp_path, capsys, cli_env):
    r = run_cli(capsys, *command_args(name, files, tmp_path), "--device", "bogus")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown --device 'bogus' (choose auto, cpu, cuda, cuda:N or mps)"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_model_command_defaults_to_auto_and_passes_the_device_to_the_loader(name, files, tmp_path, capsys, cli_env,
                                                                                   fake_cuda, stop_at_build):
    """No --device: auto, which is CUDA here (faked); the loader is asked for it."""
    r = run_cli(capsys, *command_args(name, files, tmp_path))
    assert r.returncode == 2 and "stopped before building on cuda" in r.stderr, r.stderr
    assert [d.type for d, _ in stop_at_build] == ["cuda"]
    r = run_cli(capsys, *command_args(name, files, tmp_path), "--device", "cuda:1")
    assert "stopped before building on cuda:1" in r.stderr, r.stderr
    # merge and convert read the base in fp32 (the sum is cast later); the rest follow --dtype/--quant
    auto_quant = name in ("generate", "chat", "serve")
    assert stop_at_build[-1] == (torch.device("cuda", 1), {torch.bfloat16 if auto_quant else torch.float32})


def test_missing_cuda_is_a_one_line_error(files, tmp_path, capsys, cli_env, monkeypatch):
    _no_gpu(monkeypatch)
    r = run_cli(capsys, *command_args("generate", files, tmp_path), "--device", "cuda")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --device cuda: CUDA is not available")


def test_load_defaults_to_auto_and_quant_auto_means_bf16_on_cuda(files, fake_cuda, stop_at_build):
    import lmforge

    with pytest.raises(LmforgeError, match="stopped before building on cuda"):
        lmforge.load(str(files / "base"))
    with pytest.raises(LmforgeError):
        lmforge.load(str(files / "base"), quant="auto")
    with pytest.raises(LmforgeError):
        lmforge.load(str(files / "base"), quant="auto", device="cpu")
    assert stop_at_build == [(torch.device("cuda"), {torch.float32}), (torch.device("cuda"), {torch.bfloat16}),
                             (torch.device("cpu"), {torch.float32})]


@pytest.mark.skipif(not _fbgemm_available(), reason="this torch build has no fbgemm int8 kernels")
def test_banner_on_cpu_is_unchanged(files, monkeypatch):
    import lmforge
    from lmforge.cli.commands import chat
    from lmforge.cli.common import runtime_summary
    from lmforge.config import parse_args

    _no_gpu(monkeypatch)
    args = parse_args(chat.Config, ["--device", "auto"])
    lm = lmforge.load(str(files / "base"), dtype=args.dtype, device=args.device, quant=args.quant)
    assert runtime_summary(lm, args) == "int8 weights (--quant auto), fp32, cpu, draft auto"


def test_merge_and_convert_write_cpu_files_equal_to_the_cpu_run(files, tmp_path, capsys):
    from safetensors.torch import load_file

    for name, folder in (("merge", "merged"), ("convert", "hf")):
        a, b = tmp_path / "a", tmp_path / "b"
        assert run_cli(capsys, *command_args(name, files, a), "--device", "cpu").returncode == 0
        assert run_cli(capsys, *command_args(name, files, b)).returncode == 0  # auto
        wa, wb = load_file(str(a / folder / "model.safetensors")), load_file(str(b / folder / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(wa[k].dtype == wb[k].dtype for k in wa)
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
        assert (a / folder / "config.json").read_text() == (b / folder / "config.json").read_text()
    merged = load_file(str(tmp_path / "a" / "merged" / "model.safetensors"))
    base = load_file(str(files / "base" / "model.safetensors"))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_draft_auto_means_plain_graph_decoding_on_cuda(tiny_model):
    """--draft auto drafts on a CPU (a verification pass costs about two steps there) but not on
    CUDA, where a CUDA-graph step is far cheaper than an eager verification pass."""
    import copy

    from lmforge.engine import SamplingParams
    from lmforge.fast.decode import fast_decoder_for
    from lmforge.fast.speculative import NgramDrafter, resolve_draft

    greedy = SamplingParams(temperature=0.0)
    cpu = fast_decoder_for(tiny_model)
    assert isinstance(resolve_draft("auto", greedy, cpu), NgramDrafter)
    gpu = copy.copy(cpu)
    gpu.device = torch.device("cuda")
    assert resolve_draft("auto", greedy, gpu) is None
    assert resolve_draft("ngram", greedy, gpu) == "ngram"  # asked for by name: still honoured
