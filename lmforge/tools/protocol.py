"""Tool calling: descriptions, the canonical text of calls and results, parsing, execution, the loop.

The one tool-call format of lmforge (Hermes/Qwen style, which SmolLM-family models have seen).
A model calls a tool by writing, in its assistant text:

    <tool_call>{"name": "calculator", "arguments": {"expression": "48213*9127"}}</tool_call>

and reads the result in the next turn (role "tool") as:

    <tool_response>
    440040051
    </tool_response>

In conversations (OpenAI message dicts) an assistant turn with calls carries
`tool_calls: [{"id": "call_0", "type": "function", "function": {"name": ..., "arguments": "<JSON string>"}}]`
and each result is `{"role": "tool", "tool_call_id": "call_0", "content": "..."}`.

Functions the chat renderer (lmforge/chat.py), the server, the API and RL use:

- `render_tools_system_prompt(tools) -> str`: the text, for the system message, that lists the
  tools (OpenAI `tools` dicts or `Tool` objects) and says how to call them, for templates with
  no tool support of their own.
- `render_tool_calls_text(tool_calls) -> str`: an assistant message's `tool_calls` as the text
  the model writes (one `<tool_call>...</tool_call>` per call, joined by newlines).
- `render_tool_result_text(content) -> str`: a tool result as `<tool_response>` text (the
  renderer puts it in a `tool` turn, or a `user` turn for templates that lack that role).
- `parse_tool_calls(text) -> (content_without_calls, calls, errors)`: what the model wrote,
  robustly: tolerant JSON (code fences, single quotes, trailing commas, a missing closing tag or
  brace, `arguments` given as a JSON string, `parameters` for `arguments`). Calls come back in
  the OpenAI shape; each error is a dict (`index`, `name`, `raw`, `message`) to feed back to the
  model. Never raises.
- `execute_tool_call(call, tools) -> tool message`: runs one call; unknown tool, bad arguments or
  a failing tool give an `Error: ...` result, never an exception. A tool that returns a
  `ToolResult` with figures (the `python` tool's plots) adds `figures: [{mime_type, width,
  height, url}]` to the message: for chat and the web page to show, never rendered to the model.
- `run_tool_loop(generate_fn, messages, tools, max_steps)`: generate, parse, execute, append, repeat
  until the model answers without calls or the step limit is reached. Model-free: chat, server
  and RL pass their own `generate_fn(messages) -> assistant text`.
- `get_tools("calculator,python,search", index=...) -> [Tool]`: the registry.

Generation may stop at `STOP_STRINGS` (the closing `</tool_call>`), so that a model never goes on
to invent a tool's result itself; the parser accepts the call with or without its closing tag.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
from typing import Any, Callable, Iterable

from lmforge.errors import LmforgeError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = CALL_OPEN, CALL_CLOSE  # the names lmforge.serve looks up
STOP_STRINGS = [CALL_CLOSE]
MAX_RESULT_CHARS = 4000  # a tool result longer than this is cut (the model's context is small)
DEFAULT_MAX_STEPS = 5


@dataclasses.dataclass
class Tool:
    """A tool: its JSON-schema description (OpenAI `tools` shape) and the function that runs it."""

    name: str
    description: str
    parameters: dict
    function: Callable[..., str]

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclasses.dataclass
class ToolResult:
    """A tool's answer with more than text: the model reads `text`; `figures` (dicts with
    mime_type, width, height and a data: url, as `sandbox.Figure.as_dict` makes) are for the user
    and ride in the tool message's extra `figures` field, which no renderer shows the model."""

    text: str
    figures: list[dict] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- registry


def _calculator(config: dict) -> Tool:
    from lmforge.tools.calculator import SCHEMA, calculator_tool

    f = SCHEMA["function"]
    return Tool(f["name"], f["description"], f["parameters"], calculator_tool)


def _python(config: dict) -> Tool:
    from lmforge.tools.sandbox import python_tool

    timeout_s = float(config.get("python_timeout_s", 10.0))
    return Tool(
        "python",
        "Run a Python 3 program in an isolated sandbox (standard library, numpy and matplotlib; no network, "
        "no files from the user, a few seconds of time) and get what it prints; the figures it draws are "
        "shown to the user. Use print() to see results.",
        {"type": "object", "properties": {"code": {"type": "string", "description": "the complete program"}}, "required": ["code"]},
        lambda code: python_tool(code, timeout_s=timeout_s),
    )


