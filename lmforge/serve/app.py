"""The OpenAI-compatible HTTP API and the web chat page: `create_app(model, tokenizer, cfg)`.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming SSE or
not), `GET /health`, and the chat page at `/` (assets under `/static`, all local). With
`--tools`, the page's own routes `GET /v1/tools` (their schemas) and `POST /v1/tools/run` (one
OpenAI tool call -> the `tool` message; a python program's figures as data: URLs in its extra
`figures` field) let the page run the calls the model writes.
"System 2" (`"system2": {"mode": "vote" | "best_of_n", "n": N}` in a request): the scheduler
samples N choices (choice i seeded with seed + i), `lmforge.align.system2.choose` keeps one, and
the answer is that one choice, with `choice["system2"]` saying how it was chosen. Streaming
sends the role chunk at once and the chosen reply as one chunk when all N samples are done.
Handlers only validate, render the prompt (in a worker thread) and await the scheduler's
events; the model runs in the scheduler's thread (lmforge.serve.scheduler).
Every error answers in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import __version__
from lmforge.engine import SamplingParams, recommended_sampling
from lmforge.errors import LmforgeError
from lmforge.serve.json_mode import key_constraint as json_mode_keys
from lmforge.serve.schemas import (AUTH_ERRORS, GENERATION_ERRORS, MODEL_ERRORS, APIError, ChatCompletionRequest,
                                   CompletionRequest, ToolCall, error_body)
from lmforge.serve.reasoning import ReasoningSplitter, opened, split_reasoning, tag_hold, thinks
from lmforge.serve.scheduler import GenRequest, QueueFull, Scheduler

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
JSON_INSTRUCTION = "Reply with one valid JSON object and nothing else."
# The chat page may talk to this server only: no other origin, no inline script.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: serving beyond this machine is a choice
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    slots: int = 8  # rows of the shared KV cache = requests decoded together
    ctx: int = 2048  # tokens per slot (prompt + reply), at most the model's context
    max_queue: int = 64  # requests waiting for a slot before 429
    max_request_bytes: int = 16 << 20  # request body limit (413 beyond); room for images as data: URLs
    max_tokens_default: int = 1024  # reply budget when a request names none
    prefill_chunk: int = 512  # prompt tokens per prefill forward (bounds others' stall)
    model_id: str | None = None  # name in /v1/models (default: the model's id or file name)
    reward_model: str | None = None  # reward model folder (`lmforge rm`) for requests with system2 mode best_of_n
    tools: list[str] = field(default_factory=list)  # tools the chat page may run here (calculator,python,search); none by default
    allow_image_paths: bool = False  # let image_url parts name files on this machine (file:// URLs or absolute paths); off: data: URLs only


def model_name(model) -> str:
    from lmforge.loading.resolve import DEFAULT_MODEL_ID, default_model_path

    src = getattr(model, "source_path", None)
    if src is None:
        return "lmforge-model"
    default = default_model_path()
    if default is not None and Path(src).resolve() == Path(default).resolve():
        return DEFAULT_MODEL_ID
    p = Path(src)
    return p.stem if p.suffix == ".gguf" else p.name


def _now() -> int:
    return int(time.time())


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream_end(base: dict, include_usage: bool, prompt_tokens: int, completion_tokens: int):
    """The last events of every stream: the usage chunk when the client asked for it, then [DONE]."""
    if include_usage:
        yield _sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens}})
    yield "data: [DONE]\n\n"


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, before any parsing."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send)
        chunks, size = [], 0
        while True:  # read the body ourselves (bounded), then replay it to the app
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._too_large(send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        payload = json.dumps(error_body(f"request body larger than {self.limit} bytes", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def create_app(model, tokenizer, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` through one continuous-batching scheduler."""
    cfg = cfg or ServeConfig()
    if tokenizer is None:
        raise LmforgeError("serving needs a tokenizer: use a model folder or GGUF that has one")
    reward_model = None
    if cfg.reward_model:  # load it now: a wrong path fails at start, not at the first request
        from lmforge.align.system2 import get_reward_model

        reward_model = get_reward_model(cfg.reward_model)
    sched = Scheduler(model, tokenizer, slots=cfg.slots, ctx=cfg.ctx, max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk)
    model_id = cfg.model_id or model_name(model)
    key_digest = hashlib.sha256(cfg.api_key.encode()).digest() if cfg.api_key else None
    created = _now()
    server_tools = _server_tools(cfg.tools)
    tool_slots = asyncio.Semaphore(2)  # each tool run may be a sandbox process: a few at a time

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        # the token-bytes table (logprobs, JSON mode) takes a moment to build: not on the event loop
        await run_in_threadpool(sched.token_bytes)
        yield
        await run_in_threadpool(sched.stop)

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = sched
    app.state.model_id = model_id
    app.state.reward_model = reward_model
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a validator over the whole body (schemas.check_text: text that is not valid Unicode)
        # names the field itself, as OpenAI writes it: messages[0].content
        param = (first.get("ctx") or {}).get("param") or ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif first.get("type") == "missing":
            msg = f"missing required parameter '{param}'"
        else:
            msg = f"invalid parameter '{param}': {msg}" if param else msg
        return JSONResponse(error_body(msg, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        # (a 405 carries the route's `Allow` header, which RFC 9110 requires)
        return JSONResponse(error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)

    # -- auth -----------------------------------------------------------------------------
    def check_key(request: Request):
        if key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare fixed-size digests in constant time: neither content nor length leaks
        given = hashlib.sha256(token.strip().encode()).digest()
        if not (hmac.compare_digest(given, key_digest) and scheme.lower() == "bearer"):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(name: str):
        """Any name reaches the one loaded model (as llama-server and Ollama do): clients that
        insist on a model name of their own work unchanged; responses carry the real id."""
        return model_id

    def model_card():
        # (input_modalities: an extension, as OpenRouter names it; the chat page offers images by it)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "lmforge", "context_length": sched.ctx,
                "input_modalities": ["text", "image"] if _sees(model) else ["text"]}

    # -- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        st = sched.stats
        return {"status": "ok", "model": model_id, **sched.load(), "requests": st.requests, "tokens": st.tokens,
                "decode_steps": st.steps, "decode_rows": st.rows, "mean_batch": round(st.rows / st.steps, 3) if st.steps else 0.0}

    @app.get("/v1/models", dependencies=[Depends(check_key)], responses=AUTH_ERRORS)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)], responses=MODEL_ERRORS)
    async def get_model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)], responses=GENERATION_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prep = await run_in_threadpool(_prepare_chat, body, tokenizer, sched, cfg, reward_model)
        handle = _submit(sched, prep.req)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": _now(), "model": model_id,
                "system_fingerprint": f"lmforge-{__version__}"}
        if prep.system2 is not None:
            pick = _picker(prep.system2, reward_model, tokenizer, prep.messages)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_stream_system2_chat(handle, prep, meta, pick, include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(handle.cancel))
            return await _collect_system2_chat(handle, prep, meta, pick, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            # the background task frees the slots even if the client left before the stream began
            return StreamingResponse(_stream_chat(handle, prep, meta, sched, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(handle.cancel))
        return await _collect_chat(handle, prep, meta, sched, request)

    @app.post("/v1/completions", dependencies=[Depends(check_key)], responses=GENERATION_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        reqs, prompts_text, s2, prompt_lps = await run_in_threadpool(_prepare_completion, body, tokenizer, sched, cfg, reward_model)
        handles = []
        try:
            for r in reqs:
                handles.append(_submit(sched, r))
        except APIError:
            for h in handles:
                h.cancel()
            raise
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": _now(), "model": model_id,
                "system_fingerprint": f"lmforge-{__version__}"}
        echo = prompts_text if body.echo else None
        if s2 is not None:
            picks = [_picker(s2, reward_model, tokenizer, None, r.prompt) for r in reqs]
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_stream_system2_completion(handles, meta, picks, echo, include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(_cancel_all, handles))
            return await _collect_system2_completion(handles, meta, picks, echo, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream_completion(handles, meta, sched, echo, include_usage, prompt_lps), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(_cancel_all, handles))
        return await _collect_completion(handles, meta, sched, echo, request, prompt_lps)

    # The chat page's tools: the page sends `tools` with its requests and runs the calls the model
    # writes here (not OpenAI routes, so not in the OpenAPI document).
    @app.get("/v1/tools", dependencies=[Depends(check_key)], include_in_schema=False)
    async def list_tools():
        return {"object": "list", "data": [t.schema() for t in server_tools.values()]}

    @app.post("/v1/tools/run", dependencies=[Depends(check_key)], include_in_schema=False)
    async def run_tool(call: ToolCall):
        if call.function.name not in server_tools:
            raise APIError(400, f"tool '{call.function.name}' is not enabled on this server (lmforge serve --tools NAME)",
                           param="function.name", code="tool_not_enabled")
        from lmforge.tools.protocol import execute_tool_call

        async with tool_slots:
            # the `tool` message; a python program's figures ride in its extra `figures` field as data: URLs
            return await run_in_threadpool(execute_tool_call, call.model_dump(), server_tools)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without the 422 it lists by default: a body that fails validation is
    answered 400 in OpenAI's error shape (listed per route), never 422."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        app.openapi_schema = doc
    return app.openapi_schema


# -- request preparation (worker thread) -------------------------------------------------

@dataclass
class ChatPrep:
    req: GenRequest
    tools: bool = False  # parse tool calls out of the reply
    forced: str = ""  # assistant text already put into the prompt (tool_choice forcing)
    logprobs: bool = False
    system2: tuple[str, int] | None = None  # (mode, samples) when the request asks for system 2
    messages: list[dict] | None = None  # the conversation as rendered (a reward model scores it)
    # a thinking model's reply: None (the template has no reasoning block), else whether the prompt
    # already opened it (lmforge.serve.reasoning)
    reasoning: bool | None = None


def _sampling(body, max_tokens: int, rec: dict) -> SamplingParams:
    """The request's sampling; what it leaves out comes from `rec`, the model's recommendation
    (`recommended_sampling`: generation_config.json over llama.cpp's defaults), temperature
    falling back to OpenAI's 1.0."""
    temperature = rec.get("temperature", 1.0) if body.temperature is None else body.temperature
    top_p = rec["top_p"] if body.top_p is None else body.top_p
    if top_p < 1e-6 or temperature < 1e-4:
        # only the top token can come out: greedy. (A tiny temperature overflows logits / T, and a
        # top_p that is 0 in float32 would make the engine's nucleus filter drop every token.)
        temperature, top_p = 0.0, 1.0
    seed = None if body.seed is None else body.seed % (1 << 62)
    top_k = rec["top_k"] if body.top_k is None else body.top_k
    min_p = rec["min_p"] if body.min_p is None else body.min_p
    repetition_penalty = rec.get("repetition_penalty", 1.0) if body.repetition_penalty is None else body.repetition_penalty
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=list(body.stop or []))


def _logit_bias(body, vocab: int) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    bias = {int(k): float(v) for k, v in body.logit_bias.items()}
    bad = [k for k in bias if k >= vocab]
    if bad:
        raise APIError(400, f"logit_bias names token {bad[0]}, beyond the vocabulary of {vocab}", param="logit_bias")
    return bias


def _budget(n_prompt: int, max_tokens: int | None, sched: Scheduler, cfg: ServeConfig, param: str) -> int:
    """The reply's token budget; a prompt that does not fit the context is an error, never truncated."""
    ctx = sched.ctx
    if n_prompt + 1 > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} resulted in "
                            f"{n_prompt} tokens. Please reduce the length of the {param}.", param=param, code="context_length_exceeded")
    if max_tokens is None:
        return max(1, min(cfg.max_tokens_default, ctx - n_prompt))
    if n_prompt + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the completion). "
                            f"Please reduce the length of the {param} or completion.", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _sees(model) -> bool:
    """Whether the model takes images (a vision-language model: `lmforge.vision.VLM`)."""
    return hasattr(model, "render_chat")


