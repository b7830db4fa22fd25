"""The HTTP side: an OpenAI-compatible FastAPI app over an :class:`~moekit.serve.engine.Engine`.

Every request body is read (with a size limit), parsed and validated here, so that any bad input is a
4xx with an OpenAI-style error object (``error.message``, ``type``, ``param``) and never reaches the
engine. The model loads on a background thread after the server starts: ``/health`` answers 503 until
it is ready. A streamed request waits for its first token before sending headers, so a request that
fails in prefill still gets a 500; a client that goes away is aborted in the engine at once.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.serve import protocol as P
from moekit.serve.engine import Engine
from moekit.serve.metrics import ServeMetrics
from moekit.serve.request import EngineStopped, Event, SamplingParams
from moekit.serve.text import ChatTemplate, TemplateError

__all__ = ["Loaded", "ServeState", "build_app"]

log = logging.getLogger("moekit.serve")


@dataclass
class Loaded:
    """What loading produced: the running engine, the chat template, and how to encode text."""

    engine: Engine
    template: ChatTemplate
    encode: Callable[[str], list[int]]
    encode_chat: Callable[[str], list[int]]
    vocab_size: int
    offloaded: Any = None  # moekit.infer.offload.OffloadedModel when the routed experts stay on disk
    trace: str | None = None  # where the offloaded model's expert trace goes at shutdown

    def close(self) -> None:
        """Stop the engine, then the expert cache's loader (after saving its trace, if asked)."""
        self.engine.shutdown()
        if self.offloaded is not None:
            if self.trace:
                self.offloaded.save_trace(self.trace)
            self.offloaded.close()


@dataclass
class ServeState:
    model_name: str
    metrics: ServeMetrics
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    loaded: Loaded | None = None
    load_error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), status_code=self.status)


class _Guard:
    """ASGI middleware: the bearer token on /v1 routes, and a declared body size over the limit."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            err = None
            if self.state.api_key is not None and scope["path"].startswith("/v1"):
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.state.api_key}".encode()):
                    err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                   type_="authentication_error", code="invalid_api_key")
            length = headers.get("content-length", "")
            if err is None and length.isdigit() and int(length) > self.state.max_body_bytes:
                err = ApiError(413, f"request body of {length} bytes is over the limit of "
                               f"{self.state.max_body_bytes} bytes")
            if err is not None:
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_json(request: Request, limit: int) -> object:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _validate(model, data: object):
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None


def _param(loc: tuple) -> str | None:
    """The field a validation error is about ("messages.0.role"), without pydantic's union-member tags."""
    known = set(P.ChatMessage.model_fields) | set(P.StreamOptions.model_fields)
    parts = [str(loc[0])] if loc else []
    for x in loc[1:]:
        if not (isinstance(x, int) or x in known):
            break
        parts.append(str(x))
    return ".".join(parts) or None


def _params(req, n_prompt: int, max_len: int, default_max: int | None) -> SamplingParams:
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    room = max_len - n_prompt
    if room < 1:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; the model's context is {max_len} tokens",
                       "prompt" if hasattr(req, "prompt") else "messages")
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    if max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceeds the model's "
                       f"context of {max_len} tokens (at most {room} here)", "max_tokens")
    return SamplingParams(max_tokens, req.temperature, None if req.top_p >= 1 else req.top_p,
                          req.top_k_or_none(), req.seed, req.stop_list(), req.ignore_eos)


def build_app(state: ServeState, load: Callable[[], Loaded], *, on_load_error: Callable[[str], None] | None = None
              ) -> FastAPI:
    """The app. ``load`` runs on a background thread at startup; its Loaded engine is shut down at exit."""
    app = FastAPI(title="moekit serve", lifespan=_lifespan(state, load, on_load_error), docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, state=state)
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_completion_routes(app, state)
    return app


