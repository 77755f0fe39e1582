"""The twin of `pf flow serve` for flows/chat-maf: POST /score {"question", "chat_history", "deployment"} ->
{"answer"}, streamed as `data: {"answer": ...}` events with `Accept: text/event-stream`; GET /health.
Started by `python -m finetune_phi.evaluation.maf_runner serve` (in .venv-maf, where agent-framework is).
"""

from __future__ import annotations

import asyncio
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .. import project
from ..twins import MafError, endpoint, is_chat, load
from .client import EndpointError, check_question
from .options import HOST, Limits


FLOW_PORT = 8080  # `pf flow serve`'s port, and its twin's


def _endpoint_error(error: BaseException):
    """The EndpointError behind an exception the workflow raised (it may wrap what an executor raised)."""
    while error is not None and not isinstance(error, EndpointError):
        error = error.__cause__ or error.__context__
    return error


def serve(flow: str | Path | None = None, host: str = HOST, port: int = FLOW_PORT, connection: str | None = None):
    """POST /score {"question", "chat_history", "deployment"} -> {"answer"}; with `Accept: text/event-stream`
    the answer streams as `data: {"answer": "<piece>"}` events, as `pf flow serve` does. GET /health."""

    flow = flow or project.flow("chat-maf")
    if not is_chat(flow):
        raise MafError(f"serve takes the chat flow (flows/chat-maf), not {flow}")
    module = load(flow)
    endpoint_url, api_key = endpoint(connection)
    max_body = Limits().max_body_bytes  # the endpoint's own default

    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, status: int, code: str, message: str):
            self._json(status, {"error": {"code": code, "message": message}})

        def do_GET(self):
            if self.path == "/health":
                return self._json(200, {"status": "Healthy"})
            self._error(404, "not_found", f"no route {self.path}")

        def do_POST(self):
            if self.path != "/score":
                return self._error(404, "not_found", f"no route {self.path}")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():  # no length (chunked), "-1", junk: never read to an end that may not come
                self.close_connection = True
                return self._error(411, "length_required", "a request needs a Content-Length of 0 or more bytes")
            if int(length) > max_body:  # refused unread, as the endpoint does
                self.close_connection = True
                return self._error(413, "body_too_large", f"body has {length} bytes; the limit is {max_body}")
            try:
                body = json.loads(self.rfile.read(int(length)) or b"{}")
                given = {}  # what the request sets; the rest takes ChatInput's defaults (flows/chat's)
                if body.get("deployment"):
                    given["deployment"] = body["deployment"]
                if "temperature" in body:
                    given["temperature"] = float(body["temperature"])
                if body.get("max_tokens"):
                    given["max_tokens"] = int(body["max_tokens"])
                chat_input = module.ChatInput(
                    check_question(body.get("question")), body.get("chat_history") or [], **given
                )
            except (ValueError, KeyError, TypeError, AttributeError, EndpointError) as e:
                return self._error(400, "invalid_input", f'expected {{"question": ..., "chat_history": [...]}}: {e}')
            streaming = "text/event-stream" in (self.headers.get("Accept") or "")
            started = False
            try:
                if not streaming:
                    result = asyncio.run(module.create_workflow(endpoint_url, api_key).run(chat_input))
                    return self._json(200, {"answer": result.get_outputs()[0]})

                async def stream():
                    nonlocal started
                    async for event in module.create_workflow(endpoint_url, api_key, stream=True).run(
                        chat_input, stream=True
                    ):
                        if event.type != "output":
                            continue
                        if not started:  # errors before the first piece still get a JSON error status
                            self.send_response(200)
                            self.send_header("Content-Type", "text/event-stream")
                            self.end_headers()
                            started = True
                        self.wfile.write(f"data: {json.dumps({'answer': event.data})}\n\n".encode())
                        self.wfile.flush()

                asyncio.run(stream())
                if not started:
                    self._json(200, {"answer": ""})
            except Exception as e:  # the endpoint failed: its message names URL and status
                if not started:  # what it refused in this request is the caller's 400; else a bad gateway
                    callers_fault = getattr(_endpoint_error(e), "callers_fault", False)
                    self._error(400 if callers_fault else 502, "endpoint_error", str(e))

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"serving {flow} at http://{host}:{port}/score (GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
