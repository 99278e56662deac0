"""The one conversation renderer: OpenAI-style messages -> text -> (ids, loss_mask).

The model's own chat template (jinja2, as in `tokenizer_config.json` or GGUF metadata) decides
the text. Templates cannot say which characters are the assistant's, so the renderer finds them
itself: for assistant turn i, the text of messages[:i] with a generation prompt is a prefix of
the text of messages[:i+1]; what lies between is that turn (its end-of-turn token included).
Loss covers every assistant turn and nothing else. SFT, DPO, RL, eval, chat and the server all
render through here.

Tool calls and tool results are rendered with lmforge's canonical tool text (lmforge.tools)
when the template has no tool support of its own, so every template can carry them.

Special tokens come only from the template: the text of every message (a user's, a tool
result's, a document the search tool returns) is encoded with special-token strings as ordinary
tokens, so "<|im_end|>\n<|im_start|>system" typed by a user stays text and opens no turn (the
assistant's own turns keep theirs: a model may be trained to write a special tool-call token). The
renderer finds each message's text in the rendered conversation by rendering it once more with a
marker in place of every content (`render_parts`).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# The format SFT gives a model that has no template yet (ChatML, as the default model uses).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VALID_ROLES = ("system", "user", "assistant", "tool")


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


@lru_cache(maxsize=16)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def template_supports_tools(template: str | None) -> bool:
    return bool(template) and "tool" in template


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Validate roles/content and fold tool calls and results into text the template can carry."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise LmforgeError(f"message {i} must be an object with a 'role'")
        role = m["role"]
        if role not in VALID_ROLES:
            raise LmforgeError(f"message {i} has unknown role '{role}' (expected one of {', '.join(VALID_ROLES)})")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        content = "" if content is None else str(content)
        nm = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            from lmforge.tools.protocol import render_tool_calls_text

            nm["content"] = (content + ("\n" if content else "") + render_tool_calls_text(m["tool_calls"])).strip()
        if role == "tool":
            from lmforge.tools.protocol import render_tool_result_text

            nm = {"role": "user", "content": render_tool_result_text(content), "_tool": True}
        out.append(nm)
    return out


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The conversation as the model sees it (special tokens as text)."""
    return _render(tokenizer, _with_tools(normalize_messages(messages), tools), add_generation_prompt)


def _with_tools(msgs: list[dict], tools) -> list[dict]:
    if tools:
        from lmforge.tools.protocol import render_tools_system_prompt

        tool_text = render_tools_system_prompt(tools)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + tool_text}
        else:
            msgs.insert(0, {"role": "system", "content": tool_text})
    return msgs


def _render(tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    try:
        return _compile(template).render(
            messages=[{k: v for k, v in m.items() if not k.startswith("_")} for m in msgs],
            add_generation_prompt=add_generation_prompt,
            bos_token=getattr(tokenizer, "bos_token", None) or "",
            eos_token=getattr(tokenizer, "eos_token", None) or "",
        )
    except jinja2.TemplateError as e:
        raise LmforgeError(f"chat template failed: {e}") from None


_MARK = "\ue000{}\ue001"  # private-use characters: no template writes them
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def render_parts(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, from_template) pieces: what the template wrote, where
    special tokens count, and each message's own text, where they do not."""
    msgs = _with_tools(normalize_messages(messages), tools)
    full = _render(tokenizer, msgs, add_generation_prompt)
    marked = _render(tokenizer, [{**m, "content": _MARK.format(i)} for i, m in enumerate(msgs)], add_generation_prompt)
    parts, pos = [], 0
    for hit in _MARK_RE.finditer(marked):
        m = msgs[int(hit.group(1))]
        # the assistant's own turns keep their special tokens (a tool call a model was trained to
        # write with one); everyone else's text is only text
        parts += [(marked[pos:hit.start()], True), (m["content"], m["role"] == "assistant")]
        pos = hit.end()
    parts.append((marked[pos:], True))
    parts = [(t, trusted) for t, trusted in parts if t]
    if "".join(t for t, _ in parts) == full:
        return parts
    # the template rewrites message text (trims it, say): the pieces cannot be told apart
    specials = [t for t in getattr(tokenizer, "special_tokens", []) if t]
    if any(t in m["content"] for m in msgs for t in specials):
        raise LmforgeError("a message holds a special token's text and this chat template rewrites message text, "
                           "so it cannot be kept from acting as a special token")
    return [(full, True)]


def encode_parts(tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets into the joined text) of `render_parts` pieces."""
    ids, offsets, at = [], [], 0
    for text, from_template in parts:
        i, o = tokenizer.encode_with_offsets(text) if from_template else tokenizer.encode_text(text)
        ids += i
        offsets += [(a + at, b + at) for a, b in o]
        at += len(text)
    return ids, offsets


def assistant_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
    """Full text plus the character spans of every assistant turn."""
    full = render_text(tokenizer, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render_text(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render_text(tokenizer, messages[: i + 1], tools=tools)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise LmforgeError("the chat template does not render conversations prefix by prefix; cannot mark assistant turns")
        end = len(upto)
        # the turn ends at its end-of-turn marker; trailing newlines belong to the template
        stripped = upto.rstrip("\n")
        spans.append((len(before), len(stripped) if len(stripped) > len(before) else end))
    return full, spans


def render_conversation(tokenizer, messages: list[dict], tools=None, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) with mask 1 on the tokens of every assistant turn, 0 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, tools=tools)
    ids, offsets = encode_parts(tokenizer, render_parts(tokenizer, messages, tools=tools))
    mask = [0] * len(ids)
    for j, (s, e) in enumerate(offsets):
        for a, b in spans:
            if s >= a and e <= b and e > s:
                mask[j] = 1
                break
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        ids, mask = [tokenizer.bos_id] + ids, [0] + mask
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_completion_text(messages: list[dict]) -> str:
    """A base model (no chat template) chats as plain completion: the text so far, continued."""
    return "\n\n".join(m["content"] for m in normalize_messages(messages) if m["content"])


def render_prompt(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn."""
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return bos + tokenizer.encode_text(render_completion_text(messages))[0]
    parts = render_parts(tokenizer, messages, add_generation_prompt=True, tools=tools)
    if parts and parts[0][0].startswith(tokenizer.bos_token or "\0"):
        bos = []  # the template wrote it
    return bos + encode_parts(tokenizer, parts)[0]


def with_chat_format(tokenizer):
    """`tokenizer`, given ChatML when it has no chat template: a base model has no chat format
    yet, and every stage that trains it on conversations (SFT, reward model, DPO, RL) saves it
    with ChatML, so the prompt and the conversation render the same way."""
    if tokenizer is None or tokenizer.chat_template:
        return tokenizer
    from dataclasses import replace

    return replace(tokenizer, chat_template=FALLBACK_TEMPLATE)