def _run_load(state: ServeState, load: Callable[[], Loaded],
              on_load_error: Callable[[str], None] | None) -> None:
    """Load into ``state``; a failure is kept on ``state.load_error``. ``state.ready`` is set either way."""
    try:
        state.loaded = load()
    except Exception as e:  # reported on /health and by the CLI
        log.exception("loading the model failed")
        state.load_error = f"{type(e).__name__}: {e}"
        if on_load_error is not None:
            on_load_error(state.load_error)
    finally:
        state.ready.set()


def _lifespan(state: ServeState, load: Callable[[], Loaded], on_load_error: Callable[[str], None] | None):
    """Start loading on a background thread; shut the loaded engine down at exit."""

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_run_load, args=(state, load, on_load_error), name="moekit-load",
                         daemon=True).start()
        yield
        if state.loaded is not None:
            await asyncio.to_thread(state.loaded.close)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as an OpenAI-style error object."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal server error: {type(exc).__name__}", type_="server_error").response()


def _ready(state: ServeState) -> Loaded:
    if state.loaded is None or state.loaded.engine.failure:
        raise ApiError(503, state.load_error or (state.loaded and state.loaded.engine.failure)
                       or "the model is still loading", type_="server_error")
    return state.loaded


def _check_model(state: ServeState, req) -> None:
    if req.model is not None and req.model != state.model_name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                       f"{state.model_name!r}", "model", code="model_not_found")


def _add_info_routes(app: FastAPI, state: ServeState) -> None:
    """/health, /metrics, /v1/models and /v1/experts/stats."""

    @app.get("/health")
    async def health():
        if state.loaded is None or state.loaded.engine.failure:
            failed = state.load_error or (state.loaded and state.loaded.engine.failure)
            return JSONResponse({"status": "failed" if failed else "loading", "error": failed or None},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return P.model_list(state.model_name, _ready(state).engine.max_seq_len)

    @app.get("/v1/experts/stats")
    async def expert_stats():
        lm = _ready(state)
        experts = lm.engine.experts
        out = (experts.snapshot() if experts is not None else
               {"num_experts": 0, "layers": {}, "note": "dense model, or --stats-interval 0"})
        if lm.offloaded is not None:  # hits / misses / bytes read of the expert cache, per layer too
            out["cache"] = lm.offloaded.stats()
        return out


def _add_completion_routes(app: FastAPI, state: ServeState) -> None:
    """/v1/completions and /v1/chat/completions: 1. read and validate the body, 2. check the model is loaded
    and is the one asked for, 3. encode the prompt, 4. bound the sampling parameters, 5. serve."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _validate(P.CompletionRequest, await _read_json(request, state.max_body_bytes))
        lm = _ready(state)
        _check_model(state, req)
        ids = _completion_ids(req, lm)
        params = _params(req, len(ids), lm.engine.max_seq_len, 16)
        return await _serve(request, lm.engine, state, req, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _validate(P.ChatCompletionRequest, await _read_json(request, state.max_body_bytes))
        lm = _ready(state)
        _check_model(state, req)
        ids = _chat_ids(req, lm)
        params = _params(req, len(ids), lm.engine.max_seq_len, None)
        return await _serve(request, lm.engine, state, req, ids, params, chat=True)


def _completion_ids(req: P.CompletionRequest, lm: Loaded) -> list[int]:
    """The prompt's token ids: text encoded, or ids checked against the vocabulary."""
    if isinstance(req.prompt, str):
        ids = lm.encode(req.prompt)
    else:
        ids = list(req.prompt)
        bad = [t for t in ids if not 0 <= t < lm.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {lm.vocab_size})",
                           "prompt")
    if not ids:
        raise ApiError(400, "the prompt encodes to no tokens", "prompt")
    return ids


