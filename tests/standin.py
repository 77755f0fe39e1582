"""A stand-in for a remote Azure ML managed online endpoint, which cannot be reached from here.

An HTTP server on 127.0.0.1 that speaks the endpoint protocol the flows' client uses (`POST
/v1/chat/completions` streamed as SSE, `POST /score` in the chat shape, `GET /v1/models`, bearer
key, `azureml-model-deployment` or `model` naming the deployment) and answers from a table, so the
true difference between its deployments is known exactly. Faults are planned per (deployment,
question) and served in order, as an overloaded or restarting endpoint serves them:

    "503:2"   HTTP 503 with `Retry-After: 2` (likewise 408, 429, 502, 504; "503" without Retry-After,
              "503:date" with Retry-After as an HTTP date two seconds ahead)
    "reset"   the connection is closed with a TCP reset before any answer
    "cut"     a 200 stream that sends one piece and then closes without `data: [DONE]`
    "500"     a server error (not transient); "400" a refusal
A fault list ending in "always" repeats its last fault for ever. `delay` slows every answer (to kill a
comparison half way). Every request's body is kept in `bodies`, its outcome in `log`.
"""

from __future__ import annotations

import email.utils
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from finetune_phi.serving.local import free_port


class _JSONHandler(BaseHTTPRequestHandler):
    """What both stand-ins' handlers share: HTTP/1.1, no access log, JSON answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, status: int, body, headers: dict | None = None):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)


class StandInEndpoint:
    def __init__(
        self, answers: dict[str, callable], faults: dict | None = None, key: str = "k" * 32, delay: float = 0.0
    ):
        self.answers, self.key, self.delay = answers, key, delay
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.bodies: list[dict] = []
        self.log: list[tuple[str, str, str]] = []  # (deployment, question, outcome)
        self.lock = threading.Lock()
        standin = self

        class Handler(_JSONHandler):
            def _reset(self):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [{"id": d} for d in standin.answers]})
                self._json(404, {"error": {"code": "not_found", "message": self.path}})

            def do_POST(self):
                try:
                    self._post()
                except (BrokenPipeError, ConnectionResetError):  # the client left (a killed comparison)
                    pass

            def _post(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {standin.key}":
                    return self._json(401, {"error": {"code": "unauthorized", "message": "bad key"}})
                openai = self.path.startswith("/v1/chat/completions")
                messages = body["messages"] if openai else body["input_data"]["input_string"]
                deployment = (
                    self.headers.get("azureml-model-deployment") or body.get("model") or next(iter(standin.answers))
                )
                question = messages[-1]["content"]
                with standin.lock:
                    standin.bodies.append(body)
                    fault = standin._next_fault(deployment, question)
                    standin.log.append((deployment, question, fault or "ok"))
                if standin.delay:
                    time.sleep(standin.delay)
                if fault == "reset":
                    return self._reset()
                if fault and fault.split(":")[0].isdigit():
                    status, _, after = fault.partition(":")
                    headers = {}
                    if after == "date":
                        headers["Retry-After"] = email.utils.formatdate(time.time() + 2, usegmt=True)
                    elif after:
                        headers["Retry-After"] = after
                    return self._json(
                        int(status), {"error": {"code": "planned", "message": f"planned fault {fault}"}}, headers
                    )
                answer = standin.answers[deployment](question)
                if not openai:
                    return self._json(200, {"output": answer})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                pieces = [w + " " for w in answer.split(" ")[:-1]] + answer.split(" ")[-1:]
                for piece in pieces:
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if fault == "cut":
                        return self._reset()
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _next_fault(self, deployment: str, question: str) -> str | None:
        planned = self.faults.get((deployment, question))
        if not planned:
            return None
        if planned[0] == "always":
            return planned[1]
        fault = planned.pop(0)
        if planned and planned[0] == "always":
            planned.insert(1, fault)
        return fault

    def count(self, outcome: str | None = None) -> int:
        return sum(1 for entry in self.log if outcome is None or entry[2] == outcome)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class StandInJudge:
    """A stand-in for a judge model behind an OpenAI-compatible chat completions API (Azure OpenAI or
    OpenAI, which cannot be reached from here): `reply(messages)` makes each reply; `faults` (e.g.
    ["429:0", "429:0"]) are served first, to every request in order. Requests are counted in `asked`."""

    def __init__(self, reply, faults: list[str] | None = None, key: str = "j" * 32):
        self.reply, self.faults, self.key, self.asked = reply, list(faults or []), key, 0
        self.lock = threading.Lock()
        judge = self

        class Handler(_JSONHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {judge.key}":
                    return self._json(401, {"error": {"message": "bad key"}})
                with judge.lock:
                    judge.asked += 1
                    fault = judge.faults.pop(0) if judge.faults else None
                if fault:
                    status, _, after = fault.partition(":")
                    return self._json(
                        int(status),
                        {"error": {"message": f"planned {fault}"}},
                        {"Retry-After": after} if after else None,
                    )
                text = judge.reply(body["messages"])
                self._json(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
