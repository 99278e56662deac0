"""Request bodies of the OpenAI-compatible API (pydantic), their size limits, and the error shape.

Fields OpenAI defines and lmforge cannot honour are refused with a 400 naming them rather than
silently ignored when ignoring them would change the answer (`response_format: json_schema`);
fields that only tune bookkeeping (`user`, `metadata`, `store`...) are accepted and ignored.
Extensions beyond OpenAI (as vLLM names them): `top_k`, `repetition_penalty`, `ignore_eos`; and
lmforge's own `system2: {"mode": "vote" | "best_of_n", "n": N}` (sample N, answer with one).
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lmforge.tokenizer import unicode_problem

# Limits that bound the work one request can ask for; the byte limit of the body is the server's.
MAX_MESSAGES = 512
MAX_TEXT = 1_000_000  # characters in one message or prompt
MAX_STOP = 4  # as OpenAI
MAX_STOP_LEN = 256
MAX_N = 16
MAX_TOOLS = 64
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_LOGIT_BIAS = 300  # as OpenAI
MAX_PROMPTS = 32
SEED_MAX = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _param(path) -> str | None:
    """('messages', 0, 'content') as OpenAI names it: messages[0].content."""
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out or None


def check_text(body: Any) -> None:
    """Every string of a request body (values and keys, at any depth) must be valid Unicode.

    JSON lets a body carry a lone surrogate ("\\ud800"), which no tokenizer, UTF-8 encoder or
    JSON response can take; refusing it here, before any field is read, covers every field that
    carries text (messages, prompt, stop, tool arguments, ...) on every endpoint, streaming or
    not. The error (type "invalid_unicode") names the field in its context's `param`."""
    stack = [(body, ())]
    while stack:  # iterative: a deeply nested body must not exhaust the call stack
        v, path = stack.pop()
        if isinstance(v, str):
            bad, where = unicode_problem(v), path
        elif isinstance(v, dict):
            bad = None
            for k in v:
                if isinstance(k, str) and unicode_problem(k) is not None:
                    bad, where = f"{unicode_problem(k)} of a key", path
                    break
            # (children pushed last-first, so the first bad string in the body is the one named)
            stack.extend((x, path + (k,)) for k, x in reversed(v.items()) if isinstance(x, (str, dict, list)))
        elif isinstance(v, list):
            bad = None
            stack.extend((v[i], path + (i,)) for i in range(len(v) - 1, -1, -1) if isinstance(v[i], (str, dict, list)))
        else:
            bad = None
        if bad is not None:
            param = _param(where)
            raise PydanticCustomError("invalid_unicode", "text is not valid Unicode: {problem}",
                                      {"problem": bad, "param": param})


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=MAX_TEXT)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallFunction(_Body):
    name: str = Field(max_length=128)
    arguments: str = Field(default="", max_length=MAX_TEXT)


class ToolCall(_Body):
    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Body):
    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=MAX_TEXT)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = Field(default=None)
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)

    @field_validator("content")
    @classmethod
    def _size(cls, v):
        if isinstance(v, str) and len(v) > MAX_TEXT:
            raise ValueError(f"content longer than {MAX_TEXT} characters")
        if isinstance(v, list) and len(v) > 256:
            raise ValueError("more than 256 content parts")
        return v


class NamedFunction(_Body):
    name: str = Field(max_length=128)


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class System2(_Body):
    """Sample `n` replies and answer with one: the majority answer (vote) or the reply a reward
    model scores highest (best_of_n, needs the server's --reward-model). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["vote", "best_of_n", "best-of-n"]
    n: int = Field(default=8, ge=1, le=MAX_N)


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-SEED_MAX - 1, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    user: str | None = Field(default=None, max_length=256)
    system2: System2 | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        check_text(data)
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(len(s) > MAX_STOP_LEN for s in v):
            raise ValueError(f"stop sequences are at most {MAX_STOP_LEN} characters")
        return [s for s in v if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for k, b in v.items():
            if not k.strip().isdigit() or len(k) > 12:
                raise ValueError(f"logit_bias keys are token ids; got {k[:20]!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1, le=10_000_000)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)  # as OpenAI's legacy endpoint
    echo: bool = False
    suffix: str | None = Field(default=None, max_length=MAX_TEXT)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) == 0:
                raise ValueError("prompt must not be empty")
            if len(v) > (MAX_TEXT if isinstance(v[0], int) else MAX_PROMPTS):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if isinstance(v[0], list) and any(len(p) > MAX_TEXT for p in v):
                raise ValueError("token prompt too long")
        elif len(v) > MAX_TEXT:
            raise ValueError(f"prompt longer than {MAX_TEXT} characters")
        return v


# -- errors -------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every non-200 answer of the API is one."""

    error: ErrorDetail


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# What each kind of route can answer besides 200, for the OpenAPI document.
AUTH_ERRORS = {401: _error("missing or wrong API key (when the server has one)")}
GENERATION_ERRORS = {
    400: _error("invalid request: a bad field (named in error.param), a prompt over the context, text that is not valid Unicode"),
    **AUTH_ERRORS,
    413: _error("request body over the server's size limit"),
    429: _error("the queue is full: retry later"),
    500: _error("generation failed"),
}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
