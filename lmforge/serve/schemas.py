"""Request bodies of the OpenAI-compatible API (pydantic), their size limits, and the error shape.

Fields OpenAI defines and lmforge cannot honour are refused with a 400 naming them rather than
silently ignored when ignoring them would change the answer (`response_format: json_schema`);
fields that only tune bookkeeping (`user`, `metadata`, `store`...) are accepted and ignored.
Extensions beyond OpenAI (as vLLM names them): `top_k`, `repetition_penalty`, `ignore_eos`; and
lmforge's own `system2: {"mode": "vote" | "best_of_n", "n": N}` (sample N, answer with one).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
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

# Limits go into the types rather than validators, so that the OpenAPI document states them: a
# client (or schemathesis) reading it learns which bodies the server takes.


def _whole(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _int(ge: int | None = None, le: int | None = None):
    """An integer as JSON Schema has it: 2.0 (a number with no fraction) is one, which strict
    pydantic would refuse. (The bounds go before the validator, or pydantic writes them into the
    OpenAPI document as "ge"/"le", which JSON Schema does not know.)"""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_whole)]


def _text(limit: int):
    return Annotated[str, Field(max_length=limit)]


def _list(item, *, min_length: int = 0, max_length: int):
    return Annotated[list[item], Field(min_length=min_length, max_length=max_length)]


TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,12}$")]  # (logit_bias keys; str.isdigit would take "²")
LogitBias = Annotated[dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]],
                      Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False})]


class _Body(BaseModel):
    # strict: a field takes the JSON type the OpenAPI document gives it, as OpenAI's API does
    # (lax pydantic would also take "stream": 0, "n": "2" or "echo": "yes")
    model_config = ConfigDict(extra="ignore", strict=True)


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


MAX_IMAGE_URL = 64 << 20  # characters of one image_url (a data: URL); the body limit bounds it first


class ImageURL(_Body):
    url: str = Field(max_length=MAX_IMAGE_URL)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; a VLM's preprocessing decides the tiles


class ContentPart(_Body):
    """A text part, or (for a vision-language model) OpenAI's image part `{"type": "image_url",
    "image_url": {"url": "data:image/png;base64,..."}}`."""

    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=MAX_TEXT)
    image_url: ImageURL | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[_text(MAX_TEXT), _list(ContentPart, max_length=256), None] = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)


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
    n: _int(1, MAX_N) = 8


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: _int(0, 1_000_000) | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: _int(1, MAX_N) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[_text(MAX_STOP_LEN), _list(_text(MAX_STOP_LEN), max_length=MAX_STOP), None] = None
    # any integer (the sampler takes it modulo 2**62): a bound at 2**63 - 1 is not even exact in the
    # doubles many JSON clients hold numbers in, so a client's own int64 could land beyond it
    seed: _int() | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # (above 0 is not enough: dividing a logit by 1e-40 is inf in float32, and sampling fails)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    logit_bias: LogitBias | None = None
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
        return [s for s in ([v] if isinstance(v, str) else v) if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: _int(1, 10_000_000) | None = None
    max_completion_tokens: _int(1, 10_000_000) | None = None
    logprobs: bool = False
    top_logprobs: _int(0, MAX_TOP_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    # (vLLM's and llama-server's field) extra variables for the model's chat template: Qwen3's enable_thinking
    chat_template_kwargs: dict[_text(64), Union[bool, _int(), float, _text(1024), None]] | None = Field(default=None, max_length=16)


class CompletionRequest(_Sampling):
    prompt: Union[_text(MAX_TEXT), _list(_text(MAX_TEXT), min_length=1, max_length=MAX_PROMPTS),
                  _list(_int(), min_length=1, max_length=MAX_TEXT),
                  _list(_list(_int(), min_length=1, max_length=MAX_TEXT), min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: _int(1, 10_000_000) | None = 16  # OpenAI's default for completions
    logprobs: _int(0, 5) | None = None  # as OpenAI's legacy endpoint
    echo: bool = False
    suffix: str | None = Field(default=None, max_length=MAX_TEXT)
    best_of: _int(1, MAX_N) | None = None


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
MODEL_ERRORS = {**AUTH_ERRORS, 404: _error("a name the route cannot hold (one with a line break)")}
GENERATION_ERRORS = {
    # FastAPI adds application/json to this 200. Before OpenAPI 3.2 (itemSchema), the schema of an
    # event stream describes one event.
    200: {"description": "the completion as JSON, or with \"stream\": true its chunks as server-sent events "
                         "(each event's data one chunk as JSON, the last event's `[DONE]`)",
          "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                       "properties": {"data": {"type": "string"}}}}}},
    400: _error("invalid request: a bad field (named in error.param), a prompt over the context, text that is not valid Unicode"),
    **AUTH_ERRORS,
    413: _error("request body over the server's size limit"),
    429: _error("the queue is full: retry later"),
    500: _error("generation failed"),
}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
