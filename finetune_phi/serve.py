"""The local scoring endpoint: Azure ML's online-endpoint protocol on 127.0.0.1.

Several deployments (name -> model) share one endpoint; the `azureml-model-deployment` header pins
one, otherwise traffic weights choose. Request limits use Azure ML's names. Models load in the
background: /health answers at once, /ready turns 200 when every deployment is loaded.
"""

import asyncio
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import keys
from .protocol import RequestError, parse_score_request, run_score

log = logging.getLogger("finetune_phi.serve")


@dataclass
class Limits:
    """Request settings, named as in Azure ML's OnlineRequestSettings."""
    max_concurrent_requests_per_instance: int = 8
    max_queue_wait_ms: int = 5_000
    request_timeout_ms: int = 60_000
    max_body_bytes: int = 1_000_000


@dataclass
class Deployment:
    name: str
    model: str  # the spec it was loaded from (tiny, folder, models:/...)
    generator: object = None
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))


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

    def __init__(self, deployments: dict[str, str], traffic: dict[str, int], api_key: str, limits: Limits | None = None):
        self.deployments = {name: Deployment(name, spec) for name, spec in deployments.items()}
        self.traffic = traffic
        self.api_key = api_key
        self.limits = limits or Limits()
        self.in_flight = 0
        self.load_error: str | None = None
        self.loaded = threading.Event()

    def load(self):
        from . import models
        from .generation import Generator

        try:
            for d in self.deployments.values():
                t = time.time()
                d.generator = Generator(*models.load(d.model))
                log.info("deployment %s: loaded %s in %.1fs", d.name, d.model, time.time() - t)
            self.loaded.set()
        except Exception as e:  # noqa: BLE001 - reported through /ready, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading models failed: %s", self.load_error)

    def choose(self, pinned: str | None) -> Deployment:
        if pinned:
            if pinned not in self.deployments:
                raise RequestError(404, "deployment_not_found",
                                   f"no deployment named {pinned!r}; have {sorted(self.deployments)}")
            return self.deployments[pinned]
        names = [n for n, w in self.traffic.items() if w > 0]
        if not names:
            raise RequestError(404, "no_traffic", "no deployment takes traffic; pin one with the azureml-model-deployment header")
        return self.deployments[random.choices(names, weights=[self.traffic[n] for n in names])[0]]

    async def call(self, deployment: Deployment, work):
        """Run work(cancel_event) on the deployment's worker within the request limits."""
        lim = self.limits
        if self.in_flight >= lim.max_concurrent_requests_per_instance:
            raise RequestError(429, "too_many_requests",
                               f"over capacity: {lim.max_concurrent_requests_per_instance} requests already in flight")
        self.in_flight += 1
        cancel = threading.Event()
        queued = time.monotonic()

        def run():
            waited_ms = (time.monotonic() - queued) * 1000
            if waited_ms > lim.max_queue_wait_ms:
                raise RequestError(408, "queue_timeout", f"waited {waited_ms:.0f} ms in the queue "
                                   f"(max_queue_wait_ms={lim.max_queue_wait_ms})")
            return work(cancel)

        try:
            future = asyncio.get_running_loop().run_in_executor(deployment.executor, run)
            return await asyncio.wait_for(future, lim.request_timeout_ms / 1000)
        except asyncio.TimeoutError:
            cancel.set()  # stops the generation at its next token
            raise RequestError(503, "request_timeout",
                               f"no answer within request_timeout_ms={lim.request_timeout_ms}") from None
        finally:
            self.in_flight -= 1


def create_app(endpoint: Endpoint, load_in_background: bool = True):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=endpoint.load, name="load-models", daemon=True).start()
        yield
        for d in endpoint.deployments.values():
            d.executor.shutdown(wait=False, cancel_futures=True)

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

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return error(e.status, e.code, e.message, {"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # a bug must not leak a stack trace to the caller
        log.error("unhandled error on %s: %s", request.url.path, type(e).__name__)
        return error(500, "internal_error", "internal error; see the server log")

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
        body = await request.body()
        if len(body) > endpoint.limits.max_body_bytes:
            raise RequestError(413, "body_too_large", f"body has {len(body)} bytes; the limit is {endpoint.limits.max_body_bytes}")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, "invalid_json", f"body is not valid JSON: {e}") from None
        shape, inputs, params = parse_score_request(payload)
        if not endpoint.loaded.is_set():
            raise RequestError(503, "not_ready", endpoint.load_error or "models are still loading")
        deployment = endpoint.choose(request.headers.get("azureml-model-deployment"))
        result = await endpoint.call(deployment, lambda cancel: run_score(deployment.generator, shape, inputs, params, cancel))
        return JSONResponse(result, headers={"azureml-model-deployment": deployment.name})

    return app


def serve(deployments: dict[str, str], traffic: dict[str, int], host: str = "127.0.0.1", port: int = 5000,
          limits: Limits | None = None, key_env: str = keys.KEY_ENV):
    import uvicorn

    api_key, source = keys.get_or_create_key(key_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("deployments %s, traffic %s; key from %s", deployments, traffic, source)
    log.info("scoring URI http://%s:%d/score", host, port)
    app = create_app(Endpoint(deployments, traffic, api_key, limits))
    uvicorn.run(app, host=host, port=port, log_level="info")
