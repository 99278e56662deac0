"""The tool-use teaching data: correct results, identical prompts to inference, loss on the calls."""
from __future__ import annotations

import json
import re

from lmforge.tools.teach import (
    answer_is_correct,
    arithmetic_problems,
    calculator_record,
    calculator_schemas,
    integers_in,
    problem_key,
    write_jsonl,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_problems_are_varied_seeded_and_in_range():
    ps = arithmetic_problems(300, seed=1)
    assert ps == arithmetic_problems(300, seed=1)
    for p in ps:
        assert 100 <= p.a <= 99999 and 100 <= p.b <= 99999
        assert str(p.a) in p.question and str(p.b) in p.question
    assert {p.op for p in ps} == {"+", "-", "*"}
    assert {len(str(p.a)) for p in ps} == {3, 4, 5}
    assert len({re.sub(r"\d+", "N", p.question) for p in ps}) >= 15  # many phrasings
    other = {problem_key(p) for p in arithmetic_problems(300, seed=2)}
    assert len(other & {problem_key(p) for p in ps}) <= 1  # disjoint seeds, (almost) disjoint problems


def test_records_hold_the_calculators_true_results():
    from lmforge.tools import get_tools
    from lmforge.tools.protocol import execute_tool_call

    tools = get_tools("calculator")
    for p in arithmetic_problems(60, seed=3):
        rec = calculator_record(p)
        user, call_turn, tool, answer = rec["messages"]
        assert user == {"role": "user", "content": p.question}
        call = call_turn["tool_calls"][0]
        assert call["function"]["name"] == "calculator"
        expr = json.loads(call["function"]["arguments"])["expression"]
        # re-run the call as the tool loop would: the same text, and the independent truth
        assert execute_tool_call(call, tools)["content"] == tool["content"] == str(eval(expr, {})) == str(p.result)
        assert tool["tool_call_id"] == call["id"]
        assert answer["role"] == "assistant" and answer_is_correct(answer["content"], p.result)
        assert rec["tools"] == calculator_schemas() == [t.schema() for t in tools]


def test_answer_checking():
    assert integers_in("48213 * 9127 = 440,040,051.") == [48213, 9127, 440040051]
    assert answer_is_correct("The answer is -1234.", -1234)
    assert not answer_is_correct("12345", 1234)  # inside a longer number does not count
    assert not answer_is_correct("", 5)


def test_records_pass_the_sft_loader_and_render_like_inference(default_model_path, tmp_path):
    from lmforge.chat import render_conversation, render_prompt, render_text
    from lmforge.finetune.datasets import load_examples, tokenize_examples
    from lmforge.loading import load_tokenizer

    tok = load_tokenizer(default_model_path)
    ps = arithmetic_problems(6, seed=4)
    path = write_jsonl([calculator_record(p) for p in ps], tmp_path / "train.jsonl")
    examples, report = load_examples(path)
    assert report.total == 6 and not report.skipped
    rows, report = tokenize_examples(tok, examples, max_len=400)
    assert len(rows) == 6 and not report.truncated

    p, ex, (ids, mask) = ps[0], examples[0], rows[0]
    text = render_text(tok, ex.messages, tools=ex.tools)
    # what chat_with_tools feeds the model before its first turn is a prefix of the training text
    prompt = tok.decode(render_prompt(tok, ex.messages[:1], tools=calculator_schemas()))
    assert text.startswith(prompt)
    assert "<tools>" in prompt and '"name": "calculator"' in prompt
    # ... and before its answer, after the tool result
    prompt2 = tok.decode(render_prompt(tok, ex.messages[:3], tools=calculator_schemas()))
    assert text.startswith(prompt2) and prompt2.rstrip().endswith("assistant")
    assert (ids, mask) == render_conversation(tok, ex.messages, tools=ex.tools)

    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    call_text = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{p.expression}"}}}}</tool_call>'
    assert call_text in trained  # the call the model must learn to write is a trained target
    assert ex.messages[3]["content"] in trained  # so is the final answer
    assert p.question not in trained and "<tool_response>" not in trained  # user text and results are not
    assert "<tools>" not in trained


def test_tiny_model_sft_step_on_tool_conversations(default_model_path, tmp_path):
    """The recipe runs end to end on a tiny model: records -> lmforge sft -> adapter -> tool loop."""
    import torch

    from conftest import tiny_config
    from lmforge.cli.main import main
    from lmforge.loading import load_tokenizer, save_hf
    from lmforge.model import Transformer

    tok = load_tokenizer(default_model_path)
    tiny = tmp_path / "tiny"
    torch.manual_seed(0)
    save_hf(Transformer(tiny_config(vocab_size=49152, tie_embeddings=True, max_seq_len=512)).init_weights(seed=0), tok, tiny)
    data = write_jsonl([calculator_record(p) for p in arithmetic_problems(4, seed=5)], tmp_path / "train.jsonl")
    out = tmp_path / "run"
    argv = ["sft", "--config", str(ROOT / "recipes" / "sft" / "tool_use.yaml"), "--model", str(tiny), "--data", str(data),
            "--out", str(out), "--dtype", "fp32", "--train.dtype", "fp32", "--batch-size", "2", "--train.max-steps", "3", "--train.lr", "1e-2",
            "--train.time-limit-s", "0", "--train.log-every", "1", "--threads", "0"]
    assert main(argv) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses)
    assert losses[-1] < losses[0]
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "adapter_model.safetensors").exists()

    import lmforge

    lm = lmforge.load(str(out))
    new = lm.chat_with_tools([{"role": "user", "content": "What is 123 * 456?"}], "calculator", max_steps=1, max_new_tokens=4)
    assert new and new[-1]["role"] in ("assistant", "tool")
