"""Tool protocol: canonical text, robust parsing, execution with errors fed back, the tool loop."""
from __future__ import annotations

import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.tools.protocol import (
    REGISTRY,
    Tool,
    execute_tool_call,
    get_tools,
    parse_tool_calls,
    render_tool_calls_text,
    render_tool_result_text,
    render_tools_system_prompt,
    run_tool_loop,
    tool_schemas,
)

CALC = '<tool_call>{"name": "calculator", "arguments": {"expression": "48213*9127"}}</tool_call>'


def _args(call):
    return json.loads(call["function"]["arguments"])


def test_canonical_text():
    calls = [{"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "48213*9127"}'}}]
    assert render_tool_calls_text(calls) == CALC
    # arguments may also be a dict (as some clients send them)
    calls2 = [{"id": "c", "type": "function", "function": {"name": "search", "arguments": {"query": "Париж"}}}]
    assert render_tool_calls_text(calls + calls2) == CALC + '\n<tool_call>{"name": "search", "arguments": {"query": "Париж"}}</tool_call>'
    assert render_tool_result_text("440040051") == "<tool_response>\n440040051\n</tool_response>"
    assert render_tool_result_text({"a": 1}) == '<tool_response>\n{"a": 1}\n</tool_response>'


def test_system_prompt_lists_tools_in_openai_shape():
    tools = get_tools("calculator,python,search", index="/nonexistent.sqlite")
    text = render_tools_system_prompt(tools)
    assert text.count("\n{\"type\": \"function\"") == 3
    for t in tools:
        assert json.dumps(t.schema(), ensure_ascii=False) in text
    assert '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>' in text
    # OpenAI dicts (what the server receives) give the same text
    assert render_tools_system_prompt(tool_schemas(tools)) == text
    assert render_tools_system_prompt([t.schema()["function"] for t in tools]) == text


def test_parse_one_call_and_content():
    content, calls, errors = parse_tool_calls("Let me compute.\n" + CALC)
    assert content == "Let me compute." and errors == []
    assert calls == [{"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "48213*9127"}'}}]
    # the canonical text of what was parsed is what the model wrote
    assert render_tool_calls_text(calls) == CALC


@pytest.mark.parametrize("text", [
    CALC,
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48213*9127"}}\n</tool_call>',
    '<tool_call>{"name": "calculator", "arguments": {"expression": "48213*9127"}}',  # no closing tag
    '<tool_call>```json\n{"name": "calculator", "arguments": {"expression": "48213*9127"}}\n```</tool_call>',
    "<tool_call>{'name': 'calculator', 'arguments': {'expression': '48213*9127'}}</tool_call>",  # Python dict
    '<tool_call>{"name": "calculator", "arguments": {"expression": "48213*9127"},}</tool_call>',  # trailing comma
    '<tool_call>{"name": "calculator", "arguments": {"expression": "48213*9127"}</tool_call>',  # missing brace
    '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"48213*9127\\"}"}</tool_call>',  # JSON string
    '<tool_call>{"name": "calculator", "parameters": {"expression": "48213*9127"}}</tool_call>',  # Llama style
    '<tool_call>{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "48213*9127"}}}</tool_call>',
    '<tool_call>{"name": "calculator", "arguments": {"expression": "48213*9127"}} and some chatter</tool_call>',
])
def test_parse_is_tolerant(text):
    content, calls, errors = parse_tool_calls(text)
    assert errors == [] and len(calls) == 1, (calls, errors)
    assert calls[0]["function"]["name"] == "calculator" and _args(calls[0]) == {"expression": "48213*9127"}


def test_parse_several_and_errors_in_order():
    text = ("First <tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1+1\"}}</tool_call>"
            " then <tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": </tool_call>"
            " and <tool_call>{\"arguments\": {}}</tool_call>"
            "<tool_call>{\"name\": \"search\", \"arguments\": [1, 2]}</tool_call>"
            "<tool_call>not json at all</tool_call> done <tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"x\"}}</tool_call>")
    content, calls, errors = parse_tool_calls(text, start_index=10)
    assert content == "First  then  and  done"
    assert [c["id"] for c in calls] == ["call_10", "call_15"]
    assert [e["index"] for e in errors] == [1, 2, 3, 4]
    assert "invalid JSON" in errors[0]["message"]
    assert "no \"name\"" in errors[1]["message"]
    assert errors[2]["name"] == "search" and "must be a JSON object" in errors[2]["message"]
    assert "expected a JSON object" in errors[3]["message"]


@pytest.mark.parametrize("text", [None, "", "no calls here", "</tool_call>", "<tool_call>", "<tool_call></tool_call>",
                                  "<tool_call>{" * 50, "<tool_call>" + "[" * 5000 + "</tool_call>",
                                  '<tool_call>{"name": 5}</tool_call>', "<tool_call>{'name': __import__('os')}</tool_call>"])
def test_parse_never_raises(text):
    content, calls, errors = parse_tool_calls(text)
    assert isinstance(content, str) and isinstance(calls, list) and isinstance(errors, list)


def test_execute_calculator_and_errors():
    tools = get_tools(["calculator"])
    ok = execute_tool_call({"id": "call_3", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "48213*9127"}'}}, tools)
    assert ok == {"role": "tool", "tool_call_id": "call_3", "content": "440040051"}

    def run(name, args):
        return execute_tool_call({"id": "x", "type": "function", "function": {"name": name, "arguments": args}}, tools)["content"]

    assert run("calculator", '{"expression": 6}') == "6"  # a number where a string is expected is fine
    assert run("calculator", '{"expression": "1/0"}') == "Error: division by zero"
    assert run("calculator", "{}").startswith("Error: missing argument 'expression'")
    assert run("calculator", '{"expression": "1", "precision": 5}').startswith("Error: unexpected argument 'precision'")
    assert run("calculator", '{"expression": [1]}').startswith("Error: argument 'expression' must be a string")
    assert run("calculator", "not json") == "Error: arguments are not a JSON object"
    assert run("weather", "{}") == "Error: unknown tool 'weather' (available tools: calculator)"


def test_tool_exceptions_become_errors():
    def boom(x: str) -> str:
        raise RuntimeError("disk on fire")

    t = Tool("boom", "fails", {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}, boom)
    r = execute_tool_call({"id": "a", "function": {"name": "boom", "arguments": {"x": "1"}}}, [t])
    assert r["content"] == "Error: disk on fire"
    big = Tool("big", "long", {"type": "object", "properties": {}}, lambda: "y" * 10000)
    r = execute_tool_call({"id": "b", "function": {"name": "big", "arguments": "{}"}}, [big])
    assert len(r["content"]) < 4100 and "result cut at 4000" in r["content"]


def _scripted(replies):
    seen = []

    def generate(messages):
        seen.append([dict(m) for m in messages])
        return replies[len(seen) - 1]

    return generate, seen


def test_loop_calls_tool_and_answers():
    gen, seen = _scripted(["Let me compute. " + CALC, "48213 × 9127 = 440040051."])
    start = [{"role": "user", "content": "What is 48213*9127?"}]
    out = run_tool_loop(gen, start, get_tools("calculator"), max_steps=3)
    assert start == [{"role": "user", "content": "What is 48213*9127?"}]  # the caller's list is not changed
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "assistant"]
    assert out[1]["content"] == "Let me compute."
    assert out[1]["tool_calls"][0]["id"] == "call_0" and out[2]["tool_call_id"] == "call_0"
    assert out[2]["content"] == "440040051"
    assert out[3] == {"role": "assistant", "content": "48213 × 9127 = 440040051."}
    assert seen[1] == out[:3]  # the model saw the tool result before answering


def test_loop_feeds_back_malformed_calls():
    bad = '<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>'
    unknown = '<tool_call>{"name": "weather", "arguments": {}}</tool_call>'
    gen, _ = _scripted([bad, unknown, CALC, "Done."])
    out = run_tool_loop(gen, [{"role": "user", "content": "hi"}], get_tools("calculator"), max_steps=5)
    tool_msgs = [m for m in out if m["role"] == "tool"]
    assert tool_msgs[0]["content"].startswith("Error: malformed tool call: invalid JSON")
    assert tool_msgs[1]["content"].startswith("Error: unknown tool 'weather'")
    assert tool_msgs[2]["content"] == "440040051"
    assert [m["tool_call_id"] for m in tool_msgs] == ["call_0", "call_1", "call_2"]
    # the malformed call keeps the model's own text in the conversation
    assert render_tool_calls_text(out[1]["tool_calls"]) == bad
    assert out[-1] == {"role": "assistant", "content": "Done."}


def test_loop_step_limit():
    gen, seen = _scripted([CALC] * 10)
    out = run_tool_loop(gen, [{"role": "user", "content": "loop forever"}], get_tools("calculator"), max_steps=2)
    assert len(seen) == 3  # two rounds of tools, then one more generation whose calls are refused
    tool_msgs = [m for m in out if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs[:2]] == ["440040051", "440040051"]
    assert tool_msgs[2]["content"].startswith("Error: step limit reached (2 rounds")
    assert out[-1]["role"] == "tool"


def test_loop_reports_each_message():
    got = []
    gen, _ = _scripted([CALC + "\n" + CALC, "ok"])
    out = run_tool_loop(gen, [{"role": "user", "content": "x"}], get_tools("calculator"), on_message=got.append)
    assert got == out[1:] and len([m for m in got if m["role"] == "tool"]) == 2


def test_registry_and_unknown_tool():
    assert set(REGISTRY) == {"calculator", "python", "search"}
    with pytest.raises(LmforgeError, match="unknown tool 'web'"):
        get_tools("calculator,web")
    assert get_tools(None) == [] and get_tools("") == []


def test_document_question_gets_a_cited_snippet(tmp_path):
    """The issue's 'done when': a question about a document in the user's folder, answered with a citation."""
    from lmforge.tools.search import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "lease.md").write_text("# Lease\n\nThe monthly rent is 1200 euros, due on the 5th of each month.\n")
    (docs / "recipes.txt").write_text("Pancakes need flour, eggs and milk.\n")
    db = tmp_path / "index.sqlite"
    build_index(docs, db)
    tools = get_tools("search,calculator", index=str(db))

    def generate(messages):
        last = messages[-1]
        if last["role"] == "user":
            return '<tool_call>{"name": "search", "arguments": {"query": "monthly rent", "k": 2}}</tool_call>'
        return "The rent is 1200 euros a month (lease.md, line 3)."

    out = run_tool_loop(generate, [{"role": "user", "content": "How much is my rent?"}], tools)
    result = out[2]["content"]
    assert result.startswith("[1] lease.md, line 3 (chars ") and "monthly rent is 1200 euros" in result


def test_python_tool_runs_in_the_sandbox():
    from lmforge.tools.sandbox import sandbox_available

    ok, why = sandbox_available()
    if not ok:
        pytest.skip(why)
    (py,) = get_tools("python", python_timeout_s=5)
    r = execute_tool_call({"id": "p", "function": {"name": "python", "arguments": {"code": "print(sum(range(101)))"}}}, [py])
    assert r["content"] == "5050"


def test_chat_renderer_uses_the_canonical_text():
    """lmforge.chat (the lead's renderer) folds tool calls/results through these functions."""
    chat = pytest.importorskip("lmforge.chat")

    class Tok:
        chat_template = None
        bos_token = eos_token = ""

    msgs = [
        {"role": "user", "content": "What is 48213*9127?"},
        {"role": "assistant", "content": None, "tool_calls": parse_tool_calls(CALC)[1]},
        {"role": "tool", "tool_call_id": "call_0", "content": "440040051"},
        {"role": "assistant", "content": "440040051"},
    ]
    text = chat.render_text(Tok(), msgs, tools=get_tools("calculator"))
    assert CALC in text and render_tool_result_text("440040051") in text and "<tools>" in text
