"""Constitutional loop: principles files (shipped en/ru, strict format), the fixed rule judge, and
`lmforge constitution` producing data that `sft` and `dpo` accept as is."""
from __future__ import annotations

import json

import pytest

from _align_tiny import tiny_lm_dir
from lmforge.align.constitution import judge_prefers, load_principles, rule_checks
from lmforge.errors import LmforgeError


def test_shipped_principles_load():
    for lang in ("en", "ru"):
        p = load_principles(lang)
        assert p.language == lang and len(p.principles) >= 4 and "{answer}" in p.critique_template
    assert any("русск" in x.revision for x in load_principles("ru").principles)


def test_principles_format_errors(tmp_path):
    f = tmp_path / "p.yaml"
    cases = [
        ("principles: []", "non-empty list"),
        ("principles:\n  - id: a\n    critique: c\n", "needs a non-empty 'revision'"),
        ("principles:\n  - {id: a, critique: c, revision: r, weight: 2}", "unknown key 'weight'"),
        ("principles:\n  - {id: a, critique: c, revision: r}\n  - {id: a, critique: c, revision: r}", "used twice"),
        ("principles:\n  - {id: a, critique: c, revision: r, checks: [vibes]}", "unknown check 'vibes'"),
        ("critique_template: 'no placeholders'\nprinciples:\n  - {id: a, critique: c, revision: r}", "lacks the placeholder"),
        ("extra: 1\nprinciples:\n  - {id: a, critique: c, revision: r}", "unknown key 'extra'"),
    ]
    for text, msg in cases:
        f.write_text(text)
        with pytest.raises(LmforgeError, match=msg):
            load_principles(f)
    with pytest.raises(LmforgeError, match="not found"):
        load_principles("klingon")


def test_rule_judge():
    q = "What is the capital of France?"
    assert judge_prefers(q, "The capital of France is Paris.", "Paris paris paris paris paris paris paris paris") == 1.0
    assert judge_prefers(q, "Столица Франции — Париж.", "The capital of France is Paris.") == 0.0  # wrong language
    assert judge_prefers("Какая столица Франции?", "Столица Франции — Париж.", "Paris.") == 1.0
    assert judge_prefers(q, "Paris.", "Paris.") == 0.5
    assert not rule_checks(q, "Revised answer: Paris.")["no_meta"]


def test_constitution_loop_on_a_real_model_runs(tmp_path, default_model_path):
    """The batched engine calls of the loop, with a (random) tiny model's own text."""
    from lmforge.align.constitution import constitution_loop
    from lmforge.engine import SamplingParams
    from lmforge.loading import load_model

    model, tok = load_model(tiny_lm_dir(tmp_path / "tiny"))
    res = constitution_loop(model, tok, ["Name a colour.", "Назови число."], load_principles("en"),
                            SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    assert res["stats"]["prompts"] == 2 and len(res["trace"]) == 2


def test_constitution_command_feeds_sft_and_dpo(tmp_path, default_model_path, monkeypatch):
    """The loop's bookkeeping and files, with scripted model text so every stage has content."""
    from lmforge.align.preference import load_pairs
    from lmforge.cli.main import main
    from lmforge.finetune.datasets import load_examples

    model = tiny_lm_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a colour.", "Назови число.", "Say hello."]))
    seen = []

    def scripted(model, tok, conversations, params, batch_size):
        seen.append(len(conversations))
        out = []
        for c in conversations:
            text = c[-1]["content"]
            out.append("Revised answer: Blue is a colour." if "Critique:" in text else
                       "It is too short." if "Answer:" in text else "blue")
        return out

    monkeypatch.setattr("lmforge.align.constitution._generate", scripted)
    out = tmp_path / "const"
    assert main(["constitution", "--model", str(model), "--principles", "en", "--data", str(prompts), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "3"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    trace = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    assert stats["prompts"] == 3 and len(trace) == 3 and {"answer", "critique", "revision", "principle"} <= set(trace[0])
    assert seen == [3, 3, 3]  # answers, critiques, revisions: one batched call each
    assert stats["revised"] == 3 and stats["pairs"] == 3
    assert trace[0]["revision"] == "Blue is a colour."  # the "Revised answer:" label is stripped
    assert stats["judge_prefers_revision"] > 0.5  # a finished sentence beats "blue" (and "Назови число." wants Russian)
    examples, _ = load_examples(out / "sft.jsonl")
    pairs, _ = load_pairs(out / "pairs.jsonl")
    assert len(examples) == 3 and len(pairs) == 3 and pairs[0].chosen[0]["content"] == "Blue is a colour."
    monkeypatch.undo()
    assert main(["dpo", "--model", str(model), "--data", str(out / "pairs.jsonl"), "--out", str(tmp_path / "dpo"),
                 "--train.max-steps", "1", "--val-fraction", "0", "--batch-size", "2"]) == 0
    assert main(["sft", "--model", str(model), "--data", str(out / "sft.jsonl"), "--out", str(tmp_path / "sft"),
                 "--train.max-steps", "1", "--batch-size", "2"]) == 0
