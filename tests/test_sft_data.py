"""SFT data: record checks with file:line, skip/fail, formats, and which tokens the loss covers."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.datasets import (
    DataReport, RecordError, check_messages, load_examples, record_to_example, tokenize_examples,
)
from lmforge.finetune.sft import IGNORE, SFTBatches, collate, collate_packed, example_targets

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, of course."},
    {"role": "user", "content": "And one more."},
    {"role": "assistant", "content": "Red."},
]


@pytest.fixture(scope="module")
def tok(default_model_path):
    from lmforge.loading import load_tokenizer

    return load_tokenizer(default_model_path)


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_malformed_lines_fail_with_file_and_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", [GOOD, "{not json", GOOD])
    with pytest.raises(LmforgeError, match=r"d\.jsonl:2: invalid JSON"):
        load_examples(f)


def test_skip_reports_every_bad_line(tmp_path):
    bad_role = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    no_assistant = {"messages": [{"role": "user", "content": "x"}]}
    unknown = {"prompt": "x", "completion": "y"}
    f = _write(tmp_path / "d.jsonl", [GOOD, "{not json", bad_role, "", no_assistant, unknown, GOOD])
    examples, report = load_examples(f, on_error="skip")
    assert len(examples) == 2 and report.total == 6  # the blank line is not a record
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in report.skipped] == ["2", "3", "5", "6"]
    assert "role 'bot'" in report.skipped[1]
    assert "no assistant message" in report.skipped[2]
    assert "unknown record format" in report.skipped[3]
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["1", "7"]


def test_instruction_format(tmp_path):
    f = _write(tmp_path / "i.jsonl", [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "output": "hi", "system": "Be brief."},
        {"instruction": "x"},  # no output
    ])
    examples, report = load_examples(f, on_error="skip")
    assert examples[0].messages == [{"role": "user", "content": "Translate to French\n\ncat"},
                                    {"role": "assistant", "content": "chat"}]
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert len(report.skipped) == 1 and "i.jsonl:3" in report.skipped[0]


def test_message_rules():
    with pytest.raises(RecordError, match="unknown key 'foo'"):
        check_messages([{"role": "user", "content": "a", "foo": 1}, {"role": "assistant", "content": "b"}])
    with pytest.raises(RecordError, match="system message may only come first"):
        check_messages([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(RecordError, match="tool result without"):
        check_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(RecordError, match="arguments are not valid JSON"):
        check_messages([{"role": "user", "content": "a"},
                        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])
    ok = check_messages([
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "calc", "arguments": "{\"e\": \"2+2\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "assistant", "content": "4"},
    ])
    assert ok[0]["content"] == "2+2?" and ok[2]["role"] == "tool"
    with pytest.raises(RecordError, match="last message must be the assistant's"):
        check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}], final_assistant=True)
    with pytest.raises(RecordError):
        record_to_example({"messages": GOOD["messages"], "extra": 1})


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([GOOD, {"messages": [{"role": "user", "content": "q"}]}])
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(LmforgeError, match=r"row 1: no assistant message"):
        load_examples(tmp_path / "ds")
    examples, report = load_examples(tmp_path / "ds", on_error="skip")
    assert len(examples) == 1 and examples[0].messages == GOOD["messages"]
    assert "row 1" in report.skipped[0]


def test_three_turn_conversation_trains_every_assistant_turn(tok, tmp_path):
    """The loss covers exactly the three assistant replies (and their end-of-turn), nothing else."""
    examples, _ = load_examples_from_list([{"messages": THREE_TURNS}], tmp_path)
    rows, _ = tokenize_examples(tok, examples, max_len=512)
    ids, mask = rows[0]
    trained = [i for i, m in zip(ids, mask) if m]
    expected = []
    for reply in ("Blue.", "Green, of course.", "Red."):
        expected += tok.encode(reply) + [tok.token_to_id("<|im_end|>")]
    assert trained == expected
    # the targets the loss sees: every assistant token, predicted from the position before it
    batch = collate(rows, tok.pad_id)
    tgt = batch["targets"][0]
    assert [int(t) for t in tgt if t != IGNORE] == expected
    spans = "".join("1" if m else "0" for m in mask)
    assert spans.count("01") == 3  # three separate trained spans


def load_examples_from_list(records, tmp_path):
    return load_examples(_write(tmp_path / "x.jsonl", records))


def test_truncation_is_reported_and_empty_targets_skipped(tok, tmp_path):
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    long_reply = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    examples, report = load_examples_from_list([long_user, long_reply, GOOD], tmp_path)
    with pytest.raises(LmforgeError, match="no assistant token within the first 64 tokens"):
        tokenize_examples(tok, examples, max_len=64, report=DataReport(total=3))
    rows, report = tokenize_examples(tok, examples, max_len=64, on_error="skip", report=DataReport(total=3))
    assert len(rows) == 2 and report.kept == 2
    assert len(report.truncated) == 2 and len(report.skipped) == 1
    assert all(len(ids) <= 64 for ids, _ in rows)


def test_packing_keeps_examples_whole_and_masks_across(tok):
    rows = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1]), ([8, 9, 10, 11, 12], [0, 0, 0, 1, 1])]
    b = collate_packed([[rows[0], rows[1]], [rows[2]]], pad_id=0, seq_len=8)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 10, 11, 12, 0, 0, 0]]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    # the last token of example 1 predicts nothing (the next token belongs to example 2)
    assert b["targets"][0].tolist() == [IGNORE, 3, 4, IGNORE, 6, 7, IGNORE, IGNORE]
    m = b["attention_mask"][0]
    assert m[5].tolist() == [False, False, False, False, True, True, False, False]
    assert m[3].tolist() == [True, True, True, True, False, False, False, False]
    assert example_targets([1, 2, 3], [0, 1, 0]) == [2, IGNORE, IGNORE]
    src = SFTBatches(rows, batch_size=2, seq_len=8, pad_id=0, pack=True, shuffle=False)
    first = src.next_batch()
    assert first["input_ids"][0].tolist()[:7] == [1, 2, 3, 4, 5, 6, 7]
    state = src.state_dict()
    nxt = src.next_batch()
    src.load_state_dict(state)
    assert torch.equal(src.next_batch()["input_ids"], nxt["input_ids"])


def test_tool_call_turns_are_trained_and_tool_results_are_not(tok, tmp_path):
    pytest.importorskip("lmforge.tools.protocol")
    conv = [
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"expr\": \"6*7\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    examples, _ = load_examples_from_list([{"messages": conv}], tmp_path)
    (ids, mask), = tokenize_examples(tok, examples, max_len=512)[0]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "calc" in trained and "It is 42." in trained
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "42" in untrained and "6 times 7" in untrained  # the tool result and the question


def test_preference_data_shares_the_sft_reader_and_its_messages(tmp_path):
    """One implementation reads and checks both kinds of data: same file:line, same skip report."""
    from lmforge.align.preference import load_pairs

    bad_tools = {"tools": "calc"}
    sft = _write(tmp_path / "sft.jsonl", [GOOD, "{not json", {**GOOD, **bad_tools}])
    pref = _write(tmp_path / "pref.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{not json",
                                            {"prompt": "q", "chosen": "a", "rejected": "b", **bad_tools}])
    _, rs = load_examples(sft, on_error="skip")
    _, rp = load_pairs(pref, on_error="skip")
    assert [s.split(".jsonl", 1)[1] for s in rs.skipped] == [s.split(".jsonl", 1)[1] for s in rp.skipped]
    assert rs.skipped[1].endswith("sft.jsonl:3: 'tools' must be a list of objects")
    with pytest.raises(LmforgeError, match=r"bad training record .*sft.jsonl:2: invalid JSON"):
        load_examples(sft)
    with pytest.raises(LmforgeError, match=r"bad preference record .*pref.jsonl:2: invalid JSON"):
        load_pairs(pref)
    for load in (load_examples, load_pairs):
        with pytest.raises(LmforgeError, match="on_error must be one of fail, skip"):
            load(sft, on_error="ignore")


def test_sft_recipes_parse_strictly_and_say_the_base_dtype():
    from pathlib import Path

    from lmforge.config import from_dict, load_yaml
    from lmforge.finetune.sft import SFTConfig

    root = Path(__file__).resolve().parents[1] / "recipes" / "sft"
    cfgs = {f.stem: from_dict(SFTConfig, load_yaml(f)) for f in sorted(root.glob("*.yaml"))}
    assert {"full", "lora", "qlora"} <= set(cfgs)
    assert cfgs["lora"].dtype == "auto" and cfgs["full"].dtype == "fp32" and cfgs["qlora"].dtype == "fp32"
