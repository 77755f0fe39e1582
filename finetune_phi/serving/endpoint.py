"""One endpoint: its deployments (name -> model in an engine), traffic weights, key and request limits.

Azure ML's names throughout: a deployment per model, traffic percentages that add up to 100, the
`azureml-model-deployment` header to pin one, OnlineRequestSettings for the limits. The HTTP side
is app.py; this is what it asks: which deployment answers, may this request in, and the completion.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass

from . import keys
from .engines import load_engine
from .engines.base import DEFAULT_ENGINE, Engine
from .generation import DecodeRequest
from .options import Limits
from .request import RequestError


log = logging.getLogger("finetune_phi.serve")


@dataclass
class Deployment:
    name: str
    model: str  # the spec it was loaded from (tiny, folder, models:/...)
    engine: Engine | None = None


class Endpoint:
    """Deployments, traffic, key and limits; the FastAPI app is built around one of these."""

    def __init__(
        self,
        deployments: dict[str, str],
        traffic: dict[str, int],
        api_key: str,
        limits: Limits | None = None,
        engine: str = DEFAULT_ENGINE,
        engine_options: dict | None = None,
    ):
        self.deployments = {name: Deployment(name, spec) for name, spec in deployments.items()}
        self.engine = engine
        self.engine_options = engine_options or {}  # passed to each deployment's engine (kv_cache_tokens)
        self.traffic = traffic
        self.api_key = keys.check_key(api_key, "the endpoint's configuration")  # never serve behind an empty key
        self.limits = limits or Limits()
        self.in_flight = 0
        self.load_error: str | None = None
        self.loaded = threading.Event()

    def load(self):
        try:
            for d in self.deployments.values():
                t = time.time()
                d.engine = load_engine(self.engine, d.model, **self.engine_options)
                log.info(
                    "deployment %s: loaded %s (%s engine) in %.1fs", d.name, d.model, self.engine, time.time() - t
                )
            self.loaded.set()
        except Exception as e:  # reported through /ready, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading models failed: %s", self.load_error)

    def choose(self, pinned: str | None) -> Deployment:
        if not self.loaded.is_set():
            raise RequestError(503, "not_ready", self.load_error or "models are still loading")
        if pinned:
            if pinned not in self.deployments:
                raise RequestError(
                    404, "deployment_not_found", f"no deployment named {pinned!r}; have {sorted(self.deployments)}"
                )
            return self.deployments[pinned]
        names = [n for n, w in self.traffic.items() if w > 0]
        if not names:
            raise RequestError(
                404, "no_traffic", "no deployment takes traffic; pin one with the azureml-model-deployment header"
            )
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
        return RequestError(
            503, "request_timeout", f"no answer within request_timeout_ms={self.limits.request_timeout_ms}"
        )

    async def _completion(self, deployment: Deployment, row: DecodeRequest):
        """One row's completion from the deployment's engine; 408 once it has waited max_queue_wait_ms unstarted."""
        queued = deployment.engine.submit(row)
        answer = asyncio.wrap_future(queued)
        answer.add_done_callback(_retrieved)
        limit_ms = self.limits.max_queue_wait_ms
        try:
            done, _ = await asyncio.wait({answer}, timeout=limit_ms / 1000)
            if not done and queued.cancel():  # still queued at the deadline: withdraw it (the engine skips it)
                raise RequestError(
                    408,
                    "queue_timeout",
                    f"waited {limit_ms} ms in the queue without starting (max_queue_wait_ms={limit_ms})",
                )
            return await answer  # started in time; the request timeout bounds the rest
        finally:  # refused, timed out or abandoned: free its queue place, or its batch slot at the next token
            queued.cancel()
            row.cancel.set()

    async def generate(self, deployment: Deployment, rows: list[DecodeRequest]):
        """Completions for rows from the deployment's engine, within the request limits."""
        tasks = [asyncio.ensure_future(self._completion(deployment, r)) for r in rows]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), self.limits.request_timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise self._timeout_error() from None
        finally:
            for t in tasks:  # a row refused (408), timed out or abandoned: the request's other rows are not wanted
                t.cancel()

    async def stream(self, deployment: Deployment, row: DecodeRequest):
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
