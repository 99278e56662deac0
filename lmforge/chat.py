"""The one conversation renderer: OpenAI-style messages -> text -> (ids, loss_mask).

The model's own chat template (jinja2, as in `tokenizer_config.json` or GGUF metadata) decides
the text. Templates cannot say which characters are the assistant's, so the renderer finds them
itself: for assistant turn i, the text of messages[:i] with a generation prompt is a prefix of
the text of messages[:i+1]; what lies between is that turn (its end-of-turn token included).
Loss covers every assistant turn and nothing else. SFT, DPO, RL, eval, chat and the server all
render through here.

Tool calls and tool results are rendered with lmforge's canonical tool text (lmforge.tools)
when the template has no tool support of its own, so every template can carry them. A template
that writes lmforge's own call format (`<tool_call>`, as Qwen's and Hermes' do) gets the tools,
the calls and the `tool` turns as they are, exactly as `transformers` passes them.

The template sees what `transformers.apply_chat_template` gives it: the same jinja2 sandbox and
filters, the tokenizer's special tokens, `tools`, and any extra keyword (`enable_thinking` for
Qwen3) through `template_kwargs`.

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
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# The format SFT gives a model that has no template yet (ChatML, as the default model uses).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VALID_ROLES = ("system", "user", "assistant", "tool")
# what a template with its own tool support reads besides role and content
_NATIVE_FIELDS = ("tool_calls", "tool_call_id", "name", "reasoning_content")


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, which templates written for transformers' assistant
    masks use: it renders its body (the renderer finds assistant turns without it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the text the model was trained on
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    return _environment().from_string(template)


@lru_cache(maxsize=16)
def native_tools(template: str | None) -> bool:
    """Whether the template lists `tools` itself and writes calls as `<tool_call>` (lmforge's format):
    then tools, calls and results go to it as they are; any other template gets lmforge's text."""
    if not template or "<tool_call>" not in template:
        return False
    try:
        return "tools" in meta.find_undeclared_variables(_environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False


def normalize_messages(messages: list[dict], native: bool = False) -> list[dict]:
    """Validate roles/content and fold tool calls and results into text the template can carry
    (`native`: the template carries them itself, so they stay as they are)."""
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
        if native:
            nm.update({k: m[k] for k in _NATIVE_FIELDS if m.get(k) is not None})
        elif role == "assistant" and m.get("tool_calls"):
            from lmforge.tools.protocol import render_tool_calls_text

            nm["content"] = (content + ("\n" if content else "") + render_tool_calls_text(m["tool_calls"])).strip()
        if role == "tool" and not native:
            from lmforge.tools.protocol import render_tool_result_text

            nm = {"role": "user", "content": render_tool_result_text(content), "_tool": True}
        out.append(nm)
    return out


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> str:
    """The conversation as the model sees it (special tokens as text)."""
    msgs = _prepared(tokenizer, messages, tools)
    return _render(tokenizer, msgs, add_generation_prompt, tools, template_kwargs)


def _template(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE


def _prepared(tokenizer, messages: list[dict], tools) -> list[dict]:
    native = native_tools(_template(tokenizer))
    return _with_tools(normalize_messages(messages, native), None if native else tools)


def _with_tools(msgs: list[dict], tools) -> list[dict]:
    if tools:
        from lmforge.tools.protocol import render_tools_system_prompt

        tool_text = render_tools_system_prompt(tools)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + tool_text}
        else:
            msgs.insert(0, {"role": "system", "content": tool_text})
    return msgs


def _render(tokenizer, msgs: list[dict], add_generation_prompt: bool, tools=None, template_kwargs=None) -> str:
    template = _template(tokenizer)
    if tools and native_tools(template):
        from lmforge.tools.protocol import tool_schemas

        tools = tool_schemas(tools)
    else:
        tools = None
    # transformers gives the template the tokenizer's special tokens
    specials = {"bos_token": getattr(tokenizer, "bos_token", None) or "", "eos_token": getattr(tokenizer, "eos_token", None) or ""}
    if getattr(tokenizer, "pad_token", None):
        specials["pad_token"] = tokenizer.pad_token
    try:
        return _compile(template).render({
            **specials, **getattr(tokenizer, "template_kwargs", {}), **(template_kwargs or {}),
            "messages": [{k: v for k, v in m.items() if not k.startswith("_")} for m in msgs],
            "tools": tools, "add_generation_prompt": add_generation_prompt,
        })
    except jinja2.TemplateError as e:
        raise LmforgeError(f"chat template failed: {e}") from None


_MARK = "\ue000{}\ue001"  # private-use characters: no template writes them
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def _special_texts(tokenizer) -> list[str]:
    return [t for t in getattr(tokenizer, "special_tokens", []) if t]


def _marked(msgs: list[dict]) -> list[dict]:
    return [{**m, "content": _MARK.format(i)} for i, m in enumerate(msgs)]


def render_parts(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None,
                 template_kwargs=None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, from_template) pieces: what the template wrote, where
    special tokens count, and each message's own text, where they do not."""
    msgs = _prepared(tokenizer, messages, tools)
    full = _render(tokenizer, msgs, add_generation_prompt, tools, template_kwargs)
    marked = _render(tokenizer, _marked(msgs), add_generation_prompt, tools, template_kwargs)
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
    specials = _special_texts(tokenizer)
    if any(t in m["content"] for m in msgs if m["role"] != "assistant" for t in specials):
        raise LmforgeError("a message holds a special token's text and this chat template rewrites message text, "
                           "so it cannot be kept from acting as a special token")
    return [(full, True)]


def encode_parts(tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets into the joined text) of `render_parts` pieces: the joined text at
    once, as transformers and llama.cpp encode a conversation (a piece's tokens can depend on its
    neighbours: SentencePiece's "▁" before a word, merges across a boundary), unless a piece
    that is only text holds a special token's string; then piece by piece."""
    specials = _special_texts(tokenizer)
    if getattr(tokenizer, "allow_special_in_content", False) or not any(
            t in text for text, from_template in parts if not from_template for t in specials):
        return tokenizer.encode_with_offsets("".join(text for text, _ in parts))
    ids, offsets, at = [], [], 0
    for text, from_template in parts:
        i, o = tokenizer.encode_with_offsets(text) if from_template else tokenizer.encode_text(text)
        ids += i
        offsets += [(a + at, b + at) for a, b in o]
        at += len(text)
    return ids, offsets


def assistant_spans(tokenizer, messages: list[dict], tools=None, template_kwargs=None) -> tuple[str, list[tuple[int, int]]]:
    """Full text plus the character spans of every assistant turn."""
    def text(msgs, gen=False):
        return render_text(tokenizer, msgs, add_generation_prompt=gen, tools=tools, template_kwargs=template_kwargs)

    full = text(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, upto = text(messages[:i], gen=True), text(messages[: i + 1])
        if not full.startswith(before):
            raise LmforgeError("the chat template does not render conversations prefix by prefix; cannot mark assistant turns")
        if full.startswith(upto) and upto.startswith(before):
            # the turn ends at its end-of-turn marker; trailing newlines belong to the template
            stripped = upto.rstrip("\n")
            spans.append((len(before), len(stripped) if len(stripped) > len(before) else len(upto)))
        else:  # the template writes a last turn differently (Qwen3's thinking, Phi-3's closing EOS)
            spans.append((len(before), _turn_end(tokenizer, messages, i, full, len(before), tools, template_kwargs)))
    return full, spans


def _turn_end(tokenizer, messages, i, full, start, tools, template_kwargs) -> int:
    """Where assistant turn i ends in `full`, when the conversation cut after it renders differently:
    the template text after its content that both renders share is its end-of-turn marker."""
    def tail(msgs):
        marked = _render(tokenizer, _marked(_prepared(tokenizer, msgs, tools)), False, tools, template_kwargs)
        at = marked.rfind(_MARK.format(i))
        return marked[at + len(_MARK.format(i)):] if at >= 0 else ""

    marker = _closing_text(tail(messages[: i + 1]), tail(messages), _special_texts(tokenizer))
    end = full.find(marker, start) if marker else -1
    if end < 0:
        raise LmforgeError("the chat template does not render conversations prefix by prefix; cannot mark assistant turns")
    return end + len(marker)


def _closing_text(a: str, b: str, specials: list[str]) -> str:
    """The end-of-turn text two renders write after the same content: their shared start, cut at
    its last newline or special token (it may run into the next piece: "<|end|>\\n<|" of
    "<|endoftext|>" and "<|user|>"), then its last special token if it has one (what precedes
    that may depend on the content: Qwen3 writes a newline before a call only after text)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n] and a[n] != "\ue000":
        n += 1
    shared = a[:n]
    cut = max([k + 1 for k, ch in enumerate(shared) if ch == "\n"]
              + [shared.rfind(t) + len(t) for t in specials if t in shared] + [0])
    text = shared[:cut].strip("\n")
    closing = [(text.rfind(t) + len(t), len(t), t) for t in specials if t in text]
    return max(closing)[2] if closing else text


def render_conversation(tokenizer, messages: list[dict], tools=None, max_len: int | None = None,
                        template_kwargs=None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) with mask 1 on the tokens of every assistant turn, 0 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, tools=tools, template_kwargs=template_kwargs)
    ids, offsets = encode_parts(tokenizer, render_parts(tokenizer, messages, tools=tools, template_kwargs=template_kwargs))
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


def render_prompt(tokenizer, messages: list[dict], tools=None, template_kwargs=None) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn."""
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return bos + tokenizer.encode_text(render_completion_text(messages))[0]
    parts = render_parts(tokenizer, messages, add_generation_prompt=True, tools=tools, template_kwargs=template_kwargs)
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