def _search(config: dict) -> Tool:
    from lmforge.tools.search import default_index_path, search_tool

    index = config.get("index") or default_index_path()

    def run(query: str, k: int = 5) -> str:
        return search_tool(query, index=index, k=k)

    return Tool(
        "search",
        "Search the user's own documents (a local full-text index) and get the best matching "
        "snippets with their file and position. Use it for questions about the user's files.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "words to look for"},
                "k": {"type": "integer", "description": "how many snippets (default 5)", "minimum": 1, "maximum": 20},
            },
            "required": ["query"],
        },
        run,
    )


# name -> factory(config) -> Tool. Config keys: `index` (search), `python_timeout_s` (python).
REGISTRY: dict[str, Callable[[dict], Tool]] = {"calculator": _calculator, "python": _python, "search": _search}


def get_tools(names: str | Iterable[str] | None, **config: Any) -> list[Tool]:
    """Tools by name ("calculator,python,search" or a list); unknown names are a clear error."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    tools = []
    for name in names:
        if isinstance(name, Tool):
            tools.append(name)
            continue
        if name not in REGISTRY:
            raise LmforgeError(f"unknown tool '{name}' (available: {', '.join(REGISTRY)})")
        tools.append(REGISTRY[name](config))
    return tools


def tool_schemas(tools: Iterable[Tool | dict]) -> list[dict]:
    """OpenAI `tools` list for Tool objects or dicts (bare function dicts are wrapped)."""
    out = []
    for t in tools:
        if isinstance(t, Tool):
            out.append(t.schema())
        elif isinstance(t, dict) and "function" in t:
            out.append(t)
        elif isinstance(t, dict) and "name" in t:
            out.append({"type": "function", "function": t})
        else:
            raise LmforgeError(f"not a tool description: {t!r:.100}")
    return out


# ---------------------------------------------------------------- rendering


def render_tools_system_prompt(tools: Iterable[Tool | dict]) -> str:
    """The system-message text listing the tools and how to call them."""
    schemas = tool_schemas(tools)
    lines = [
        "You can call tools to help answer. The tools, as JSON schemas:",
        "<tools>",
        *(json.dumps(s, ensure_ascii=False) for s in schemas),
        "</tools>",
        "To call a tool, write exactly:",
        f'{CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}{CALL_CLOSE}',
        f"The result comes back in {RESULT_OPEN}{RESULT_CLOSE}. Then answer the user using it.",
    ]
    return "\n".join(lines)


def _arguments_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    return {} if arguments is None else arguments


def render_tool_call_text(call: dict) -> str:
    fn = call.get("function", call)
    name = fn.get("name") or ""
    args = _arguments_obj(fn.get("arguments"))
    if not name or args is None:
        # a malformed call the model wrote (name ""): keep its own text so the conversation stays true
        return f"{CALL_OPEN}{fn.get('arguments') or ''}{CALL_CLOSE}"
    return CALL_OPEN + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + CALL_CLOSE


def render_tool_calls_text(tool_calls: list[dict]) -> str:
    """An assistant message's tool_calls as the model writes them."""
    return "\n".join(render_tool_call_text(c) for c in tool_calls or [])


def render_tool_result_text(content: Any) -> str:
    """A tool result as the model reads it."""
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False)
    return f"{RESULT_OPEN}\n{content}\n{RESULT_CLOSE}"


# ---------------------------------------------------------------- parsing

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _loads_lenient(raw: str) -> tuple[Any, str | None]:
    """JSON object from what a small model wrote; (value, None) or (None, error message)."""
    text = raw.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    start = text.find("{")
    if start < 0:
        return None, "expected a JSON object like {\"name\": ..., \"arguments\": {...}}"
    text = text[start:]
    first_error = None
    candidates = [text, _TRAILING_COMMA.sub(r"\1", text)]
    for extra in range(1, 4):  # a closing brace or two that the model forgot
        candidates.append(candidates[1] + "}" * extra)
    for cand in candidates:
        try:
            value, _ = json.JSONDecoder().raw_decode(cand)  # ignores text after the object
            return value, None
        except json.JSONDecodeError as e:
            first_error = first_error or f"invalid JSON: {e.msg} at character {e.pos}"
    try:  # Python-style dict: single quotes, True/False/None
        value = ast.literal_eval(_TRAILING_COMMA.sub(r"\1", text))
        if isinstance(value, dict):
            return value, None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    return None, first_error


