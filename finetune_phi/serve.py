"""The local scoring endpoint: Azure ML's online-endpoint protocol on 127.0.0.1, plus an OpenAI-compatible API.

Several deployments (name -> model) share one endpoint; the `azureml-model-deployment` header (or
the OpenAI `model` field) pins one, otherwise traffic weights choose. Each deployment's model runs in
an engine (engines/: continuous batching by default), which decodes its concurrent requests together.
Request limits use Azure ML's names. Models load in the background: /health answers at once, /ready
turns 200 when every deployment is loaded.
"""
import asyncio
import json
import logging
import random
import threading
import time
from dataclasses import dataclass

from . import keys
from .engines.base import DEFAULT_ENGINE, Engine
from .generation import MAX_NEW_TOKENS_CAP, Row
from .protocol import RequestError, encode_all, parse_score_request, prompts_of, response_body

log = logging.getLogger("finetune_phi.serve")


@dataclass
class Limits:
    """Request settings, named as in Azure ML's OnlineRequestSettings.

    request_timeout_ms is Azure's maximum (its default is 5,000): on CPU a long answer from a busy
    model takes minutes, and cutting it off only wastes the work already done. Capacity is bounded by
    max_concurrent_requests_per_instance (429 above it), not by the clock. max_queue_wait_ms bounds
    the wait before decoding starts (the continuous-batching engine starts every admitted request
    at its next step).
    """
    max_concurrent_requests_per_instance: int = 32
    max_queue_wait_ms: int = 5_000
    request_timeout_ms: int = 180_000
    max_body_bytes: int = 1_000_000
    max_new_tokens_cap: int = MAX_NEW_TOKENS_CAP