def _message_dict(m, i: int = 0, sees: bool = False, allow_paths: bool = False) -> dict:
    """One message as the renderers take it; with images (a model that sees), content stays a
    list of parts: text, and images as `{"type": "image_url" (data: URL) | "image" (path)}`."""
    d = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
    if isinstance(content, list):
        kinds = {p.type for p in content} - {"text", "input_text"}
        if kinds and not (sees and kinds == {"image_url"}):
            what = "text and image_url" if sees else "text only"
            raise APIError(400, f"this model reads {what}; content part type '{sorted(kinds)[0]}' is not supported",
                           param=f"messages[{i}].content")
        if kinds:
            content = [_image_part(p, i, allow_paths) if p.type == "image_url" else {"type": "text", "text": p.text or ""}
                       for p in content]
        else:
            content = "".join(p.text or "" for p in content)
    d["content"] = content or ""
    if m.tool_calls:
        d["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in m.tool_calls]
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.name:
        d["name"] = m.name
    return d


def _image_part(p, i: int, allow_paths: bool) -> dict:
    """An image_url part checked for where it points: data: URLs always; files on this machine
    (file:// or an absolute path) only with --allow-image-paths; never the network."""
    url = p.image_url.url.strip() if p.image_url is not None else ""
    param = f"messages[{i}].content"
    if url.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": url}}
    if url.lower().startswith(("http://", "https://", "ftp://")):
        raise APIError(400, "image_url must be a data: URL (lmforge never downloads images)", param=param, code="invalid_image")
    path = url[len("file://"):] if url.startswith("file://") else url
    if not path.startswith("/"):
        raise APIError(400, "image_url must be a data: URL" + (" or an absolute file path" if allow_paths else ""),
                       param=param, code="invalid_image")
    if not allow_paths:
        raise APIError(400, "image_url names a file, which this server does not read (start it with --allow-image-paths); "
                            "send a data: URL", param=param, code="invalid_image")
    return {"type": "image", "path": path}


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], list):
        return [{**messages[0], "content": messages[0]["content"] + [{"type": "text", "text": "\n\n" + text}]}] + messages[1:]
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": (messages[0]["content"] + "\n\n" + text).strip()}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _system2(body, sched: Scheduler, reward_model, params: SamplingParams) -> tuple[str, int] | None:
    """(mode, samples) for a request with `system2`, or None; 400 for what cannot go with it."""
    s2 = body.system2
    if s2 is None:
        return None
    from lmforge.align.system2 import normalize_mode

    mode = normalize_mode(s2.mode)
    if mode == "best_of_n" and reward_model is None:
        raise APIError(400, "system2 mode best_of_n needs a reward model: start the server with --reward-model PATH",
                       param="system2.mode")
    if body.n != 1:
        raise APIError(400, "system2 answers with one choice: n must be 1 (system2.n sets the samples)", param="n")
    if s2.n > sched.slots:
        raise APIError(400, f"system2.n={s2.n} exceeds this server's {sched.slots} slots", param="system2.n")
    if body.logprobs is not None and body.logprobs is not False:  # (completions' logprobs=0 asks for them too)
        raise APIError(400, "logprobs are not available with system2", param="logprobs")
    if params.temperature <= 0:
        raise APIError(400, "system2 needs sampling: temperature (and top_p) must be above 0, or the samples are all the same",
                       param="temperature")
    return mode, s2.n