@dataclasses.dataclass
class _Block:
    raw: str
    call: dict | None = None
    error: str | None = None
    name: str | None = None


def _parse_block(raw: str) -> _Block:
    value, err = _loads_lenient(raw)
    if err is not None:
        return _Block(raw, error=err)
    if not isinstance(value, dict):
        return _Block(raw, error="the tool call must be a JSON object with \"name\" and \"arguments\"")
    if "function" in value and isinstance(value["function"], dict):  # OpenAI shape written out
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return _Block(raw, error="the tool call has no \"name\"")
    name = name.strip()
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        parsed, aerr = _loads_lenient(args) if args.strip() else ({}, None)
        if aerr is not None:
            return _Block(raw, name=name, error=f"\"arguments\" is not a JSON object ({aerr})")
        args = parsed
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return _Block(raw, name=name, error="\"arguments\" must be a JSON object")
    call = {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
    return _Block(raw, call=call, name=name)


def _parse_blocks(text: str) -> tuple[str, list[_Block]]:
    """Split model text into the content outside tool calls and the calls in order."""
    blocks: list[_Block] = []
    pieces: list[str] = []
    pos = 0
    while True:
        i = text.find(CALL_OPEN, pos)
        if i < 0:
            pieces.append(text[pos:])
            break
        pieces.append(text[pos:i])
        j = text.find(CALL_CLOSE, i + len(CALL_OPEN))
        nxt = text.find(CALL_OPEN, i + len(CALL_OPEN))
        if j < 0 or (0 <= nxt < j):  # unclosed: up to the next call or the end of the text
            end = nxt if nxt >= 0 else len(text)
            blocks.append(_parse_block(text[i + len(CALL_OPEN):end]))
            pos = end
        else:
            blocks.append(_parse_block(text[i + len(CALL_OPEN):j]))
            pos = j + len(CALL_CLOSE)
    content = "".join(pieces).replace(CALL_CLOSE, "")
    content = re.sub(r"\n{3,}", "\n\n", content).strip()
    return content, blocks


def parse_tool_calls(text: str, start_index: int = 0) -> tuple[str, list[dict], list[dict]]:
    """(content without the calls, OpenAI-shaped calls with ids call_N, errors). Never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    content, blocks = _parse_blocks(text)
    calls, errors = [], []
    for k, b in enumerate(blocks):
        if b.call is not None:
            calls.append({"id": f"call_{start_index + k}", **b.call})
        else:
            errors.append({"index": k, "id": f"call_{start_index + k}", "name": b.name, "raw": b.raw, "message": b.error})
    return content, calls, errors


# ---------------------------------------------------------------- execution

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def _check_arguments(tool: Tool, args: dict) -> dict:
    """Validate against the tool's JSON schema (the subset tools here use); coerce the obvious."""
    schema = tool.parameters or {}
    props = schema.get("properties", {})
    missing = [r for r in schema.get("required", []) if r not in args]
    if missing:
        raise ValueError(f"missing argument '{missing[0]}' (arguments of {tool.name}: {', '.join(props) or 'none'})")
    out = {}
    for key, value in args.items():
        if key not in props:
            raise ValueError(f"unexpected argument '{key}' (arguments of {tool.name}: {', '.join(props) or 'none'})")
        spec = props[key]
        want = spec.get("type")
        if want == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # {"expression": 2+2} style slips
        elif want == "integer" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        elif want == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if want in _JSON_TYPES:
            ok = isinstance(value, _JSON_TYPES[want]) and not (want in ("integer", "number") and isinstance(value, bool))
            if not ok:
                raise ValueError(f"argument '{key}' must be a {want}, got {json.dumps(value, ensure_ascii=False)[:60]}")
        if "enum" in spec and value not in spec["enum"]:
            raise ValueError(f"argument '{key}' must be one of {spec['enum']}")
        if want in ("integer", "number"):
            if "minimum" in spec and value < spec["minimum"] or "maximum" in spec and value > spec["maximum"]:
                raise ValueError(f"argument '{key}' must be between {spec.get('minimum')} and {spec.get('maximum')}")
        out[key] = value
    return out


def _tool_map(tools: Iterable[Tool] | dict[str, Tool]) -> dict[str, Tool]:
    if isinstance(tools, dict):
        return tools
    return {t.name: t for t in tools}


def _cut(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[result cut at {limit} of {len(text)} characters]"


def tool_error_message(call_id: str, message: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": f"Error: {message}"}


def execute_tool_call(call: dict, tools: Iterable[Tool] | dict[str, Tool]) -> dict:
    """Run one OpenAI-shaped call; always returns a `tool` message (errors as "Error: ...")."""
    tmap = _tool_map(tools)
    call_id = call.get("id") or "call_0"
    fn = call.get("function", {})
    name = fn.get("name")
    if name not in tmap:
        known = ", ".join(tmap) or "none"
        return tool_error_message(call_id, f"unknown tool '{name}' (available tools: {known})")
    tool = tmap[name]
    args = _arguments_obj(fn.get("arguments"))
    if not isinstance(args, dict):
        return tool_error_message(call_id, "arguments are not a JSON object")
    try:
        args = _check_arguments(tool, args)
    except ValueError as e:
        return tool_error_message(call_id, str(e))
    try:
        result = tool.function(**args)
    except Exception as e:  # noqa: BLE001 - any failure of a tool is a message for the model
        msg = str(e).strip() or type(e).__name__
        return tool_error_message(call_id, _cut(msg))
    figures = []
    if isinstance(result, ToolResult):
        result, figures = result.text, result.figures
    if not isinstance(result, str):
        result = json.dumps(result, ensure_ascii=False)
    msg = {"role": "tool", "tool_call_id": call_id, "content": _cut(result)}
    if figures:
        msg["figures"] = figures
    return msg


def _count_calls(messages: list[dict]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def run_tool_loop(
    generate_fn: Callable[[list[dict]], str],
    messages: list[dict],
    tools: Iterable[Tool] | dict[str, Tool],
    max_steps: int = DEFAULT_MAX_STEPS,
    on_message: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Let the model call tools until it answers without one; return the whole conversation.

    Each step: `generate_fn(messages)` gives the assistant's text; its calls are parsed and run;
    the assistant message (content + `tool_calls`) and one `tool` message per call are appended.
    Malformed calls, unknown tools and bad arguments come back to the model as `Error: ...`
    results. After `max_steps` rounds of tool calls, further calls are answered with a step-limit
    error and the loop ends. `on_message` sees each appended message (for streaming UIs).
    """
    tmap = _tool_map(tools)
    messages = list(messages)

    def add(m: dict) -> None:
        messages.append(m)
        if on_message is not None:
            on_message(m)

    for step in range(max_steps + 1):
        text = generate_fn(messages)
        content, blocks = _parse_blocks(text or "")
        if not blocks:
            add({"role": "assistant", "content": text})
            return messages
        base = _count_calls(messages)
        tool_calls, results = [], []
        for k, b in enumerate(blocks):
            call_id = f"call_{base + k}"
            if b.call is not None:
                tool_calls.append({"id": call_id, **b.call})
            else:  # name "" marks a malformed call: arguments hold the model's own text, kept as is
                tool_calls.append({"id": call_id, "type": "function", "function": {"name": "", "arguments": b.raw}})
            if step == max_steps:
                results.append(tool_error_message(call_id, f"step limit reached ({max_steps} rounds of tool calls); answer without tools"))
            elif b.call is None:
                results.append(tool_error_message(call_id, f"malformed tool call: {b.error}. Write {CALL_OPEN}{{\"name\": ..., \"arguments\": {{...}}}}{CALL_CLOSE}"))
            else:
                results.append(execute_tool_call(tool_calls[-1], tmap))
        add({"role": "assistant", "content": content or None, "tool_calls": tool_calls})
        for r in results:
            add(r)
    return messages
