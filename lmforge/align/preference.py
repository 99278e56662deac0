"""Preference data: JSONL records of a prompt and two answers, the better one `chosen`.

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "chosen": "...", "rejected": "..."}
    {"prompt": "...", "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}

`prompt` (a user message) or `messages` (the conversation so far, not ending with the
assistant) is shared; `chosen` / `rejected` are the assistant's reply as a string, one message
object, or a list of messages (assistant turns, tool calls and results included). Optional
`tools` as in chat SFT data. Each side is checked with the SFT validator
(`lmforge.finetune.datasets.check_messages`) as a whole conversation, so preference data obeys
exactly the rules chat data does; reading, the `file:line: why` errors, skipping and reporting
(`on_error="skip"`) and truncation are SFT's too (`read_checked`, `clip_row`).

Rendering goes through the one renderer; only the tokens of the reply (after the prompt) count
for the reward model's score position and for DPO's log-probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.finetune.datasets import (DataReport, RecordError, check_messages, check_tools, clip_row,
                                       handle_bad_record, read_checked)

KEYS = {"prompt", "messages", "chosen", "rejected", "tools", "id", "meta"}


@dataclass
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    where: str
    tools: list[dict] | None = None


def _reply(value, side: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"'{side}' is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{side}' must be a string, a message object or a list of messages")
    if not isinstance(value[0], dict) or value[0].get("role") != "assistant":
        raise RecordError(f"'{side}' must start with an assistant message (put the prompt in 'prompt' or 'messages')")
    return value


def record_to_pair(obj, where: str = "") -> PreferencePair:
    """Validate one record (raises RecordError saying what is wrong)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    extra = set(obj) - KEYS
    if extra:
        raise RecordError(f"unknown key '{sorted(extra)[0]}' in a preference record (keys: prompt or messages, chosen, rejected, tools)")
    if ("prompt" in obj) == ("messages" in obj):
        raise RecordError("a preference record needs exactly one of 'prompt' or 'messages'")
    for side in ("chosen", "rejected"):
        if side not in obj:
            raise RecordError(f"missing '{side}'")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise RecordError("'prompt' must be a non-empty string")
        prompt = [{"role": "user", "content": obj["prompt"]}]
    else:
        prompt = check_messages(obj["messages"], require_assistant=False)
        if prompt[-1]["role"] == "assistant":
            raise RecordError("'messages' (the prompt) must not end with the assistant's turn; put replies in chosen/rejected")
    tools = check_tools(obj.get("tools"))
    sides = {}
    for side in ("chosen", "rejected"):
        try:
            full = check_messages(prompt + _reply(obj[side], side), require_assistant=True, final_assistant=True)
        except RecordError as e:
            raise RecordError(f"{side}: {e}") from None
        sides[side] = full[len(prompt):]
    if sides["chosen"] == sides["rejected"]:
        raise RecordError("'chosen' and 'rejected' are the same")
    return PreferencePair(prompt, sides["chosen"], sides["rejected"], where, tools)


WHAT = "preference record"  # in messages: "bad preference record FILE:LINE: why"


def load_pairs(data: str | Path, on_error: str = "fail", split: str = "train",
               report: DataReport | None = None) -> tuple[list[PreferencePair], DataReport]:
    """Read and validate preference records from JSONL/JSON files, a folder, or a datasets folder."""
    return read_checked(data, record_to_pair, on_error, split, report, what=WHAT)


def render_reply(tokenizer, prompt: list[dict], reply: list[dict], tools=None) -> tuple[list[int], list[int]]:
    """(ids, reply_mask): the whole conversation, 1 on the reply's assistant tokens only."""
    from lmforge.chat import render_conversation, render_prompt

    ids, mask = render_conversation(tokenizer, prompt + reply, tools=tools)
    head = render_prompt(tokenizer, prompt, tools=tools)
    if ids[:len(head)] != head:
        raise RecordError("the chat template does not render the prompt as a prefix of the conversation")
    mask = [0] * len(head) + list(mask[len(head):])
    return ids, mask


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], max_len: int, on_error: str = "fail",
                   report: DataReport | None = None) -> tuple[list[dict], DataReport]:
    """[{"chosen": (ids, mask), "rejected": (ids, mask), "where"}]; too long ones are cut and reported."""
    report = report or DataReport(total=len(pairs))
    rows = []
    for p in pairs:
        try:
            row = {"where": p.where}
            for side in ("chosen", "rejected"):
                ids, mask = render_reply(tokenizer, p.prompt, getattr(p, side), p.tools)
                try:
                    row[side] = clip_row(ids, mask, max_len, f"{p.where} ({side})", report, what="reply token")
                except RecordError as e:
                    raise RecordError(f"{side}: {e}") from None
        except (RecordError, LmforgeError) as e:
            handle_bad_record(report, p.where, e, on_error, WHAT)
            continue
        rows.append(row)
    report.kept = len(rows)
    if not rows:
        raise LmforgeError(f"no usable preference pairs ({report.summary()})")
    return rows, report


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """One batch: `input_ids` [2B, T] (the B chosen rows, then the B rejected), right-padded with
    `pad_id`; `reply_mask` [2B, T] (1 on reply tokens); `lengths` [2B]."""
    import torch

    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    T = max(len(ids) for ids, _ in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    msk = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        idx[i, :len(ids)] = torch.tensor(ids)
        msk[i, :len(mask)] = torch.tensor(mask)
    out = {"input_ids": idx, "reply_mask": msk, "lengths": torch.tensor([len(ids) for ids, _ in seqs])}
    if "ref_logps" in rows[0]:
        out["ref_logps"] = torch.tensor([r["ref_logps"][0] for r in rows] + [r["ref_logps"][1] for r in rows], dtype=torch.float64)
    return out
