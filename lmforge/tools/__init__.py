"""Tools a model can call: calculator, Python sandbox, local document search.

The format of tool calls and results, the registry and the tool loop live in
`lmforge.tools.protocol` (see its docstring); the tools in `calculator`, `sandbox` (threat model:
docs/SANDBOX.md) and `search`. Importing this package loads only the protocol (standard library).
"""
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

__all__ = [
    "REGISTRY",
    "Tool",
    "execute_tool_call",
    "get_tools",
    "parse_tool_calls",
    "render_tool_calls_text",
    "render_tool_result_text",
    "render_tools_system_prompt",
    "run_tool_loop",
    "tool_schemas",
]
