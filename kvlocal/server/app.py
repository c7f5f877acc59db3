"""The HTTP side: an OpenAI-compatible API over a ``SessionPool`` (FastAPI + uvicorn).

    GET  /v1/models              one entry per session file (document, cells, tokens, ratio, method)
    GET  /v1/models/{name}
    POST /v1/chat/completions    the request's ``model`` names a session; ``stream: true`` answers
                                 with server-sent events ending in ``data: [DONE]``

Errors come as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``
with 404 for an unknown session, 400 for a malformed request or a conversation that does not fit.
The engine work runs in worker threads; the pool serves one request per session at a time.
"""

from __future__ import annotations

import json
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import KvlocalError
from ..sessionfile import SessionFileError
from .schemas import ChatRequest, ModelCard, ModelList, error_body
from .sessions import ContextFull, SessionPool, UnknownSession, sampler_for


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=status)


def create_app(pool: SessionPool, *, max_tokens: int = 256) -> FastAPI:
    """The API over ``pool``; ``max_tokens``: the answer length when a request sets none."""
    app = FastAPI(title="kvlocal", summary="compacted KV-cache sessions behind an OpenAI-compatible API")
    app.state.pool = pool

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}",
                      code="invalid_request", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(UnknownSession)
    async def _unknown(request: Request, exc: UnknownSession):
        return _error(404, str(exc), code="model_not_found", param="model")

    @app.exception_handler(ContextFull)
    async def _full(request: Request, exc: ContextFull):
        return _error(400, str(exc), code="context_length_exceeded", param="messages")

    @app.exception_handler(SessionFileError)
    async def _file(request: Request, exc: SessionFileError):  # it was checked at start-up: changed since
        return _error(500, str(exc), "server_error")

    @app.exception_handler(KvlocalError)
    async def _kvlocal(request: Request, exc: KvlocalError):
        return _error(400, str(exc))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(**s.card()) for s in pool.sessions.values()])

    @app.get("/v1/models/{name}")
    async def model(name: str) -> ModelCard:
        return ModelCard(**pool.get(name).card())

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        pool.get(req.model)  # 404 before any waiting
        turns = [m.as_turn() for m in req.messages]
        sampler = sampler_for(req.temperature, req.top_p, req.seed)
        limit = req.limit(max_tokens)
        stamp, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def start():
            served, release = pool.acquire(req.model)
            try:
                return served.generate(turns, max_tokens=limit, sampler=sampler, stops=req.stop, release=release,
                                       logprobs=(req.top_logprobs or 0) if req.logprobs else None)
            except BaseException:
                release()
                raise

        gen = await run_in_threadpool(start)  # the prompt is decoded here: its errors are plain HTTP errors
        if not req.stream:
            text = await run_in_threadpool(gen.text)
            return {"id": cid, "object": "chat.completion", "created": stamp, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": gen.finish_reason, "logprobs": _logprobs(gen, 0)}],
                    "usage": _usage(gen)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        sent = 0  # logprobs entries already sent

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            nonlocal sent
            lps = _logprobs(gen, sent) if "content" in delta and delta["content"] else None
            sent = len(gen.logprobs) if lps is not None else sent
            body = {"id": cid, "object": "chat.completion.chunk", "created": stamp, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lps}]
                    if usage is None else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    piece = await run_in_threadpool(next, gen, None)  # waits for its thread even if cancelled
                    if piece is None:
                        break
                    yield chunk({"content": piece})
                yield chunk({}, gen.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(gen))
                yield "data: [DONE]\n\n"
            finally:  # the client may have gone: the session is handed back all the same
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(gen.close)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _logprobs(gen, start: int) -> dict | None:
    return None if gen.logprobs is None else {"content": gen.logprobs[start:], "refusal": None}


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}
