"""Every stage runs on every family of the zoo (issue 18): a tiny random checkpoint of each,
saved as an HF folder with a byte-level tokenizer, goes through `lmforge sft` (LoRA), `merge`,
`dpo`, `rl` (GRPO), `eval`, `inspect`, `generate`, QLoRA and the server, each as a user runs it. The merged model
gives the adapter's logits, and every stage writes what it promises."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_eval_scoring import byte_tokenizer  # noqa: E402
from test_zoo_families import FAMILIES, _ours_from  # noqa: E402
from test_zoo_gguf import widened  # noqa: E402

VOCAB = 264  # the byte tokenizer's 257 tokens, rounded up


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lmforge.align.tasks import arithmetic_preferences

    root = tmp_path_factory.mktemp("stage-data")
    chats = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."}, {"role": "assistant", "content": str(a + b)}]}
             for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_preferences(8, seed=0)))
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    return root


def checkpoint(family: str, root):
    from lmforge.loading import save_hf

    return save_hf(_ours_from(widened(FAMILIES[family](), VOCAB)), byte_tokenizer(), root / family)


def lmforge_cli(*args) -> None:
    from lmforge.cli.main import main

    assert main([str(a) for a in args]) == 0, args


def quick(*extra):
    return ["--batch-size", "2", "--lora.r", "4", "--train.warmup-steps", "0", *extra]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_on_the_family(family, data, tmp_path, capsys):
    import lmforge

    base = checkpoint(family, tmp_path)
    sft, merged = tmp_path / "sft", tmp_path / "merged"
    lmforge_cli("sft", "--model", base, "--data", data / "chat.jsonl", "--out", sft, *quick("--train.max-steps", "2"))
    assert (sft / (sft / "latest").read_text().strip() / "adapter_model.safetensors").exists()
    lmforge_cli("merge", "--model", sft, "--out", merged)
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        adapted = lmforge.load(str(sft), device="cpu").model(ids)
        assert (lmforge.load(str(merged), device="cpu").model(ids) - adapted).abs().max().item() <= 1e-4
        assert (lmforge.load(str(base), device="cpu").model(ids) - adapted).abs().max().item() > 0  # it trained
    lmforge_cli("dpo", "--model", base, "--data", data / "pairs.jsonl", "--out", tmp_path / "dpo", *quick("--train.max-steps", "1"))
    lmforge_cli("rl", "--model", base, "--task.name", "arithmetic", "--task.n", "16", "--task.n-eval", "2", "--out", tmp_path / "rl",
                "--grpo.group-size", "2", "--grpo.prompts-per-step", "1", "--grpo.max-new-tokens", "3", "--lora.r", "4",
                "--train.max-steps", "1", "--train.eval-every", "0")
    for stage in ("dpo", "rl"):
        losses = [r["loss"] for r in map(json.loads, (tmp_path / stage / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert losses and all(map(lambda x: x == x, losses)), stage  # ran, finite
    lmforge_cli("eval", "--model", base, "--tasks", f"ppl:{data / 'text.txt'}", "--ppl-window", "32", "--progress", "false",
                "--out", tmp_path / "eval")
    lmforge_cli("inspect", "logit-lens", "--model", base, "--prompt", "abc", "--out", tmp_path / "lens")
    lmforge_cli("inspect", "attention", "--model", base, "--prompt", "abc", "--out", tmp_path / "attn")
    lmforge_cli("sft", "--model", base, "--data", data / "chat.jsonl", "--out", tmp_path / "qlora", "--method", "qlora",
                *quick("--train.max-steps", "1"))
    capsys.readouterr()
    lmforge_cli("generate", "--model", base, "--prompt", "abc", "--max-new-tokens", "4", "--temperature", "0", "--json")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    served(base, out)


def served(base, generated: dict) -> None:
    """The server's greedy completion (its batched, cached forward) equals `generate`'s."""
    from fastapi.testclient import TestClient

    import lmforge
    from lmforge.serve import ServeConfig, create_app

    lm = lmforge.load(str(base), device="cpu")
    with TestClient(create_app(lm.model, lm.tokenizer, ServeConfig(slots=2, ctx=64, model_id="m"))) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "abc", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == generated["text"], generated