def _prepare_chat(body: ChatCompletionRequest, tokenizer, sched: Scheduler, cfg: ServeConfig, reward_model=None) -> ChatPrep:
    from lmforge.chat import render_prompt

    sees = _sees(sched.model)
    messages = [_message_dict(m, i, sees, cfg.allow_image_paths) for i, m in enumerate(body.messages)]
    images = sees and any(isinstance(m["content"], list) for m in messages)
    json_mode = False
    if body.response_format is not None and body.response_format.type != "text":
        if body.response_format.type == "json_schema":
            raise APIError(400, "response_format 'json_schema' is not supported; use {'type': 'json_object'} "
                                "(output constrained to one valid JSON object)", param="response_format")
        json_mode = True
        messages = _with_system(messages, JSON_INSTRUCTION)
    tools, forced, json_keys = None, "", None
    choice = body.tool_choice
    if body.tools and choice != "none":
        if json_mode:
            raise APIError(400, "response_format json_object cannot be combined with tools", param="response_format")
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        names = [t["function"]["name"] for t in tools]
        name = None
        if choice == "required":  # with one tool, its name is forced too
            name = names[0] if len(names) == 1 else None
            forced = _tool_call_opening(name)
        elif choice is not None and not isinstance(choice, str):
            name = choice.function.name
            if name not in names:
                raise APIError(400, f"tool_choice names function '{name}', which is not among the tools", param="tool_choice")
            forced = _tool_call_opening(name)
        if name is not None:  # the arguments object may only use the schema's parameter names
            schema = tools[names.index(name)]["function"].get("parameters") or {}
            props = schema.get("properties") if isinstance(schema, dict) else None
            if isinstance(props, dict):
                json_keys = json_mode_keys(2, props)
    elif choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if images and tools is not None:
        raise APIError(400, "tools cannot be combined with images (yet)", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if body.n > sched.slots:
        raise APIError(400, f"n={body.n} exceeds this server's {sched.slots} slots", param="n")
    pixels = None
    try:
        if images:  # the images are opened (and refused, in one line) here, in the worker thread
            p = sched.model.render_chat(tokenizer, messages)
            ids, pixels = p.ids, (p.pixel_values, p.pixel_attention_mask)
        else:
            ids = render_prompt(tokenizer, messages, tools=tools, template_kwargs=body.chat_template_kwargs)
    except LmforgeError as e:
        raise APIError(400, " ".join(str(e).split()), param="messages", code="invalid_image" if images else None) from None
    reasoning = None
    if forced:
        ids = ids + tokenizer.encode(forced)
    elif thinks(tokenizer.chat_template):
        reasoning = opened(tokenizer.decode(ids[-8:]))
    max_tokens = body.max_completion_tokens or body.max_tokens
    budget = _budget(len(ids), max_tokens, sched, cfg, "messages")
    params = _sampling(body, budget, recommended_sampling(sched.model))
    if tools is not None and not body.parallel_tool_calls:
        # end the reply at the first call's closing tag: a small model would otherwise go on to
        # invent the tool's result itself (parallel_tool_calls=true lets it write several calls)
        params.stop = params.stop + [s for s in getattr(_protocol(), "STOP_STRINGS", []) if s not in params.stop]
    s2 = _system2(body, sched, reward_model, params)
    if s2 is not None and tools is not None:
        raise APIError(400, "system2 cannot be combined with tools", param="tools")
    if s2 is not None and images and s2[0] == "best_of_n":
        raise APIError(400, "system2 mode best_of_n cannot score replies about images (the reward model reads text); use vote",
                       param="system2.mode")
    req = GenRequest(
        prompt=ids, params=params, n=body.n if s2 is None else s2[1],
        logprobs=(body.top_logprobs or 0) if body.logprobs else None, json_mode=json_mode or bool(forced), ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        logit_bias=_logit_bias(body, sched.vocab), json_prefix=forced[len(_call_open()):] if forced else "",
        json_keys=json_keys, pixel_values=pixels[0] if pixels else None, pixel_attention_mask=pixels[1] if pixels else None,
        adapter=tools is not None,  # the default model calls tools with lmforge's shipped adapter only
    )
    return ChatPrep(req, tools=tools is not None, forced=forced, logprobs=body.logprobs, system2=s2,
                    messages=messages if s2 is not None else None, reasoning=reasoning)


def _prepare_completion(body: CompletionRequest, tokenizer, sched: Scheduler, cfg: ServeConfig, reward_model=None):
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.n > sched.slots:
        raise APIError(400, f"n={body.n} exceeds this server's {sched.slots} slots", param="n")
    p = body.prompt
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    ids_list, texts = [], []
    for pr in prompts:
        if isinstance(pr, str):
            ids = tokenizer.encode(pr)
            if not ids and tokenizer.bos_id is not None:
                ids = [tokenizer.bos_id]  # an empty prompt starts from BOS, as OpenAI allows ""
            texts.append(pr)
        else:
            bad = [t for t in pr if not 0 <= t < sched.vocab]
            if bad:
                raise APIError(400, f"prompt token {bad[0]} is outside the vocabulary of {sched.vocab}", param="prompt")
            ids = list(pr)
            texts.append(tokenizer.decode(ids))
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        ids_list.append(ids)
    s2 = _system2(body, sched, reward_model, _sampling(body, 1, recommended_sampling(sched.model)))  # (its temperature after the greedy rule)
    n = body.n if s2 is None else s2[1]
    if len(ids_list) * n > sched.slots + sched.max_queue:
        raise APIError(400, f"{len(ids_list)} prompts x n={n} is more than this server takes at once", param="prompt")
    prompt_lps = None
    if body.echo and body.logprobs is not None:  # prompt logprobs, as vLLM gives (lm-eval scores with them)
        if s2 is not None:
            raise APIError(400, "echo with logprobs cannot be combined with system2", param="echo")
        from lmforge.eval.scoring import token_logprobs

        prompt_lps = [token_logprobs(sched.model, ids, body.logprobs) for ids in ids_list]
    reqs = []
    for ids in ids_list:
        budget = _budget(len(ids), body.max_tokens, sched, cfg, "prompt")
        reqs.append(GenRequest(
            prompt=ids, params=_sampling(body, budget, recommended_sampling(sched.model)), n=n, logprobs=body.logprobs, ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=_logit_bias(body, sched.vocab),
        ))
    return reqs, texts, s2, prompt_lps


def _cancel_all(handles) -> None:
    for h in handles:
        h.cancel()


def _submit(sched: Scheduler, req: GenRequest):
    try:
        return sched.submit(req)
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


# -- tool calls ----------------------------------------------------------------------------

def _protocol():
    try:
        from lmforge.tools import protocol
    except ImportError:  # the tool-call format module is not installed: tools cannot be parsed
        return None
    return protocol


def _server_tools(names: list[str] | str | None) -> dict:
    if not names:
        return {}
    from lmforge.tools.protocol import get_tools

    return {t.name: t for t in get_tools(names)}


def _call_open() -> str:
    return getattr(_protocol(), "TOOL_CALL_OPEN", "<tool_call>")


def _tool_call_opening(name: str | None) -> str:
    """Assistant text that forces a tool call (tool_choice required / a named function).

    What follows it is decoded in JSON mode (constrained to one valid JSON object), so a forced
    call always parses; with a name, only the arguments are left to the model.
    """
    if _protocol() is None:
        raise APIError(400, "tool calls are not available in this build", param="tool_choice")
    opening = _call_open()
    if name is None:
        return opening
    return opening + '{"name": ' + json.dumps(name) + ', "arguments": '


def _tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool_calls) parsed out of a finished reply (lmforge.tools.protocol's format)."""
    proto = _protocol()
    if proto is None:
        return text, []
    content, calls, _errors = proto.parse_tool_calls(text)
    out = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = json.dumps(args if args is not None else {}, ensure_ascii=False)
        # ids unique across the conversation (the parser numbers calls within one message)
        out.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": fn.get("name"), "arguments": args}})
    if not out:
        return text, []
    return (content or None), out


class _ToolStreamFilter:
    """Streams plain text until a tool call begins; the call itself is parsed when the reply ends."""

    def __init__(self, forced: str):
        self.tag = _call_open()
        self.text = forced
        self.sent = len(forced)
        self.in_call = bool(forced)

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.in_call:
            return ""
        at = self.text.find(self.tag, self.sent)
        if at != -1:
            self.in_call = True
            out, self.sent = self.text[self.sent:at], at
            return out
        safe = len(self.text) - tag_hold(self.text, self.tag)
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out


# -- responses -----------------------------------------------------------------------------

def _chat_logprob(sched: Scheduler, lp: dict) -> dict:
    text, data = sched.token_text(lp["id"])
    top = []
    for tid, v in lp["top"]:
        t, b = sched.token_text(tid)
        top.append({"token": t, "logprob": v, "bytes": b})
    return {"token": text, "logprob": lp["logprob"], "bytes": data, "top_logprobs": top}


def _raise_event_error(ev):
    if ev.finish == "error":
        raise APIError(500, f"generation failed: {ev.error}", type="server_error")


@asynccontextmanager
async def _watch_disconnect(request: Request, handles):
    """Cancel the handles when the client goes away (non-streaming requests)."""

    async def poll():
        while True:
            if await request.is_disconnected():
                for h in handles:
                    h.cancel()
                return
            await asyncio.sleep(0.25)

    task = asyncio.create_task(poll())
    try:
        yield
    finally:
        task.cancel()
        for h in handles:
            h.cancel()


async def _collect_chat(handle, prep: ChatPrep, meta: dict, sched: Scheduler, request: Request) -> dict:
    n = prep.req.n
    texts = [[prep.forced] for _ in range(n)]
    lps: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion = 0
    async with _watch_disconnect(request, [handle]):
        async for ev in handle.events():
            _raise_event_error(ev)
            texts[ev.index].append(ev.text)
            if ev.logprob is not None:
                lps[ev.index].append(_chat_logprob(sched, ev.logprob))
            if ev.finish is not None:
                finish[ev.index] = ev.finish
                completion += ev.completion_tokens
    choices = []
    for i in range(n):
        thought, text = (None, "".join(texts[i])) if prep.reasoning is None else split_reasoning("".join(texts[i]), prep.reasoning)
        msg = {"role": "assistant", "content": text}
        reason = finish[i]
        if prep.tools:
            content, calls = _tool_calls(text)
            if calls:
                msg = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls"
        if thought is not None:
            msg["reasoning_content"] = thought
        choices.append({"index": i, "message": msg, "logprobs": {"content": lps[i]} if prep.logprobs else None,
                        "finish_reason": reason})
    prompt = len(prep.req.prompt)
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


async def _stream_chat(handle, prep: ChatPrep, meta: dict, sched: Scheduler, include_usage: bool):
    n = prep.req.n
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(i, delta, finish=None, logprobs=None):
        c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**base, "choices": [c]})

    filters = [_ToolStreamFilter(prep.forced) if prep.tools else None for _ in range(n)]
    thinking = [ReasoningSplitter(prep.reasoning) if prep.reasoning is not None else None for _ in range(n)]
    completion = 0
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in handle.events():
            if ev.finish == "error":
                yield _sse(error_body(f"generation failed: {ev.error}", type="server_error"))
                return
            i = ev.index
            text = ev.text
            if thinking[i] is not None:  # the reasoning streams as reasoning_content, the rest as content
                thought, text = thinking[i].feed(text, final=ev.finish is not None)
                if thought:
                    yield chunk(i, {"reasoning_content": thought})
            piece = filters[i].feed(text) if filters[i] else text
            lp = {"content": [_chat_logprob(sched, ev.logprob)]} if ev.logprob is not None else None
            if ev.finish is None:
                if piece or lp:
                    yield chunk(i, {"content": piece}, logprobs=lp)
                continue
            completion += ev.completion_tokens
            reason = ev.finish
            if filters[i] is not None:
                f = filters[i]
                content, calls = _tool_calls(f.text)
                if calls:
                    reason = "tool_calls"
                    if piece:
                        yield chunk(i, {"content": piece})
                    deltas = [{"index": k, **c} for k, c in enumerate(calls)]
                    yield chunk(i, {"tool_calls": deltas})
                else:
                    piece += f.text[f.sent:]  # no call after all: release what was held back
                    f.sent = len(f.text)
            if piece and reason != "tool_calls":
                yield chunk(i, {"content": piece})
            yield chunk(i, {}, finish=reason)
        for event in _stream_end(base, include_usage, len(prep.req.prompt), completion):
            yield event
    finally:  # the client went away (the response task is cancelled) or we are done: free the slots
        handle.cancel()


