"""Replies of thinking models (Qwen3, DeepSeek-R1: every template that writes `<think>` tags): the
reasoning between `<think>` and `</think>` goes to the message's `reasoning_content`, the rest to
`content`, as llama-server and vLLM's reasoning parsers return them (so a client shows the
answer, and the next turn is sent back without the reasoning the template would drop anyway).

A reply is in its reasoning when it starts with `<think>`, or from its first token when the
prompt already opened the block (R1's templates end the generation prompt with `<think>\\n`).
The newlines around the reasoning and before the answer belong to neither. One splitter serves
the stream and the whole reply, so both give the same two texts.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def thinks(template: str | None) -> bool:
    """Whether replies under this chat template may hold a reasoning block."""
    return bool(template) and (OPEN in template or CLOSE in template)


def opened(prompt_text: str) -> bool:
    """Whether the prompt ends inside an open reasoning block."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


def tag_hold(text: str, tag: str) -> int:
    """How many trailing characters of `text` might begin `tag` (held back while streaming)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Streamed pieces in, (reasoning delta, content delta) out."""

    def __init__(self, inside: bool):
        self.state = "thinking" if inside else "start"
        self.reasoned = inside  # the reply has a reasoning block (maybe empty)
        self.buf = ""
        self.lead = True  # newlines at the start of the current part are dropped

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        self.buf += piece
        reasoning = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.state, self.reasoned, self.buf = "thinking", True, head[len(OPEN):]
            elif final or not OPEN.startswith(head[:len(OPEN)]) or len(head) >= len(OPEN):
                self.state, self.lead = "content", False
            else:
                return "", ""  # not yet known whether the reply opens a reasoning block
        if self.state == "thinking":
            reasoning = self._thinking(final)
        if self.state == "content":
            content, self.buf = self._drop_lead(self.buf), ""
            return reasoning, content
        return reasoning, ""

    def _thinking(self, final: bool) -> str:
        at = self.buf.find(CLOSE)
        if at >= 0:
            out = self._drop_lead(self.buf[:at]).rstrip("\n")
            self.state, self.buf, self.lead = "content", self.buf[at + len(CLOSE):], True
            return out
        keep = 0 if final else tag_hold(self.buf, CLOSE)
        body = self.buf[:len(self.buf) - keep]
        if not final:  # newlines just before the closing tag are not reasoning: hold them too
            keep += len(body) - len(body.rstrip("\n"))
        out = self._drop_lead(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:] if keep else ""
        return out.rstrip("\n") if final else out

    def _drop_lead(self, text: str) -> str:
        if self.lead:
            text = text.lstrip("\n")
            self.lead = not text
        return text


def split_reasoning(text: str, inside: bool) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole reply."""
    s = ReasoningSplitter(inside)
    reasoning, content = s.feed(text, final=True)
    return (reasoning if s.reasoned else None), content
