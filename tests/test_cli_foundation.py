"""The CLI end to end on the default model: chat, generate, info, convert; one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

LMFORGE = [sys.executable, "-m", "lmforge.cli.main"]


def lmforge(*args, input=None, timeout=300):
    """The CLI as a separate process (what a user runs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*LMFORGE, *args], input=input, capture_output=True, text=True, timeout=timeout, env=env)


lmforge_inproc = run_cli  # the same CLI entry point in this process


def test_python_api_france_answer(default_lm):
    reply = default_lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
    assert "Paris" in reply


def test_chat_cli_streams_and_resets(default_model_path):
    r = lmforge("chat", "--model", str(default_model_path), "--dtype", "fp32", "--quant", "none", "--max-new-tokens", "20",
                input="What is the capital of France?\n/reset\n/system Answer in one word.\nWhat is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert "Paris" in lines[0] and "Paris" in lines[-1]
    assert "conversation cleared" in r.stderr


def test_chat_history_is_trimmed_with_a_message(default_lm):
    from lmforge.cli.commands.chat import fit_history

    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(40):
        msgs += [{"role": "user", "content": f"Tell me fact number {i} about the sea. " * 5},
                 {"role": "assistant", "content": "The sea is large and deep. " * 8}]
    msgs.append({"role": "user", "content": "Last question?"})
    kept, dropped = fit_history(default_lm, msgs, reserve=default_lm.config.max_seq_len - 600)
    assert dropped > 0 and kept[0]["role"] == "system" and kept[-1]["content"] == "Last question?"
    assert len(default_lm.encode_chat(kept)) <= 600


def test_generate_json_and_jsonl(default_lm, default_model_path, tmp_path, capsys):
    r = lmforge_inproc(capsys, "generate", "--model", str(default_model_path), "--prompt", "What is the capital of France?", "--json",
                       "--dtype", "fp32", "--quant", "none")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"] and out["finish_reason"] == "stop"
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "What is the capital of Italy?"}]}) + "\n")
    r = lmforge_inproc(capsys, "generate", "--model", str(default_model_path), "--data", str(data), "--out", str(tmp_path / "out.jsonl"),
                "--max-new-tokens", "16", "--dtype", "fp32", "--quant", "none")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "Paris" in rows[0]["completion"]
    # batched rows give what each prompt gives alone
    alone = default_lm.chat([{"role": "user", "content": "What is the capital of Italy?"}], max_new_tokens=16)
    assert rows[1]["completion"] == alone


def test_info(default_model_path, capsys):
    r = lmforge_inproc(capsys, "info", "--model", str(default_model_path), "--json")
    info = json.loads(r.stdout)
    assert info["parameters"] == 134_515_008 and info["config"]["n_layers"] == 30


def test_convert_gguf_to_hf_loads_in_transformers_with_equal_logits(default_lm, default_model_path, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    r = lmforge_inproc(capsys, "convert", "--model", str(default_model_path), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([default_lm.tokenizer.encode("Round trips keep every weight. " * 4)])
    with torch.no_grad():
        assert (ref(ids).logits - default_lm.model(ids)).abs().max().item() <= 1e-4
    from lmforge.api import load

    again = load(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(again.model(ids), default_lm.model(ids))
    assert again.tokenizer.encode("héllo wörld 123") == default_lm.tokenizer.encode("héllo wörld 123")


def _one_line_error(r, needle):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_inputs_give_one_line_errors(tmp_path, default_model_path, capsys):
    def lmforge(*args):
        return lmforge_inproc(capsys, *args)

    _one_line_error(lmforge("info", "--model", str(tmp_path / "missing.gguf")), "not found")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely not gguf")
    _one_line_error(lmforge("info", "--model", str(fake)), "not a GGUF file")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(default_model_path.read_bytes()[: 5_000_000])
    _one_line_error(lmforge("info", "--model", str(truncated)), "truncated")
    hf = tmp_path / "falcon"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    _one_line_error(lmforge("info", "--model", str(hf)), "unsupported architecture 'falcon'")
    _one_line_error(lmforge("generate", "--model", str(default_model_path), "--quant", "none", "--raw", "--prompt", "word " * 9000), "longer than the model's context")
    _one_line_error(lmforge("generate", "--tempreature", "1"), "unknown option '--tempreature'")
    _one_line_error(lmforge("frobnicate"), "unknown command")


def test_errors_from_a_real_process_are_one_line(tmp_path):
    _one_line_error(lmforge("info", "--model", str(tmp_path / "missing.gguf")), "not found")


def test_loading_shows_a_progress_line_on_a_terminal(tmp_path, capsys, monkeypatch):
    """A person at a terminal sees what is loading and when it is ready; a script reading stderr
    sees nothing but errors."""
    import sys

    from _align_tiny import tiny_lm_dir

    d = tiny_lm_dir(tmp_path / "m")
    args = ("generate", "--model", str(d), "--raw", "--prompt", "Hi", "--max-new-tokens", "2", "--quant", "none")
    quiet = lmforge_inproc(capsys, *args)
    assert quiet.returncode == 0 and "loading" not in quiet.stderr
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    loud = lmforge_inproc(capsys, *args)
    assert loud.returncode == 0
    assert f"loading {d} ... ready in" in loud.stderr and "unquantized weights" in loud.stderr