def _completion_logprobs(sched: Scheduler, entries: list, offset0: int) -> dict:
    """OpenAI's completions `logprobs` object; with echo, the prompt's first token has logprob
    and top_logprobs None (nothing predicts it), as OpenAI and vLLM answer."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset0
    for e in entries:
        t, _ = sched.token_text(e["id"])
        tokens.append(t)
        lps.append(e["logprob"])
        tops.append(None if e["top"] is None else {sched.token_text(tid)[0]: v for tid, v in e["top"]})
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _merged(handles):
    """(handle index, event) from several handles as they come."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k, h):
        async for ev in h.events():
            await q.put((k, ev))
        await q.put((k, None))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            k, ev = await q.get()
            if ev is None:
                left -= 1
                continue
            yield k, ev
    finally:
        for t in tasks:
            t.cancel()


async def _collect_completion(handles, meta: dict, sched: Scheduler, echo, request: Request, prompt_lps=None) -> dict:
    choices = {}
    completion = 0
    async with _watch_disconnect(request, handles):
        async for k, ev in _merged(handles):
            _raise_event_error(ev)
            n = handles[k].req.n
            c = choices.setdefault(k * n + ev.index, {"text": [], "lp": [], "finish": None, "k": k})
            c["text"].append(ev.text)
            if ev.logprob is not None:
                c["lp"].append(ev.logprob)
            if ev.finish is not None:
                c["finish"] = ev.finish
                completion += ev.completion_tokens
    out = []
    for idx in sorted(choices):
        c = choices[idx]
        prefix = echo[c["k"]] if echo else ""
        lp = None
        if handles[c["k"]].req.logprobs is not None:
            lp = _completion_logprobs(sched, (prompt_lps[c["k"]] if prompt_lps else []) + c["lp"], 0 if prompt_lps else len(prefix))
        out.append({"index": idx, "text": prefix + "".join(c["text"]), "logprobs": lp, "finish_reason": c["finish"]})
    prompt = sum(len(h.req.prompt) for h in handles)
    return {**meta, "object": "text_completion", "choices": out,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


async def _stream_completion(handles, meta: dict, sched: Scheduler, echo, include_usage: bool, prompt_lps=None):
    base = {**meta, "object": "text_completion"}
    completion = 0
    offsets: dict[int, int] = {}
    try:
        if echo:
            for k, h in enumerate(handles):
                for i in range(h.req.n):
                    lp = _completion_logprobs(sched, prompt_lps[k], 0) if prompt_lps else None
                    yield _sse({**base, "choices": [{"index": k * h.req.n + i, "text": echo[k], "logprobs": lp, "finish_reason": None}]})
                    if lp:
                        offsets[k * h.req.n + i] = sum(len(t) for t in lp["tokens"])
        async for k, ev in _merged(handles):
            if ev.finish == "error":
                yield _sse(error_body(f"generation failed: {ev.error}", type="server_error"))
                return
            idx = k * handles[k].req.n + ev.index
            lp = None
            if ev.logprob is not None:
                lp = _completion_logprobs(sched, [ev.logprob], offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + len(lp["tokens"][0])
            if ev.text or lp or ev.finish:
                yield _sse({**base, "choices": [{"index": idx, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish}]})
            if ev.finish is not None:
                completion += ev.completion_tokens
        for event in _stream_end(base, include_usage, sum(len(h.req.prompt) for h in handles), completion):
            yield event
    finally:
        for h in handles:
            h.cancel()


# -- system 2: N samples, one answer ----------------------------------------------------------

def _picker(s2: tuple[str, int], reward_model, tokenizer, messages: list[dict] | None, prompt_ids: list[int] | None = None):
    """An async function: the N sample texts -> `lmforge.align.system2.choose`'s dict."""
    from lmforge.align.system2 import choose

    mode = s2[0]

    async def pick(texts: list[str]) -> dict:
        if mode == "vote":
            return choose(mode, texts)
        # the reward model runs in a worker thread, beside the scheduler's
        try:
            return await run_in_threadpool(choose, mode, texts, reward_model=reward_model, messages=messages,
                                           tokenizer=tokenizer, prompt_ids=prompt_ids)
        except LmforgeError as e:
            raise APIError(500, f"scoring the samples failed: {e}", type="server_error") from None

    pick.mode = mode
    return pick


async def _gather(handle) -> tuple[list[str], list[str | None], int]:
    """(text, finish reason) of every choice of a request once all are done, and the tokens used."""
    n = handle.req.n
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion = 0
    async for ev in handle.events():
        _raise_event_error(ev)
        texts[ev.index].append(ev.text)
        if ev.finish is not None:
            finish[ev.index] = ev.finish
            completion += ev.completion_tokens
    return ["".join(t) for t in texts], finish, completion


def _system2_info(out: dict, mode: str) -> dict:
    """How the answer was chosen: mode, n, the winner's index, every sample, scores or answers and votes."""
    from lmforge.align.system2 import details

    return {"mode": mode, "n": len(out["candidates"]), **details(out)}


async def _choose(handle, pick) -> tuple[dict, str | None, int]:
    texts, finish, completion = await _gather(handle)
    out = await pick(texts)
    return out, finish[out["index"]], completion


async def _collect_system2_chat(handle, prep: ChatPrep, meta: dict, pick, request: Request) -> dict:
    async with _watch_disconnect(request, [handle]):
        out, reason, completion = await _choose(handle, pick)
    choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]}, "logprobs": None,
              "finish_reason": reason, "system2": _system2_info(out, pick.mode)}
    prompt = len(prep.req.prompt)
    return {**meta, "object": "chat.completion", "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


async def _stream_system2_chat(handle, prep: ChatPrep, meta: dict, pick, include_usage: bool):
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(delta, finish=None, **extra):
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            out, reason, completion = await _choose(handle, pick)
        except APIError as e:
            yield _sse(e.body())
            return
        if out["text"]:
            yield chunk({"content": out["text"]})
        yield chunk({}, finish=reason, system2=_system2_info(out, pick.mode))
        for event in _stream_end(base, include_usage, len(prep.req.prompt), completion):
            yield event
    finally:
        handle.cancel()


async def _collect_system2_completion(handles, meta: dict, picks, echo, request: Request) -> dict:
    async with _watch_disconnect(request, handles):
        results = await asyncio.gather(*(_choose(h, p) for h, p in zip(handles, picks)))
    choices = []
    for k, (out, reason, _) in enumerate(results):
        choices.append({"index": k, "text": (echo[k] if echo else "") + out["text"], "logprobs": None,
                        "finish_reason": reason, "system2": _system2_info(out, picks[k].mode)})
    prompt = sum(len(h.req.prompt) for h in handles)
    completion = sum(c for _, _, c in results)
    return {**meta, "object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


async def _stream_system2_completion(handles, meta: dict, picks, echo, include_usage: bool):
    base = {**meta, "object": "text_completion"}
    completion = 0
    try:
        async def one(k):
            return k, await _choose(handles[k], picks[k])

        tasks = [asyncio.ensure_future(one(k)) for k in range(len(handles))]
        try:
            for fut in asyncio.as_completed(tasks):  # each prompt's answer as soon as it is chosen
                try:
                    k, (out, reason, used) = await fut
                except APIError as e:
                    yield _sse(e.body())
                    return
                completion += used
                yield _sse({**base, "choices": [{"index": k, "text": (echo[k] if echo else "") + out["text"], "logprobs": None,
                                                 "finish_reason": reason, "system2": _system2_info(out, picks[k].mode)}]})
        finally:
            for t in tasks:
                t.cancel()
        for event in _stream_end(base, include_usage, sum(len(h.req.prompt) for h in handles), completion):
            yield event
    finally:
        for h in handles:
            h.cancel()