def _chat_ids(req: P.ChatCompletionRequest, lm: Loaded) -> list[int]:
    """The messages rendered through the chat template and encoded."""
    try:
        messages = [m.model_dump() | {"content": m.text()} for m in req.messages]
        prompt = lm.template.render(messages)
    except (TemplateError, ValueError) as e:
        raise ApiError(400, str(e), "messages") from None
    ids = lm.encode_chat(prompt)
    if not ids:
        raise ApiError(400, "the chat prompt encodes to no tokens", "messages")
    return ids


async def _serve(request: Request, engine: Engine, state: ServeState, req, ids: list[int],
                 params: SamplingParams, *, chat: bool):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(ev: Event) -> None:  # engine thread -> this request's event loop
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    try:
        seq_id = engine.submit(ids, params, sink)
    except EngineStopped as e:
        raise ApiError(503, str(e), type_="server_error") from None
    except ValueError as e:
        raise ApiError(400, str(e), "max_tokens") from None
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    try:
        first = await _next_event(request, queue)
    except BaseException:
        engine.abort(seq_id)
        raise
    if first is None:  # the client went away before the first token
        engine.abort(seq_id)
        return Response(status_code=499)
    if first.kind == "error":
        return ApiError(500, first.message, type_="server_error").response()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(engine, seq_id, queue, first, rid, state.model_name, chat, include_usage,
                       req.return_token_ids)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, token_ids, ev = [], [], first
    while True:
        if ev.kind == "error":
            return ApiError(500, ev.message, type_="server_error").response()
        if ev.kind == "finish":
            break
        text.append(ev.text)
        token_ids.append(ev.token_id)
        ev = await _next_event(request, queue)
        if ev is None:
            engine.abort(seq_id)
            return Response(status_code=499)
    make = P.chat_response if chat else P.completion_response
    out_ids = token_ids[: ev.completion_tokens] if req.return_token_ids else None
    return make(rid, state.model_name, "".join(text), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens,
                out_ids)


async def _next_event(request: Request, queue: asyncio.Queue, poll: float = 0.5) -> Event | None:
    """The next engine event, or None once the client has disconnected (checked every ``poll`` s)."""
    if not queue.empty():  # the common case while streaming: no timer, no task (wait_for makes both)
        return queue.get_nowait()
    while True:
        try:
            return await asyncio.wait_for(queue.get(), poll)
        except TimeoutError:
            if await request.is_disconnected():
                return None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, seq_id: int, queue: asyncio.Queue, first: Event, rid: str, model: str,
                  chat: bool, include_usage: bool, with_ids: bool) -> AsyncIterator[str]:
    """SSE chunks; on a disconnect the response task is cancelled and ``finally`` aborts the request.
    A token whose text is still held back sends no chunk, unless ``with_ids``: then every token's chunk has
    its id (and the text it completes, or "")."""
    finished, pending, sent = False, [], 0

    def chunk(text: str | None, finish: str | None, usage=None, limit: int | None = None) -> str:
        nonlocal sent
        ids = None
        if with_ids and text is not None:
            ids = pending[: None if limit is None else max(0, limit - sent)]
            sent += len(ids)
            pending.clear()
        if chat:
            delta = None if text is None else ({"content": text} if text else {})
            return _sse(P.chat_chunk(rid, model, delta, finish, usage, ids))
        return _sse(P.completion_chunk(rid, model, text, finish, usage, ids))

    try:
        if chat:
            yield _sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        ev = first
        while True:
            if ev.kind == "error":
                yield _sse(P.error_body(ev.message, "server_error"))
                break
            if ev.kind == "finish":
                finished = True
                yield chunk("", ev.finish_reason, limit=ev.completion_tokens)  # the eos id is not returned
                if include_usage:
                    yield chunk(None, None, (ev.prompt_tokens, ev.completion_tokens))
                break
            pending.append(ev.token_id)
            if ev.text or with_ids:  # with ids, a chunk per token (as vLLM's): its text may still be held back
                yield chunk(ev.text, None)
            ev = await queue.get()
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.abort(seq_id)