@dataclass
class Deployment:
    name: str
    model: str  # the spec it was loaded from (tiny, folder, models:/...)
    engine: Engine | None = None


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """NAME=VALUE flags -> dict, with an error naming the bad flag."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--{what} {item!r}: expected NAME=VALUE")
        if name in pairs:
            raise ValueError(f"--{what}: {name!r} given twice")
        pairs[name] = value
    return pairs


def parse_weights(items: list[str]) -> dict[str, int]:
    """--traffic NAME=PCT ... -> {name: pct}, percentages that add up to 100 (Azure ML's rule too)."""
    traffic = {}
    for name, pct in parse_pairs(items, "traffic").items():
        if not pct.isdigit() or not 0 <= int(pct) <= 100:
            raise ValueError(f"--traffic {name}={pct}: percentage must be an integer from 0 to 100")
        traffic[name] = int(pct)
    if sum(traffic.values()) != 100:
        raise ValueError(f"--traffic percentages must add up to 100, got {sum(traffic.values())}")
    return traffic


def parse_traffic(items: list[str], deployments: list[str]) -> dict[str, int]:
    """Weights for the local endpoint's deployments; none given -> all to the first deployment."""
    if not items:
        return {name: (100 if i == 0 else 0) for i, name in enumerate(deployments)}
    traffic = parse_weights(items)
    unknown = sorted(set(traffic) - set(deployments))
    if unknown:
        raise ValueError(f"--traffic names no deployment {unknown} (have {deployments})")
    return {name: traffic.get(name, 0) for name in deployments}


class Endpoint:
    """Deployments, traffic, key and limits; the FastAPI app is built around one of these."""

    def __init__(self, deployments: dict[str, str], traffic: dict[str, int], api_key: str, limits: Limits | None = None,
                 engine: str = DEFAULT_ENGINE):
        self.deployments = {name: Deployment(name, spec) for name, spec in deployments.items()}
        self.engine = engine
        self.traffic = traffic
        self.api_key = keys.check_key(api_key, "the endpoint's configuration")  # never serve behind an empty key
        self.limits = limits or Limits()
        self.in_flight = 0
        self.load_error: str | None = None
        self.loaded = threading.Event()

    def load(self):
        from .engines import load_engine

        try:
            for d in self.deployments.values():
                t = time.time()
                d.engine = load_engine(self.engine, d.model)
                log.info("deployment %s: loaded %s (%s engine) in %.1fs", d.name, d.model, self.engine, time.time() - t)
            self.loaded.set()
        except Exception as e:  # noqa: BLE001 - reported through /ready, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading models failed: %s", self.load_error)

    def choose(self, pinned: str | None) -> Deployment:
        if not self.loaded.is_set():
            raise RequestError(503, "not_ready", self.load_error or "models are still loading")
        if pinned:
            if pinned not in self.deployments:
                raise RequestError(404, "deployment_not_found",
                                   f"no deployment named {pinned!r}; have {sorted(self.deployments)}")
            return self.deployments[pinned]
        names = [n for n, w in self.traffic.items() if w > 0]
        if not names:
            raise RequestError(404, "no_traffic", "no deployment takes traffic; pin one with the azureml-model-deployment header")
        return self.deployments[random.choices(names, weights=[self.traffic[n] for n in names])[0]]

    def enter(self):
        """Admit a request or refuse it with 429 (the caller must leave() when done)."""
        cap = self.limits.max_concurrent_requests_per_instance
        if self.in_flight >= cap:
            raise RequestError(429, "too_many_requests", f"over capacity: {cap} requests already in flight")
        self.in_flight += 1

    def leave(self):
        self.in_flight -= 1

    def _timeout_error(self):
        return RequestError(503, "request_timeout", f"no answer within request_timeout_ms={self.limits.request_timeout_ms}")

    async def _completion(self, deployment: Deployment, row: Row):
        """One row's completion from the deployment's engine; 408 once it has waited max_queue_wait_ms unstarted."""
        queued = deployment.engine.submit(row)
        answer = asyncio.wrap_future(queued)
        answer.add_done_callback(_retrieved)
        limit_ms = self.limits.max_queue_wait_ms
        try:
            done, _ = await asyncio.wait({answer}, timeout=limit_ms / 1000)
            if not done and queued.cancel():  # still queued at the deadline: withdraw it (the engine skips it)
                raise RequestError(408, "queue_timeout", f"waited {limit_ms} ms in the queue without starting "
                                                         f"(max_queue_wait_ms={limit_ms})")
            return await answer  # started in time; the request timeout bounds the rest
        finally:  # refused, timed out or abandoned: free its queue place, or its batch slot at the next token
            queued.cancel()
            row.cancel.set()

    async def generate(self, deployment: Deployment, rows: list[Row]):
        """Completions for rows from the deployment's engine, within the request limits."""
        tasks = [asyncio.ensure_future(self._completion(deployment, r)) for r in rows]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), self.limits.request_timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise self._timeout_error() from None
        finally:
            for t in tasks:  # a row refused (408), timed out or abandoned: the request's other rows are not wanted
                t.cancel()

    async def stream(self, deployment: Deployment, row: Row):
        """Text pieces of one completion as they are decoded, then the Completion itself."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        row.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        task = asyncio.ensure_future(self._completion(deployment, row))
        task.add_done_callback(_retrieved)
        task.add_done_callback(lambda _: pieces.put_nowait(None))  # after every piece (same loop, FIFO)
        deadline = loop.time() + self.limits.request_timeout_ms / 1000
        try:
            while (piece := await asyncio.wait_for(pieces.get(), max(0.0, deadline - loop.time()))) is not None:
                yield piece
            yield task.result()  # or its RequestError (408)
        except asyncio.TimeoutError:
            raise self._timeout_error() from None
        finally:
            task.cancel()  # the client went away or the stream ended: stop decoding this row


def _retrieved(future: asyncio.Future):
    """Done-callback: mark the outcome as seen. A stream whose client left never reads its future;
    without this, each such error is logged as "Future exception was never retrieved". Whoever
    still awaits the future gets the exception as usual."""
    if not future.cancelled():
        future.exception()


def create_app(endpoint: Endpoint, load_in_background: bool = True):
    from contextlib import aclosing, asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.requests import ClientDisconnect

    from . import openai_api
    from .generation import Completion

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
                return error(401, "unauthorized", "missing or wrong key: send 'Authorization: Bearer <key>'",
                             {"WWW-Authenticate": "Bearer"})
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
                    raise RequestError(413, "body_too_large", f"body has more than {limit} bytes; the limit is {limit}")
        except ClientDisconnect:  # the caller's doing, not a server bug; nobody is left to read the answer
            raise RequestError(400, "incomplete_body",
                               "the client closed the connection before the body ended") from None
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, "invalid_json", f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError(400, "invalid_json", "body is not valid JSON: nested too deeply") from None
        if where := _invalid_text_at(payload):
            raise RequestError(400, "invalid_json",
                               f"{where} is not valid Unicode text: it holds a lone surrogate such as \\ud800")
        return payload

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
        prompts = prompts_of(deployment.engine, shape, inputs)
        rows = [Row(ids, params) for ids in encode_all(deployment.engine, prompts, params)]
        endpoint.enter()
        try:
            completions = await endpoint.generate(deployment, rows)
        finally:
            endpoint.leave()
        return JSONResponse(response_body(shape, prompts, completions, params),
                            headers={"azureml-model-deployment": deployment.name})

    @app.get("/v1/models")
    async def list_models():
        return openai_api.models_body(list(endpoint.deployments))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        model, messages, params, stream, include_usage = openai_api.parse_chat_request(
            await json_body(request), endpoint.limits.max_new_tokens_cap)
        deployment = endpoint.choose(model or request.headers.get("azureml-model-deployment"))
        row = Row(encode_all(deployment.engine, [deployment.engine.chat_prompt(messages)], params)[0], params)
        headers = {"azureml-model-deployment": deployment.name}
        endpoint.enter()
        if not stream:
            try:
                (completion,) = await endpoint.generate(deployment, [row])
            finally:
                endpoint.leave()
            return JSONResponse(openai_api.completion_body(deployment.name, completion), headers=headers)

        # leave() exactly once: when the stream ends, or (a client gone before it started) at the timeout
        release = _once(endpoint.leave)
        asyncio.get_running_loop().call_later(endpoint.limits.request_timeout_ms / 1000 + 1, release)

        async def events():
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

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


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


def _invalid_text_at(payload) -> str | None:
    """Where a parsed JSON body holds a string UTF-8 cannot encode (e.g. "messages[0].content"), else None.

    JSON may escape a lone surrogate ("\\ud800"); Python decodes it into a str that no tokenizer takes.
    A loop, not recursion: json.loads accepts bodies nested almost as deep as the recursion limit.
    """
    def valid(text: str) -> bool:
        try:
            text.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False

    stack = [(payload, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and not valid(value):
            return path or "the body"
        if isinstance(value, list):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        elif isinstance(value, dict):
            for key, v in value.items():
                if not valid(key):  # named by its parent: the key itself cannot go into a UTF-8 message
                    return f"a key of {path or 'the body'}"
                stack.append((v, f"{path}.{key}" if path else key))
    return None


def _once(fn):
    done = []

    def call():
        if not done:
            done.append(True)
            fn()
    return call


def serve(deployments: dict[str, str], traffic: dict[str, int], host: str = "127.0.0.1", port: int = 5000,
          limits: Limits | None = None, key_env: str = keys.KEY_ENV, engine: str = DEFAULT_ENGINE):
    import uvicorn

    api_key, source = keys.get_or_create_key(key_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("deployments %s, traffic %s; key from %s", deployments, traffic, source)
    log.info("scoring URI http://%s:%d/score; OpenAI base URL http://%s:%d/v1", host, port, host, port)
    app = create_app(Endpoint(deployments, traffic, api_key, limits, engine))
    uvicorn.run(app, host=host, port=port, log_level="info")
