"""Preference data (validated with the SFT rules, file:line errors), reply masks, checkable tasks."""
from __future__ import annotations

import json

import pytest

from lmforge.align.preference import collate_pairs, load_pairs, record_to_pair, render_reply, tokenize_pairs
from lmforge.align.tasks import arithmetic_preferences, arithmetic_problems, extract_answer, is_correct
from lmforge.errors import LmforgeError
from lmforge.finetune.datasets import RecordError


def test_arithmetic_split_is_disjoint_and_answers_are_right():
    train = arithmetic_problems(500, seed=0, split="train")
    held = arithmetic_problems(200, seed=5, split="heldout")
    key = lambda p: (p["a"], p["b"], p["op"])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    assert all(int(p["answer"]) == p["a"] + p["b"] and 10 <= p["a"] <= 99 for p in train)
    for p in arithmetic_preferences(50, seed=1):
        assert p["chosen"] != p["rejected"]
        assert extract_answer(p["chosen"]) != extract_answer(p["rejected"])
    assert extract_answer("so 12 + 30 = 42.") == "42" and extract_answer("1,234") == "1234"
    assert extract_answer("no digits") is None and is_correct("The answer is 7.", "7")


def test_record_forms_and_errors():
    p = record_to_pair({"prompt": "hi", "chosen": "hello", "rejected": "go away"})
    assert p.prompt == [{"role": "user", "content": "hi"}] and p.chosen[0]["content"] == "hello"
    p = record_to_pair({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                        "chosen": [{"role": "assistant", "content": "a"}], "rejected": {"role": "assistant", "content": "b"}})
    assert len(p.prompt) == 2 and p.rejected[0]["content"] == "b"
    bad = [
        ({"prompt": "x", "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": "x", "messages": [], "chosen": "a", "rejected": "b"}, "exactly one of"),
        ({"prompt": "x", "chosen": "a", "rejected": "a"}, "are the same"),
        ({"prompt": "x", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "score": 1}, "unknown key 'score'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
         "must not end with the assistant"),
        ({"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "role 'robot'"),
        ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "start with an assistant"),
    ]
    for rec, msg in bad:
        with pytest.raises(RecordError, match=msg):
            record_to_pair(rec)


def test_load_pairs_reports_file_and_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    f.write_text(good + "\n\n{oops\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(LmforgeError, match=r"pairs.jsonl:3: invalid JSON"):
        load_pairs(f)
    pairs, rep = load_pairs(f, on_error="skip")
    assert len(pairs) == 1 and rep.total == 3 and len(rep.skipped) == 2
    assert rep.skipped[1].endswith("pairs.jsonl:4: missing 'rejected'")


def test_reply_mask_covers_the_reply_only(default_model_path):
    from lmforge.loading import load_tokenizer

    tok = load_tokenizer(default_model_path)
    prompt = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four?"},
              {"role": "user", "content": "Sure?"}]
    ids, mask = render_reply(tok, prompt, [{"role": "assistant", "content": "Yes, 4."}])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Yes, 4.<|im_end|>"  # not the earlier assistant turn
    with pytest.raises(LmforgeError, match="no reply token"):
        tokenize_pairs(tok, [record_to_pair({"prompt": "q" * 50, "chosen": "a", "rejected": "bb"}, "f:1")], max_len=8)
    rows, _ = tokenize_pairs(tok, [record_to_pair(r, "x") for r in arithmetic_preferences(3)], 128)
    b = collate_pairs(rows, tok.pad_id)
    assert b["input_ids"].shape[0] == 6 and int(b["reply_mask"].sum()) == sum(sum(r[s][1]) for r in rows for s in ("chosen", "rejected"))


def test_recipes_parse_strictly():
    from pathlib import Path

    from lmforge.align.dpo import DPOConfig
    from lmforge.align.grpo import RLConfig
    from lmforge.align.reward_model import RMConfig
    from lmforge.config import from_dict, load_yaml

    root = Path(__file__).resolve().parents[1] / "recipes"
    kinds = {"rm": RMConfig, "dpo": DPOConfig, "rl": RLConfig}
    n = 0
    for kind, cls in kinds.items():
        for f in sorted((root / kind).glob("*.yaml")):
            from_dict(cls, load_yaml(f))
            n += 1
    assert n >= 6
