"""Finetuning data: chat JSONL (OpenAI format), instruction JSONL, and Hugging Face `datasets`.

    examples, report = load_examples("train.jsonl", on_error="skip")
    rows, report = tokenize_examples(tokenizer, examples, max_len=1024, on_error="skip", report=report)

Every record is checked before use; a bad one is reported as `file:line: what is wrong` and either
fails the run (`on_error="fail"`, the default) or is skipped and counted (`"skip"`). Nothing is
dropped silently: the `DataReport` lists every skipped record and every truncated one, and the
SFT command prints it and writes it into the run folder.

Validation and reading are separate from SFT so preference data (DPO, reward models,
`lmforge.align.preference`) shares them: `check_messages` (a preference record is two
conversations checked with the same rules), `check_tools`, `read_records` (file:line per record),
`read_checked` (the read / validate / fail-or-skip loop), `handle_bad_record` and `clip_row`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from lmforge.errors import LmforgeError

ROLES = ("system", "user", "assistant", "tool")
# OpenAI chat fine-tuning keys we understand on a message; anything else is an error, not ignored.
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "weight"}
FORMATS = ("auto", "chat", "instruction")
ON_ERROR = ("fail", "skip")


@dataclass
class Example:
    """One conversation to train on, with where it came from (for error messages)."""

    messages: list[dict]
    where: str
    tools: list[dict] | None = None


@dataclass
class DataReport:
    """What happened to the records: kept, skipped (with reasons), truncated."""

    total: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.kept} of {self.total} records used"
        if self.skipped:
            s += f", {len(self.skipped)} skipped"
        if self.truncated:
            s += f", {len(self.truncated)} truncated"
        return s

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"skipped {w}" for w in self.skipped[:limit]]
        if len(self.skipped) > limit:
            out.append(f"... and {len(self.skipped) - limit} more skipped records")
        out += [f"truncated {w}" for w in self.truncated[:limit]]
        if len(self.truncated) > limit:
            out.append(f"... and {len(self.truncated) - limit} more truncated records")
        return out

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": self.skipped, "truncated": self.truncated}


class RecordError(ValueError):
    """A record that cannot be used; the message says why (the caller adds file:line)."""


# -- validation (reusable) --------------------------------------------------------------------
def _content_text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text only
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise RecordError(f"message {i} content part {j} is not a text part ({{'type': 'text', 'text': ...}})")
            parts.append(p["text"])
        return "".join(parts)
    raise RecordError(f"message {i} content must be a string, got {type(content).__name__}")


IMAGE_PARTS = ("image", "image_url")
_IMAGE_SOURCES = ("path", "data", "image", "url")


def _content_parts(content, i: int, images: list | None) -> list[dict]:
    """A vision model's message content: text parts and image parts (`{"type": "image", "path" |
    "data"}`, OpenAI's `image_url` with a data: URL); a bare `{"type": "image"}` takes the next of
    the record's `images`."""
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            out.append({"type": "text", "text": p["text"]})
        elif kind == "image" and not any(p.get(k) is not None for k in _IMAGE_SOURCES):
            if not images:
                raise RecordError(f"message {i} content part {j} is an image with no 'path' or 'data', and the record's "
                                  "'images' list has none left for it")
            out.append({"type": "image", "path": images.pop(0)})
        elif kind in IMAGE_PARTS:
            out.append(dict(p))
        else:
            raise RecordError(f"message {i} content part {j} is not a text or image part")
    return out


def _check_tool_calls(calls, i: int) -> None:
    if not isinstance(calls, list) or not calls:
        raise RecordError(f"message {i} tool_calls must be a non-empty list")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"message {i} tool_calls[{j}] needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                json.loads(args or "{}")
            except json.JSONDecodeError:
                raise RecordError(f"message {i} tool_calls[{j}] arguments are not valid JSON") from None
        elif not isinstance(args, dict):
            raise RecordError(f"message {i} tool_calls[{j}] arguments must be a JSON string or an object")


def check_messages(messages, require_assistant: bool = True, final_assistant: bool = False,
                   images: list | None = None) -> list[dict]:
    """Validate an OpenAI-style message list; return it normalized (text content; with `images`,
    a list, content with image parts stays parts, for a vision model, and bare image parts take
    its paths in order).

    Rules: non-empty list of objects; known roles and keys; string/text-part content; tool calls
    well formed and only on assistant turns; a tool result follows a tool call; system only first;
    at least one assistant turn with something to learn (`require_assistant`); for preference
    data the last turn must be the assistant's (`final_assistant`).
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list")
    out = []
    pending_calls = 0
    trainable = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"message {i} must be an object")
        extra = set(m) - MESSAGE_KEYS
        if extra:
            raise RecordError(f"message {i} has unknown key '{sorted(extra)[0]}'")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise RecordError(f"message {i}: a system message may only come first")
        content = m.get("content")
        if images is not None and isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS
                                                                    for p in content):
            text = _content_parts(content, i, images)
        else:
            text = _content_text(content, i)
        nm = {"role": role, "content": text}
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise RecordError(f"message {i}: only assistant messages may have tool_calls")
            _check_tool_calls(m["tool_calls"], i)
            nm["tool_calls"] = m["tool_calls"]
            pending_calls = len(m["tool_calls"])
        if role == "tool":
            if pending_calls <= 0:
                raise RecordError(f"message {i}: a tool result without a preceding assistant tool call")
            pending_calls -= 1
            for k in ("tool_call_id", "name"):
                if k in m:
                    nm[k] = m[k]
        elif role != "assistant":
            pending_calls = 0
        if role == "assistant":
            w = m.get("weight", 1)
            if w not in (0, 1):
                raise RecordError(f"message {i}: weight must be 0 or 1")
            if w == 0:
                raise RecordError(f"message {i}: weight 0 (do not train this turn) is not supported; remove the turn")
            if not text and not nm.get("tool_calls"):
                raise RecordError(f"message {i}: empty assistant message")
            trainable += 1
        elif not text and role != "tool":
            raise RecordError(f"message {i}: empty {role} message")
        out.append(nm)
    if require_assistant and trainable == 0:
        raise RecordError("no assistant message to train on")
    if final_assistant and out[-1]["role"] != "assistant":
        raise RecordError("the last message must be the assistant's")
    return out


def check_tools(tools) -> list[dict] | None:
    """The optional `tools` list of a record (function schemas), as chat data carries it."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("'tools' must be a list of objects")
    return tools


def record_to_example(obj, fmt: str = "auto", images: bool = False) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) from one record in chat or instruction format; `images`: for a vision
    model (image parts kept, the record's `images` list filling bare ones, TRL's layout)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    kind = fmt
    if kind == "auto":
        if "messages" in obj:
            kind = "chat"
        elif "instruction" in obj or "output" in obj:
            kind = "instruction"
        else:
            keys = ", ".join(sorted(obj)) or "none"
            raise RecordError(f"unknown record format (keys: {keys}); expected 'messages' or 'instruction'/'output'")
    if kind == "chat":
        extra = set(obj) - {"messages", "tools", "parallel_tool_calls"} - ({"images"} if images else set())
        if extra:
            raise RecordError(f"unknown key '{sorted(extra)[0]}' in a chat record")
        if "messages" not in obj:
            raise RecordError("chat record without 'messages'")
        pics = None
        if images:
            pics = obj.get("images") or []
            if not isinstance(pics, list) or not all(isinstance(x, str) for x in pics):
                raise RecordError("'images' must be a list of image file paths")
            pics = list(pics)
        msgs = check_messages(obj["messages"], images=pics)
        if pics:
            raise RecordError(f"the record's 'images' has {len(pics)} more than its image parts")
        return msgs, check_tools(obj.get("tools"))
    if kind == "instruction":
        extra = set(obj) - {"instruction", "input", "output", "system"}
        if extra:
            raise RecordError(f"unknown key '{sorted(extra)[0]}' in an instruction record")
        for k in ("instruction", "output"):
            if not isinstance(obj.get(k), str) or not obj[k].strip():
                raise RecordError(f"instruction record needs a non-empty string '{k}'")
        for k in ("input", "system"):
            if obj.get(k) is not None and not isinstance(obj[k], str):
                raise RecordError(f"'{k}' must be a string")
        user = obj["instruction"] + (f"\n\n{obj['input']}" if (obj.get("input") or "").strip() else "")
        msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else [])
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
        return msgs, None
    raise LmforgeError(f"unknown data format '{fmt}' (choose {', '.join(FORMATS)})")


# -- reading ----------------------------------------------------------------------------------
def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(list(path.glob("*.jsonl")) + list(path.glob("*.json")))
        if not files:
            raise LmforgeError(f"no .jsonl or .json files in {path}")
        return files
    return [path]


def _is_hf_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def read_records(data: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    """(where, record-or-RecordError) for every record of a JSONL/JSON file, a folder of them,
    a folder written by `datasets.save_to_disk`, or `hf:NAME` (via the `datasets` package)."""
    spec = str(data)
    if spec.startswith("hf:"):
        yield from _read_hf(spec[3:], split, hub=True)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise LmforgeError(f"data not found: {path}")
    if _is_hf_saved_dataset(path):
        yield from _read_hf(str(path), split, hub=False)
        return
    for f in _files(path):
        if f.suffix == ".json":
            try:
                items = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                yield f"{f}:{e.lineno}", RecordError(f"invalid JSON: {e.msg}")
                continue
            if not isinstance(items, list):
                items = [items]
            for i, obj in enumerate(items):
                yield f"{f}[{i}]", obj
            continue
        with open(f, encoding="utf-8", errors="strict") as fh:
            lineno = 0
            while True:
                try:
                    line = fh.readline()
                except UnicodeDecodeError as e:
                    yield f"{f}:{lineno + 1}", RecordError(f"not UTF-8 text ({e.reason})")
                    break
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                try:
                    yield f"{f}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{f}:{lineno}", RecordError(f"invalid JSON: {e.msg} (column {e.colno})")


def _read_hf(name: str, split: str, hub: bool):
    try:
        import datasets
    except ImportError:
        raise LmforgeError("reading Hugging Face datasets needs the 'datasets' package: pip install datasets") from None
    try:
        if hub:
            ds = datasets.load_dataset(name, split=split)
        else:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise LmforgeError(f"dataset {name} has no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
    except LmforgeError:
        raise
    except Exception as e:
        raise LmforgeError(f"cannot load dataset {name}: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        # datasets fills absent struct fields with None across rows; drop them so checks see the record
        yield f"{name}[{split}] row {i}", _drop_nones(row)


def _drop_nones(obj):
    if isinstance(obj, dict):
        return {k: _drop_nones(v) for k, v in obj.items() if v is not None or k == "content"}
    if isinstance(obj, list):
        return [_drop_nones(v) for v in obj]
    return obj


# -- fail or skip, and report ------------------------------------------------------------------
def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise LmforgeError(f"on_error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")


def handle_bad_record(report: DataReport, where: str, err: Exception, on_error: str, what: str = "training record") -> None:
    """A bad record fails the run (`on_error="fail"`, naming file:line) or is skipped and reported."""
    msg = f"{where}: {err}"
    if on_error == "fail":
        raise LmforgeError(f"bad {what} {msg} (use --on-error skip to skip bad records)")
    report.skipped.append(msg)


T = TypeVar("T")


def read_checked(data: str | Path, convert: Callable[[object, str], T], on_error: str = "fail", split: str = "train",
                 report: DataReport | None = None, what: str = "training record") -> tuple[list[T], DataReport]:
    """Every record of `data` through `convert(record, where)` (which raises RecordError for a bad
    one); bad records and unreadable lines fail the run or are skipped, as `on_error` says."""
    check_on_error(on_error)
    report = report or DataReport()
    out = []
    for where, obj in read_records(data, split):
        report.total += 1
        if isinstance(obj, RecordError):  # a line that is not JSON / not UTF-8
            handle_bad_record(report, where, obj, on_error, what)
            continue
        try:
            out.append(convert(obj, where))
        except RecordError as e:
            handle_bad_record(report, where, e, on_error, what)
    if not out:
        raise LmforgeError(f"no usable {what}s in {data} ({report.summary()})")
    return out, report


def _rooted(msgs: list[dict], home: Path) -> list[dict]:
    """Image parts' relative paths as paths under the data's folder."""
    for m in msgs:
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p.get("type") == "image" and isinstance(p.get("path"), str) and not Path(p["path"]).is_absolute():
                p["path"] = str(home / p["path"])
    return msgs


def clip_row(ids: list[int], mask: list[int], max_len: int, where: str, report: DataReport,
             what: str = "assistant token") -> tuple[list[int], list[int]]:
    """Cut a rendered row to `max_len` tokens (recorded in report.truncated); RecordError when no
    trained token is left (the first token is never a target)."""
    if len(ids) > max_len:
        report.truncated.append(f"{where}: {len(ids)} tokens > {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    if sum(mask[1:]) == 0:
        raise RecordError(f"no {what} within the first {max_len} tokens")
    return ids, mask


def load_examples(data: str | Path, fmt: str = "auto", on_error: str = "fail", split: str = "train",
                  report: DataReport | None = None, images: bool = False) -> tuple[list[Example], DataReport]:
    """Read and validate every record; bad ones fail the run or are skipped and reported.
    `images` (a vision model): image parts are kept, their relative paths taken from the data's
    folder."""
    check_on_error(on_error)
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown data format '{fmt}' (choose {', '.join(FORMATS)})")
    home = Path(data) if Path(data).is_dir() else Path(data).parent

    def convert(obj, where: str) -> Example:
        msgs, tools = record_to_example(obj, fmt, images)
        return Example(_rooted(msgs, home) if images else msgs, where, tools)

    return read_checked(data, convert, on_error, split, report)


def tokenize_examples(tokenizer, examples: list[Example], max_len: int, on_error: str = "fail",
                      report: DataReport | None = None, render=None) -> tuple[list[tuple], DataReport]:
    """(ids, loss_mask) per example through the one renderer; long ones are truncated and reported,
    and one left with no assistant token is skipped or fails like any bad record. `render(example)
    -> (ids, loss_mask, *more)` stands in for the text renderer (pictures: lmforge.vision.sft)."""
    from lmforge.chat import render_conversation

    report = report or DataReport(total=len(examples))
    rows = []
    for ex in examples:
        try:
            ids, mask, *more = render(ex) if render else render_conversation(tokenizer, ex.messages, tools=ex.tools)
            rows.append((*clip_row(ids, mask, max_len, ex.where, report), *more))
        except ImportError as e:  # tool calls render through lmforge.tools; not a data problem
            raise LmforgeError(f"{ex.where}: cannot render this conversation: {e}") from None
        except (RecordError, LmforgeError) as e:
            handle_bad_record(report, ex.where, e, on_error)
    report.kept = len(rows)
    if not rows:
        raise LmforgeError(f"no usable training examples ({report.summary()})")
    return rows, report


def split_holdout(rows: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, validation) split, seeded; fraction 0 gives no validation set."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(rows) * fraction)))
    val = [rows[i] for i in sorted(order[:n_val])]
    train = [rows[i] for i in sorted(order[n_val:])]
    return train, val
