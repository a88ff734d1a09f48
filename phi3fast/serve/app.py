"""The HTTP layer (Starlette): OpenAI-compatible routes over a Service, the error shape, auth, body limits,
server-sent events, and the chat page's static files.

Routes: GET /health · GET /v1/models · POST /v1/chat/completions · POST /v1/embeddings · POST /v1/adapters ·
DELETE /v1/adapters/{name} · GET /v1/indexes (the page's index list) · GET / (the chat page) · /page/* (its files).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from phi3fast.errors import Phi3FastError
from phi3fast.serve.errors import APIError, bad_request
from phi3fast.serve.schemas import adapter_request, chat_request, embedding_request, not_found, parse_json
from phi3fast.serve.service import ChatResult, Service

PAGE = Path(__file__).resolve().parent / "page"
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def create_app(
    service: Service, *, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY
) -> Starlette:
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
            )

    async def read_json(request: Request) -> dict:
        check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the body is larger than {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise APIError(413, f"the body is larger than {max_body} bytes")
        return parse_json(bytes(body))

    async def health(request: Request) -> Response:
        running, waiting = service.engine.load()
        return JSONResponse(
            {"status": "ok", "model": service.base_name, "running": running, "queued": waiting}
        )

    async def models(request: Request) -> Response:
        check_key(request)
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "phi3fast"}
            for n in service.model_names()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def indexes(request: Request) -> Response:
        check_key(request)
        return JSONResponse(
            {"object": "list", "data": [{"id": n, "object": "index"} for n in service.indexes.names()]}
        )

    async def chat(request: Request) -> Response:
        req = chat_request(await read_json(request))
        result, pieces = await service.chat(req)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            events = _sse(cid, created, result, pieces, req.include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        await _unless_disconnected(request, _drain(pieces))
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": result.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": result.usage,
        }
        if result.sources is not None:
            body["sources"] = result.sources
        return JSONResponse(body)

    async def embeddings(request: Request) -> Response:
        req = embedding_request(await read_json(request))
        if req.model not in service.indexes:
            raise not_found("index", req.model, "model", service.indexes.names())
        vectors, tokens = await asyncio.to_thread(service.indexes.embed, req.model, req.inputs)
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.base64 else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": req.model, "usage": usage})

    async def add_adapter(request: Request) -> Response:
        req = adapter_request(await read_json(request))
        try:
            adapter = await asyncio.to_thread(service.add_adapter, req.name, req.path)
        except Phi3FastError as e:
            raise bad_request(str(e), "path") from None
        entry = {"id": adapter.name, "object": "model", "created": int(time.time()), "owned_by": "phi3fast"}
        return JSONResponse({**entry, "path": adapter.path, "rank": adapter.rank}, status_code=201)

    async def delete_adapter(request: Request) -> Response:
        check_key(request)
        name = request.path_params["name"]
        if service.bank.remove(name) is None:
            raise not_found("adapter", name, "name", service.bank.names())
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    async def page(request: Request) -> Response:
        return FileResponse(PAGE / "index.html")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return APIError(exc.status_code, str(exc.detail)).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:
            # uvicorn calls this after it has drained the requests in flight (SIGTERM: graceful shutdown).
            await asyncio.to_thread(service.engine.stop)

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/indexes", indexes),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/adapters", add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
        Mount("/page", StaticFiles(directory=PAGE), name="page"),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


async def _drain(pieces: AsyncIterator[str]) -> None:
    async for _ in pieces:
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, None]) -> None:
    """Run work, cancelling it if the client hangs up first (its sequence then leaves the batch)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise APIError(499, "the client closed the connection")
    task.result()


async def _sse(
    cid: str, created: int, result: ChatResult, pieces: AsyncIterator[str], include_usage: bool
) -> AsyncIterator[str]:
    """chat.completion.chunk events, then `data: [DONE]`. The last chunk carries finish_reason (and the RAG
    sources, with the cited ones marked); an error after the stream started is sent as an error event."""

    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": result.model}
        c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return f"data: {json.dumps({**c, **extra}, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in pieces:
            yield chunk({"content": piece})
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    extra = {"sources": result.sources} if result.sources is not None else {}
    yield chunk({}, result.finish_reason, **extra)
    if include_usage:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": result.model}
        yield f"data: {json.dumps({**c, 'choices': [], 'usage': result.usage})}\n\n"
    yield "data: [DONE]\n\n"
