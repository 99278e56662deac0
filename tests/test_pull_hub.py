"""`lmforge pull owner/name` without the network: a model already in the local Hugging Face cache
(laid out as huggingface_hub keeps it: refs, snapshots, links into blobs) is found, at any
revision, and a download over HTTP (a local server standing in for the Hub) sends the token,
resumes a broken shard and shows its progress."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

MODEL_ID = "org/tiny-llama"


def save_repo(folder: Path, seed: int) -> torch.Tensor:
    """A tiny Llama in `folder` as the Hub serves it: sharded safetensors with their index, the
    config and a tokenizer. Returns its logits on a fixed prompt."""
    from test_eval_scoring import byte_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(folder, max_shard_size="150KB")
    byte_tokenizer().save(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    with torch.no_grad():
        return ref(torch.tensor([[5, 9, 77, 200, 31]])).logits


def logits_of(path) -> torch.Tensor:
    import lmforge

    with torch.no_grad():
        return lmforge.load(str(path), device="cpu").model(torch.tensor([[5, 9, 77, 200, 31]]))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No huggingface_hub and no network: a download attempt fails the test."""
    import lmforge.hub as hub

    def no_network(*a, **k):
        raise AssertionError("tried the network")

    monkeypatch.setattr(hub, "hub_downloader", lambda: None)
    monkeypatch.setattr(hub, "download", no_network)
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))


def hub_cache_repo(cache: Path, model_id: str, revisions: dict[str, Path]) -> None:
    """huggingface_hub's layout: blobs named by content hash, snapshots/<commit>/ of links to
    them, refs/<revision> holding the commit."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    for rev, src in revisions.items():
        commit = hashlib.sha1(rev.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def test_pull_finds_the_model_and_its_revisions_in_the_local_hub_cache(tmp_path, monkeypatch, offline):
    from lmforge.pull import pull

    main, v1 = tmp_path / "src-main", tmp_path / "src-v1"
    want_main, want_v1 = save_repo(main, 0), save_repo(v1, 1)
    hub_cache_repo(tmp_path / "hf", MODEL_ID, {"main": main, "v1": v1})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))

    got = pull(MODEL_ID)
    assert (got / "model.safetensors.index.json").exists() and (got / "tokenizer.json").exists()
    assert (logits_of(got) - want_main).abs().max().item() <= 1e-4
    assert (logits_of(pull(MODEL_ID, revision="v1")) - want_v1).abs().max().item() <= 1e-4
    # and a model id the lmforge cache lacks runs straight from the Hub cache
    shutil.rmtree(got)
    assert (logits_of(MODEL_ID) - want_main).abs().max().item() <= 1e-4


class _Hub(http.server.BaseHTTPRequestHandler):
    """/<owner>/<name>/resolve/<revision>/<file> from a folder, for the right token only; byte
    ranges as the Hub serves them."""

    root: Path
    seen: list

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Range")))
        if self.headers.get("Authorization") != "Bearer secret":
            return self.send_error(401)
        owner, name, _, rev, file = self.path.strip("/").split("/", 4)
        src = self.root / rev / file
        if not src.is_file():
            return self.send_error(404)
        data = src.read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(data) and start:
            return self.send_error(416)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *a):
        pass


@pytest.fixture
def server(tmp_path):
    handler = type("Hub", (_Hub,), {"root": tmp_path / "served", "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_pull_over_http_sends_the_token_resumes_a_shard_and_shows_progress(tmp_path, monkeypatch, server, capsys):
    import lmforge.hub as hub
    from lmforge.errors import LmforgeError
    from lmforge.pull import hf_cache_dir, pull

    handler, url = server
    want = save_repo(tmp_path / "served" / "main", 2)
    monkeypatch.setattr(hub, "hub_downloader", lambda: None)  # plain HTTPS
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(LmforgeError, match="HF_TOKEN"):
        pull(MODEL_ID)

    monkeypatch.setenv("HF_TOKEN", "secret")
    shard = sorted((tmp_path / "served" / "main").glob("model-*.safetensors"))[0]
    dest = hf_cache_dir(MODEL_ID)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / (shard.name + ".part")).write_bytes(shard.read_bytes()[:1000])  # a download that broke off
    got = pull(MODEL_ID)
    assert (got / shard.name).read_bytes() == shard.read_bytes() and not (got / (shard.name + ".part")).exists()
    assert (f"/{MODEL_ID}/resolve/main/{shard.name}", "bytes=1000-") in handler.seen
    assert shard.name in capsys.readouterr().err  # its progress bar
    assert (logits_of(got) - want).abs().max().item() <= 1e-4
    assert hub.complete(got)
