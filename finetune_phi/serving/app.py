"""The local scoring endpoint: Azure ML's online-endpoint protocol on 127.0.0.1, plus an OpenAI-compatible API.

Several deployments (name -> model) share one endpoint; the `azureml-model-deployment` header (or
the OpenAI `model` field) pins one, otherwise traffic weights choose. Each deployment's model runs in
an engine (engines/: continuous batching by default), which decodes its concurrent requests together.
Request limits use Azure ML's names. Models load in the background: /health answers at once, /ready
turns 200 when every deployment is loaded.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request) at runtime
import asyncio
import json
import logging
import threading
from contextlib import aclosing, asynccontextmanager

from . import keys, openai_api
from .azure_protocol import encode_all, parse_score_request, response_body, score_rows
from .endpoint import Endpoint
from .engines.base import DEFAULT_ENGINE
from .generation import Completion, DecodeRequest
from .options import HOST, PORT, Limits
from .request import RequestError, parse_json


log = logging.getLogger("finetune_phi.serve")


def create_app(endpoint: Endpoint, load_in_background: bool = True):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.requests import ClientDisconnect

    @asynccontextmanager
    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=endpoint.load, name="load-models", daemon=True).start()
        yield
        for d in endpoint.deployments.values():
            if d.engine:
                d.engine.close()

    app = FastAPI(title="finetune-phi endpoint", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, code: str, message: str, headers: dict | None = None):
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not keys.matches(token.strip(), endpoint.api_key):
                return error(
                    401,
                    "unauthorized",
                    "missing or wrong key: send 'Authorization: Bearer <key>'",
                    {"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    app.add_middleware(_BugsAsJSON, error=error)  # added last: it wraps auth and every route

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return error(e.status, e.code, e.message, {"Retry-After": "1"} if e.status == 429 else None)

    async def json_body(request: Request):
        limit = endpoint.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refuse before reading a byte of it
            raise RequestError(413, "body_too_large", f"body has {int(declared)} bytes; the limit is {limit}")
        body = bytearray()
        try:
            async for chunk in request.stream():  # a chunked body has no length up front: stop once past the limit
                body += chunk
                if len(body) > limit:
                    raise RequestError(
                        413, "body_too_large", f"body has more than {limit} bytes; the limit is {limit}"
                    )
        except ClientDisconnect:  # the caller's doing, not a server bug; nobody is left to read the answer
            raise RequestError(
                400, "incomplete_body", "the client closed the connection before the body ended"
            ) from None
        return parse_json(bytes(body))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if endpoint.loaded.is_set():
            return {"status": "ready", "deployments": list(endpoint.deployments)}
        if endpoint.load_error:
            return error(503, "load_failed", endpoint.load_error)
        return error(503, "not_ready", "models are still loading")

    @app.post("/score")
    async def score(request: Request):
        shape, inputs, params = parse_score_request(await json_body(request), endpoint.limits.max_new_tokens_cap)
        deployment = endpoint.choose(request.headers.get("azureml-model-deployment"))
        prompts, rows = score_rows(deployment.engine, shape, inputs, params)
        endpoint.enter()
        try:
            completions = await _while_connected(request, endpoint.generate(deployment, rows))
        finally:
            endpoint.leave()
        return JSONResponse(
            response_body(shape, prompts, completions, params), headers={"azureml-model-deployment": deployment.name}
        )

    @app.get("/v1/models")
    async def list_models():
        return openai_api.models_body(list(endpoint.deployments))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = openai_api.ChatRequest.parse(await json_body(request), endpoint.limits.max_new_tokens_cap)
        deployment = endpoint.choose(chat.model or request.headers.get("azureml-model-deployment"))
        row = DecodeRequest(encode_all(deployment.engine, [chat.messages], chat.params)[0], chat.params)
        headers = {"azureml-model-deployment": deployment.name}
        endpoint.enter()
        if not chat.stream:
            try:
                (completion,) = await _while_connected(request, endpoint.generate(deployment, [row]))
            finally:
                endpoint.leave()
            return JSONResponse(openai_api.completion_body(deployment.name, completion), headers=headers)

        # leave() exactly once: when the stream ends, or (a client gone before it started) at the timeout
        release = _once(endpoint.leave)
        asyncio.get_running_loop().call_later(endpoint.limits.request_timeout_ms / 1000 + 1, release)
        events = _sse_events(endpoint, deployment, row, chat.include_usage, release)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    return app


async def _sse_events(endpoint: Endpoint, deployment, row: DecodeRequest, include_usage: bool, release):
    """/v1/chat/completions with stream: true, as OpenAI sends it: role, text pieces, finish, [usage], [DONE]."""

    writer = openai_api.ChunkWriter(deployment.name)
    try:
        yield writer.chunk({"role": "assistant", "content": ""})
        # aclosing: a client that leaves closes the inner stream at once, which stops decoding its row
        async with aclosing(endpoint.stream(deployment, row)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    yield writer.chunk(finish_reason=item.finish_reason)
                    if include_usage:
                        yield writer.chunk(usage_body=openai_api.usage(item))
                else:
                    yield writer.chunk({"content": item})
    except RequestError as e:  # headers are gone: report in the stream, as OpenAI does
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        release()
    yield writer.done()


class _BugsAsJSON:
    """ASGI middleware: an unhandled exception (a bug) is logged once with its traceback, and the
    caller gets a JSON 500 without it. Not an exception handler for Exception: Starlette re-raises
    after those, so uvicorn would log the traceback a second time."""

    def __init__(self, app, error):
        self.app, self.error = app, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:  # once a response has begun, uvicorn can only close the connection
                await self.error(500, "internal_error", "internal error; see the server log")(scope, receive, send)


async def _while_connected(request, work, poll: float = 0.25):
    """Await a non-streamed generation; if the client hangs up first, cancel it, so its rows stop decoding
    at the next token and its slot is free for others (a stream stops the same way when it is closed)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=poll)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise RequestError(499, "client_closed", "the client closed the connection before the answer")
    return task.result()


def _once(fn):
    done = []

    def call():
        if not done:
            done.append(True)
            fn()

    return call


def serve(
    deployments: dict[str, str],
    traffic: dict[str, int],
    host: str = HOST,
    port: int = PORT,
    limits: Limits | None = None,
    key_env: str = keys.KEY_ENV,
    engine: str = DEFAULT_ENGINE,
    engine_options: dict | None = None,
):
    import uvicorn

    api_key, source = keys.get_or_create_key(key_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("deployments %s, traffic %s; key from %s", deployments, traffic, source)
    log.info("scoring URI http://%s:%d/score; OpenAI base URL http://%s:%d/v1", host, port, host, port)
    app = create_app(Endpoint(deployments, traffic, api_key, limits, engine, engine_options))
    uvicorn.run(app, host=host, port=port, log_level="info")
