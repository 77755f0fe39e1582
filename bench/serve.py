"""Endpoint engines against `transformers serve --continuous-batching`, on real weights; `pf flow serve` overhead.

    python bench/serve.py [--model smollm2-135m] [--engines transformers NAME[=MODEL] ...] [--clients 1 4 16]
                          [--seconds 20] [--max-new-tokens 64] [--no-baseline] [--no-pf]

Each server (`finetune-phi serve --engine E`, one per engine, then `transformers serve
--continuous-batching` on the same local folder as the baseline) is started as a subprocess, one at a
time, and driven by N client threads for T seconds per client count on /v1/chat/completions with
`stream: true`, greedy, real UltraChat first user turns (../shared/assets/ultrachat-sample, else a
built-in list). TTFT is the time to the first content chunk; tok/s = completion tokens / wall time,
the tokens counted the same way for every server (the streams' usage when every server reports it,
else the streamed text re-tokenized). Then: a 5-turn conversation per server (each turn resends the
history with the server's own answers; prefix caching should keep turn 5's TTFT near turn 1's), the
ratios against the baseline with their targets, and where `pf flow serve` spends its added latency.
`--model tiny` is an overhead check only. Figures are for this machine; compare ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from finetune_phi.serving.client import sse_events  # noqa: E402
from finetune_phi.serving.local import NotReady, free_port, wait_ready  # noqa: E402


BIN = Path(sys.executable).parent
ASSETS = REPO.parent / "shared" / "assets" / "ultrachat-sample"
KEY = "bench-key-0123456789abcdef"  # the endpoint wants >= 16 characters
BASELINE = "transformers serve"
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for a job interview.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about autumn.",
    "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
]
CONVERSATION = [
    "Which beach in South India is recommended for water sports?",
    "That sounds exciting! Is there any particular time of year that is best for water sports there?",
    "Should I bring my own equipment or can I rent it there?",
    "Are there any beginner-level classes available? I have never tried surfing before.",
    "Are there any options for accommodation near the beach that you would recommend?",
]
TURNS = 5
# targets (issue text), next to the ratios
DEFAULT_TOK_1, DEFAULT_TOK_16 = 1.0, 1.3  # default engine / baseline tok/s at 1 and at 16 clients
QUANT_TOK_1_ABS, QUANT_TOK_16 = 76.0, 2.0  # quantized engine: tok/s at 1 client (llama-cpp-python), x baseline at 16
TURN5_MAX, PF_MAX_MS = 1.5, 30.0
JSON_MIN = 0.8  # constrained decoding (response_format json_object) / free decoding, tok/s, same server and clients
JSON_OBJECT = {"response_format": {"type": "json_object"}}


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: int) -> float:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ---------------------------------------------------------------- data


def load_data() -> tuple[list[str], list[list[str]], str]:
    """(questions, 5-turn conversations, source): UltraChat first user turns, and conversations with >= 5
    user turns (their first turns left out of the questions, so no server has their prefix cached)."""
    rows = []
    for name in ("ultrachat1000-messages.jsonl", "ultrachat40.jsonl"):
        path = ASSETS / name
        if path.is_file():
            rows += [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return QUESTIONS, [CONVERSATION], "built-in list (no UltraChat sample at ../shared/assets)"
    users = [[m["content"] for m in msgs if m["role"] == "user"] for msgs in rows]
    conversations = [u[:TURNS] for u in users if len(u) >= TURNS and sum(map(len, u[:TURNS])) < 3000]
    firsts = {c[0] for c in conversations}
    questions = [u[0] for u in users if u and u[0] not in firsts and len(u[0]) < 4000]
    return questions, conversations or [CONVERSATION], f"UltraChat first user turns ({len(questions)}), {ASSETS}"


# ---------------------------------------------------------------- servers


class Unavailable(RuntimeError):
    """A server that cannot run here (engine library missing, no GPU): reported, then skipped."""


@dataclass
class Server:
    label: str
    cmd: list[str]
    ready_path: str
    model: str | None = None  # the request's "model" field
    usage_option: bool = True  # accepts stream_options.include_usage
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def start(self, work: Path, timeout: float = 900):
        self.log_path = work / f"{self.label.replace(' ', '-').replace('=', '-').replace('/', '_')}.log"
        self.proc = subprocess.Popen(
            [c.replace("{port}", str(self.port)) for c in self.cmd],
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        try:
            wait_ready(
                f"http://127.0.0.1:{self.port}{self.ready_path}",
                headers=self.headers(),
                proc=self.proc,
                log=self.log_path,
                timeout=timeout,
            )
        except NotReady as e:
            raise Unavailable(str(e).splitlines()[0] + f" | {self.tail()}") from None

    def tail(self, lines: int = 3) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path else []
        return " | ".join(text[-lines:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def endpoint(engine: str, model: str, label: str, extra: list[str] = ()) -> Server:
    port = free_port()
    # no queue-wait limit (transformers serve has none): the bench measures decoding, not refusals
    return Server(
        label,
        [
            str(BIN / "finetune-phi"),
            "serve",
            "--engine",
            engine,
            "--deployment",
            f"bench={model}",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--max-concurrent-requests",
            "256",
            "--max-queue-wait-ms",
            "600000",
            *extra,
        ],
        "/ready",
        model="bench",
        env={"FINETUNE_PHI_API_KEY": KEY},
        port=port,
    )


def transformers_serve(model_dir: str, cuda: bool) -> Server:
    """`transformers serve` pinned to a local folder: the positional FORCE_MODEL preloads it before the
    server listens (so /health means loaded) and every request's "model" must be that same path.
    It refuses `stream_options` (unsupported field) but always ends its stream with a usage chunk."""
    port = free_port()
    return Server(
        BASELINE,
        [
            str(BIN / "transformers"),
            "serve",
            "--continuous-batching",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--device",
            "cuda" if cuda else "cpu",
            "--dtype",
            "bfloat16" if cuda else "float32",
            model_dir,
        ],
        "/health",
        model=model_dir,
        usage_option=False,
        port=port,
    )


# ---------------------------------------------------------------- client


@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    text: str = ""
    usage: int | None = None
    error: str = ""


def chat(
    server: Server,
    messages: list[dict],
    max_tokens: int | None,
    temperature: float = 0.0,
    timeout: float = 900,
    extra: dict | None = None,
) -> Result:
    """One streamed /v1/chat/completions request: TTFT (first content chunk), latency, text, usage."""
    body = {"messages": messages, "stream": True, "temperature": temperature, **(extra or {})}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if server.model:
        body["model"] = server.model
    if server.usage_option:
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), server.headers())
        response = conn.getresponse()
        if response.status != 200:
            return Result(False, error=f"HTTP {response.status} {response.read()[:160].decode(errors='replace')}")
        ttft, pieces, usage = None, [], None
        for event in sse_events(response):
            if "error" in event:
                return Result(False, error=f"stream error {str(event['error'])[:160]}")
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    pieces.append(text)
        return Result(True, ttft, time.perf_counter() - t0, "".join(pieces), usage)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def drive(
    server: Server,
    clients: int,
    seconds: float,
    max_tokens: int,
    questions: list[str],
    cursor: list[int],
    extra: dict | None = None,
    label: str | None = None,
) -> dict:
    """N client threads sending requests back to back for `seconds` (requests started by then finish). Each
    request takes the next question after `cursor`, so no row repeats an earlier row's prompt (no prefix-cache
    hits from the bench itself) and every server gets the same questions in the same order."""
    results: list[Result] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < stop:
            with lock:
                question = questions[cursor[0] % len(questions)]
                cursor[0] += 1
            r = chat(server, [{"role": "user", "content": question}], max_tokens, extra=extra)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"server": label or server.label, "clients": clients, "wall": time.perf_counter() - t0, "results": results}


def multi_turn(server: Server, conversations: list[list[str]], max_tokens: int) -> dict:
    """TTFT per turn of 5-turn conversations, one client; each turn resends the history with the answers."""
    ttfts, errors = [[] for _ in range(TURNS)], []
    for conversation in conversations:
        messages = []
        for turn, question in enumerate(conversation[:TURNS]):
            messages.append({"role": "user", "content": question})
            r = chat(server, messages, max_tokens)
            if not r.ok:
                errors.append(r.error)
                break
            ttfts[turn].append(r.ttft)
            messages.append({"role": "assistant", "content": r.text})
    return {"ttfts": ttfts, "errors": errors, "n": len(conversations)}


# ---------------------------------------------------------------- pf flow serve

TRIVIAL_FLOW = """inputs:
  question: {type: string}
  chat_history: {type: list, default: []}
outputs:
  answer: {type: string, reference: '${echo.output}'}
nodes:
- name: echo
  type: python
  source: {type: code, path: echo.py}
  inputs: {question: '${inputs.question}'}
"""
TRIVIAL_TOOL = "from promptflow.core import tool\n\n\n@tool\ndef echo(question: str) -> str:\n    return question\n"
ANSWER = b'{"output": "Paris"}'
PACED, PACE_S = "[paced]", 0.02  # a question with the marker streams one piece per token, 20 ms apart (~50 tok/s)


def stub_handler(pieces: int):
    class StubHandler(BaseHTTPRequestHandler):
        """An endpoint without a model: /v1 streams one piece at once, or `pieces` pieces PACE_S apart when the
        question carries PACED (what a decoding model does); /score answers JSON."""

        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/score"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(ANSWER)))
                self.end_headers()
                self.wfile.write(ANSWER)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            paced = PACED.encode() in body
            for i in range(pieces if paced else 1):
                if paced and i:
                    time.sleep(PACE_S)
                self.chunk(b'data: {"choices": [{"index": 0, "delta": {"content": " tok"}}]}\n\n')
            self.chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def chunk(self, data: bytes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return StubHandler


def post(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, float | None, float, bytes]:
    """(status, time to the first body byte, total time, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        path,
        json.dumps(body),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    first = response.read1(65536)
    ttfb = time.perf_counter() - t0
    rest = response.read()
    total = time.perf_counter() - t0
    conn.close()
    return response.status, ttfb, total, first + rest


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pf_server(label: str, flow: Path) -> Server:
    port = free_port()
    return Server(
        label,
        [
            str(BIN / "pf"),
            "flow",
            "serve",
            "--source",
            str(flow),
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--engine",
            "fastapi",
            "--skip-open-browser",
        ],
        "/health",
        port=port,
    )


def start_all(servers: list[Server], work: Path):
    errors = []

    def start(s):
        try:
            s.start(work)
        except Exception as e:  # re-raised below, in this thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def pf_overhead(model: str, engine: str, question: str, requests: int, max_tokens: int, work: Path, count) -> dict:
    """The same chat turn through `pf flow serve --source flows/chat` and directly, and where the difference goes.

    Without a model (an endpoint stub): pf's own request handling (a one-node flow that echoes), the chat
    tool + connection (flows/chat on an instant one-piece answer), and the cost per streamed piece
    (max_tokens pieces paced like decoding; pf's CPU time then, which a small machine takes from the
    model). With the model: direct /score, direct /v1 stream (the tool's own request) and through pf."""
    os.environ["PF_HOME_DIRECTORY"] = str(work / "pf")
    subprocess.run(
        [str(BIN / "pf"), "config", "set", "telemetry.enabled=false", "trace.destination=none"],
        check=True,
        capture_output=True,
    )
    from finetune_phi.serving.client import chat_stream
    from finetune_phi.serving.connection import connect
    from finetune_phi.serving.generation import GenerationParams

    trivial = work / "trivial-flow"
    trivial.mkdir(exist_ok=True)
    (trivial / "flow.dag.yaml").write_text(TRIVIAL_FLOW)
    (trivial / "echo.py").write_text(TRIVIAL_TOOL)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    sse = {"Accept": "text/event-stream"}
    out: dict = {"n": requests, "pieces": max_tokens}
    stub = ThreadingHTTPServer(("127.0.0.1", 0), stub_handler(max_tokens))
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    stub_url = f"http://127.0.0.1:{stub.server_address[1]}/score"
    servers: list[Server] = []
    try:
        # 1. no model
        connect(stub_url, KEY)
        pf_chat, pf_trivial = pf_server("pf-chat-stub", REPO / "flows" / "chat"), pf_server("pf-trivial", trivial)
        servers += [pf_chat, pf_trivial]
        start_all([pf_chat, pf_trivial], work)
        one = {"question": question, "chat_history": []}
        paced = {"question": f"{question} {PACED}", "chat_history": []}
        for s in (pf_chat, pf_trivial):  # warm-up, and a check that the flow answers
            status, _, _, data = post(s.port, "/score", one)
            if status != 200:
                raise RuntimeError(f"{s.label} answered {status} {data[:200]!r}; log: {s.log_path}")
        m = {k: [] for k in ("direct", "chat", "chat_sse", "trivial", "direct_paced", "chat_paced")}
        cpu = {"chat": 0.0, "chat_paced": 0.0}
        for i in range(requests):
            t0 = time.perf_counter()
            "".join(chat_stream(stub_url, KEY, question, []))  # the tool's own client code, in this process
            m["direct"].append(time.perf_counter() - t0)
            m["trivial"].append(post(pf_trivial.port, "/score", one)[2])
            m["chat_sse"].append(post(pf_chat.port, "/score", one, sse)[2])
            c0 = cpu_seconds(pf_chat.proc.pid) or 0.0
            m["chat"].append(post(pf_chat.port, "/score", one)[2])
            c1 = cpu_seconds(pf_chat.proc.pid) or 0.0
            cpu["chat"] += c1 - c0
            if i < max(3, requests // 2):
                t0 = time.perf_counter()
                "".join(chat_stream(stub_url, KEY, paced["question"], []))
                m["direct_paced"].append(time.perf_counter() - t0)
                c0 = cpu_seconds(pf_chat.proc.pid) or 0.0
                m["chat_paced"].append(post(pf_chat.port, "/score", paced)[2])
                cpu["chat_paced"] += (cpu_seconds(pf_chat.proc.pid) or 0.0) - c0
        out.update({f"stub_{k}": med(v) for k, v in m.items()})
        out.update(
            cpu_chat=cpu["chat"] / len(m["chat"]),
            cpu_paced=cpu["chat_paced"] / len(m["chat_paced"]),
            has_cpu=cpu_seconds(pf_chat.proc.pid) is not None,
        )
        for s in (pf_chat, pf_trivial):
            s.stop()

        # 2. the real model
        ep = endpoint(engine, model, f"endpoint for pf ({engine})", ["--max-new-tokens-cap", str(max_tokens)])
        servers.append(ep)
        ep.start(work)  # before the flow: pf reads the connection once, when it starts
        connect(f"http://127.0.0.1:{ep.port}/score", KEY)
        pf_real = pf_server("pf-chat-model", REPO / "flows" / "chat")
        servers.append(pf_real)
        pf_real.start(work)
        messages = [{"role": "user", "content": question}]
        score_body = {"input_data": {"input_string": messages, "parameters": {}}}
        post(ep.port, "/score", score_body)  # warm-up
        post(pf_real.port, "/score", one)
        # exactly the tool's request: no model (the traffic split picks), no max_tokens (the cap), its temperature
        tool_view = Server(ep.label, [], "", model=None, usage_option=False, port=ep.port)
        temperature = GenerationParams().temperature
        r = {
            k: []
            for k in (
                "score",
                "v1_whole",
                "v1",
                "v1_ttft",
                "pf",
                "pf_ttfb",
                "tokens_score",
                "tokens_direct",
                "tokens_pf",
            )
        }
        errors = []
        c0 = cpu_seconds(pf_real.proc.pid)
        for _ in range(requests):
            status, _, took, data = post(ep.port, "/score", score_body)
            if status == 200:
                r["score"].append(took)
                r["tokens_score"].append(count(json.loads(data)["output"]))
            else:
                errors.append(f"/score {status}")
            status, _, took, _ = post(
                ep.port, "/v1/chat/completions", {"messages": messages, "temperature": temperature}
            )
            r["v1_whole"].append(took) if status == 200 else errors.append(f"/v1 {status}")
            res = chat(tool_view, messages, None, temperature)
            if res.ok:
                r["v1"].append(res.latency)
                r["v1_ttft"].append(res.ttft)
                r["tokens_direct"].append(count(res.text))
            else:
                errors.append(res.error)
            status, _, took, data = post(pf_real.port, "/score", one)
            if status == 200:
                r["pf"].append(took)
                r["tokens_pf"].append(count(json.loads(data).get("answer", "")))
            else:
                errors.append(f"pf {status} {data[:120]!r}")
            status, ttfb, _, _ = post(pf_real.port, "/score", one, sse)
            r["pf_ttfb"].append(ttfb) if status == 200 else errors.append(f"pf sse {status}")
        c1 = cpu_seconds(pf_real.proc.pid)
        out.update({k: med(v) for k, v in r.items()})
        out.update(errors=errors, cpu_model=(c1 - c0) / (2 * requests) if c0 is not None and c1 is not None else None)
        return out
    finally:
        for s in servers:
            s.stop()
        stub.shutdown()


# ---------------------------------------------------------------- report


def busy_warning() -> str | None:
    """A line when other work shares the CPUs as the bench starts (1-minute load average over half the usable
    CPUs): the servers and clients then get less than the machine, and figures come out low and noisy."""
    if not hasattr(os, "getloadavg"):
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    if load <= usable / 2:
        return None
    return (
        f"WARNING: the machine was busy when the bench started (load {load:.1f} on {usable} usable CPUs): "
        "these figures say little; run it again on a quiet machine"
    )


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f" / load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"machine: {os.cpu_count()} CPUs ({usable} usable{load}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {gpu}"
    )


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """The machine's memory read bandwidth in GB/s: the best of a few sums over an array far larger than the
    caches (what one decoding step does to the weights: read each once)."""
    import numpy as np

    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        data.sum()
        best = max(best, data.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes(folder: str) -> int:
    """Bytes of weights one decoding step reads: the safetensors files, or an OpenVINO export's .bin."""
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("openvino_model.bin"))
    return sum(f.stat().st_size for f in files)


def model_line(spec: str, path: str) -> str:
    config = json.loads((Path(path) / "config.json").read_text())
    return (
        f"model: {spec} ({path}): {config.get('model_type')}, {config.get('num_hidden_layers')} layers x "
        f"{config.get('hidden_size')}, {config.get('torch_dtype') or config.get('dtype')}"
    )


def summarize(run: dict, count) -> dict:
    ok = [r for r in run["results"] if r.ok]
    errors = [r.error for r in run["results"] if not r.ok]
    tokens = sum(count(r) for r in ok)
    return {
        "req_s": len(ok) / run["wall"],
        "tok_s": tokens / run["wall"],
        "ttft": pct([r.ttft for r in ok], 50),
        "p50": pct([r.latency for r in ok], 50),
        "p95": pct([r.latency for r in ok], 95),
        "n": len(ok),
        "errors": errors,
        "tokens": tokens / max(len(ok), 1),
    }


def verdict(value: float, target: float, at_most: bool = False) -> str:
    if value != value:  # nan
        return "n/a"
    return "ok" if (value <= target if at_most else value >= target) else "MISSED"


def exported(spec: str, how: str, work: Path) -> str:
    """`export:FORMAT:PRECISION` -> a folder made by finetune_phi.modeling.export.export(spec, out, FORMAT, PRECISION)."""
    import importlib

    _, fmt, precision = (how.split(":") + [""] * 3)[:3]
    try:
        export = importlib.import_module("finetune_phi.modeling.export").export
    except ImportError as e:
        raise SystemExit(
            f"{how}: this checkout has no finetune_phi.modeling.export ({e}); give the exported folder instead"
        ) from None
    out = work / f"export-{fmt}-{precision}".rstrip("-")
    log(f"exporting {spec} as {fmt} {precision} to {out}")
    result = export(spec, out, fmt or None, precision or None)
    return str(result if isinstance(result, (str, Path)) else out)


def main():
    from finetune_phi.modeling import models
    from finetune_phi.serving.engines import ENGINES
    from finetune_phi.serving.engines.base import DEFAULT_ENGINE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default=models.SMOLLM2,
        help="what every server serves (default %(default)s; tiny: an overhead check)",
    )
    ap.add_argument(
        "--engines",
        nargs="+",
        metavar="NAME[=MODEL]",
        default=None,
        help=f"engines to run (default: all registered: {' '.join(ENGINES)}; those that cannot run here are "
        "reported and skipped). =MODEL serves another model with that engine: a folder (an export) or "
        "export:FORMAT:PRECISION (finetune_phi.modeling.export.export of --model, made in the run's temp dir). "
        f"Engines other than {DEFAULT_ENGINE} and vllm get the quantized engine's targets",
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=20, help="per server and client count")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=3, help="5-turn conversations per server")
    ap.add_argument("--pf-requests", type=int, default=20)
    ap.add_argument("--no-baseline", action="store_true", help=f"skip `{BASELINE} --continuous-batching`")
    ap.add_argument("--no-pf", action="store_true", help="skip the pf flow serve overhead")
    ap.add_argument(
        "--no-json",
        action="store_true",
        help=f"skip constrained decoding (response_format json_object) on the {DEFAULT_ENGINE} engine",
    )
    args = ap.parse_args()
    for var, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "true"),
        ("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "true"),
    ):
        os.environ.setdefault(var, value)  # offline: no hub, no telemetry retries in pf's processes
    busy = busy_warning()
    if busy:
        log(busy)
    import torch
    from transformers import AutoTokenizer

    model_dir = models.resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions, conversations, source = load_data()
    conversations = conversations[: args.conversations]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    log(f"logs in {work}")

    engines = []  # (name, model, label)
    for item in args.engines or list(ENGINES):
        name, _, model = item.partition("=")
        if model.startswith("export:"):
            model = exported(args.model, model, work)
        engines.append((name, model or model_dir, f"engine {item}"))
    servers = [endpoint(name, model, label) for name, model, label in engines]
    if not args.no_baseline:
        servers.append(transformers_serve(model_dir, torch.cuda.is_available()))

    runs, turns, skipped = [], {}, {}

    def text_tokens_of(r: Result) -> int:
        return r.usage if r.usage is not None else len(tokenizer(r.text, add_special_tokens=False)["input_ids"])

    for server in servers:
        log(f"starting {server.label}")
        try:
            server.start(work)
            for _ in range(2):  # warm-up: first-request allocations, the baseline's batching manager
                r = chat(server, [{"role": "user", "content": questions[0]}], args.max_new_tokens)
                if not r.ok:
                    raise Unavailable(f"warm-up failed: {r.error}")
            log(f"{server.label}: multi-turn")
            turns[server.label] = multi_turn(server, conversations, args.max_new_tokens)
            cursor = [1]  # questions[0] was the warm-up
            for clients in args.clients:
                log(f"{server.label}: {clients} client(s) for {args.seconds:g} s")
                runs.append(drive(server, clients, args.seconds, args.max_new_tokens, questions, cursor))
            if server.label == f"engine {DEFAULT_ENGINE}" and not args.no_json:  # the same questions, held to JSON
                json_cursor = [1]
                for clients in args.clients:
                    log(f"{server.label}: json_object, {clients} client(s) for {args.seconds:g} s")
                    held = drive(
                        server,
                        clients,
                        args.seconds,
                        args.max_new_tokens,
                        questions,
                        json_cursor,
                        extra=JSON_OBJECT,
                        label=f"{server.label} json",
                    )
                    runs.append(held)
                    # like for like: JSON answers end when the object closes (shorter than free ones), so each
                    # token carries more of a request's prefill; free answers cut to the JSON answers' mean length
                    # isolate what the grammar itself costs
                    answers = [r for r in held["results"] if r.ok]
                    same = max(1, round(sum(map(text_tokens_of, answers)) / max(len(answers), 1)))
                    log(f"{server.label}: free, cut to {same} tokens, {clients} client(s) for {args.seconds:g} s")
                    runs.append(
                        drive(server, clients, args.seconds, same, questions, [1], label=f"{server.label} free={same}")
                    )
        except (Unavailable, TimeoutError) as e:
            skipped[server.label] = str(e)
            log(f"{server.label}: unavailable here: {e}")
        finally:
            server.stop()

    # one way of counting tokens for every server
    all_ok = [r for run in runs for r in run["results"] if r.ok]
    by_usage = bool(all_ok) and all(r.usage is not None for r in all_ok)
    text_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    count = (lambda r: r.usage) if by_usage else (lambda r: text_tokens(r.text))

    pf = None
    if not args.no_pf:
        default = next((model for name, model, _ in engines if name == DEFAULT_ENGINE), model_dir)
        log("pf flow serve overhead")
        try:
            pf = pf_overhead(
                default, DEFAULT_ENGINE, questions[0], args.pf_requests, args.max_new_tokens, work, text_tokens
            )
        except Exception as e:  # the tables above still print
            pf = {"failed": f"{type(e).__name__}: {e}"}

    # ---- tables
    print()
    if busy:
        print(busy)
    print(machine_line())
    print(model_line(args.model, model_dir))
    print(
        f"requests: {source}; greedy, max {args.max_new_tokens} new tokens, streamed; {args.seconds:g} s per row; "
        f"tokens counted from {'each stream’s usage' if by_usage else 'the streamed text, re-tokenized'}; logs {work}"
    )
    for label, why in skipped.items():
        print(f"skipped {label}: {why}")
    bandwidth = read_bandwidth()
    print(
        f"memory read bandwidth: {bandwidth:.1f} GB/s (best of 3 sums over 1 GiB): one client's bound is "
        "bandwidth / weight bytes read per token"
    )
    print()
    print(
        f"{'server':<28}{'clients':>7}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'lat p50':>9}{'lat p95':>9}"
        f"{'tok/req':>8}{'n':>6}{'errors':>7}   (ms)"
    )
    table = {}
    for run in runs:
        s = table[run["server"], run["clients"]] = summarize(run, count)
        print(
            f"{run['server']:<28}{run['clients']:>7}{s['req_s']:>8.2f}{s['tok_s']:>8.1f}{s['ttft'] * 1000:>10.0f}"
            f"{s['p50'] * 1000:>9.0f}{s['p95'] * 1000:>9.0f}{s['tokens']:>8.1f}{s['n']:>6}{len(s['errors']):>7}"
        )
    for run in runs:
        errors = table[run["server"], run["clients"]]["errors"]
        if errors:
            print(f"  errors {run['server']} x{run['clients']}: {len(errors)}, e.g. {sorted(set(errors))[:3]}")

    print(
        f"\nmulti-turn: {len(conversations)} conversation(s) of {TURNS} user turns, each turn resending the history "
        "with the server's answers; 1 client; TTFT p50 in ms"
    )
    print(
        f"{'server':<28}"
        + "".join(f"{'turn ' + str(i + 1):>9}" for i in range(TURNS))
        + f"{'5th/1st':>9}   target <= {TURN5_MAX}x"
    )
    ratio5 = {}
    for label, t in turns.items():
        medians = [pct(x, 50) for x in t["ttfts"]]
        ratio5[label] = medians[-1] / medians[0] if medians[0] == medians[0] and medians[0] else float("nan")
        print(
            f"{label:<28}" + "".join(f"{m * 1000:>9.0f}" for m in medians) + f"{ratio5[label]:>8.2f}x   "
            f"{verdict(ratio5[label], TURN5_MAX, at_most=True)}"
            + (f"  errors: {t['errors'][:2]}" if t["errors"] else "")
        )

    print(f"\nagainst the baseline ({BASELINE} --continuous-batching), same clients: tok/s x, TTFT x, latency p50 x")
    top = max(args.clients)
    for name, _, label in engines:
        if not any(key[0] == label for key in table):
            continue
        quantized = name not in (DEFAULT_ENGINE, "vllm")
        for clients in args.clients:
            s, b = table.get((label, clients)), table.get((BASELINE, clients))
            if s is None:
                continue
            targets = []
            if quantized and clients == 1:
                targets.append(
                    f"{s['tok_s']:.1f} tok/s, target >= {QUANT_TOK_1_ABS:g}: {verdict(s['tok_s'], QUANT_TOK_1_ABS)}"
                )
            if b is None:
                print(
                    f"{label:<28}{clients:>3} clients: no baseline" + (f"   {'; '.join(targets)}" if targets else "")
                )
                continue
            tok, ttft, lat = (
                s["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan"),
                s["ttft"] / b["ttft"],
                s["p50"] / b["p50"],
            )
            if name == DEFAULT_ENGINE and clients == 1:
                targets.append(f"tok/s target >= {DEFAULT_TOK_1}x: {verdict(tok, DEFAULT_TOK_1)}")
            if name == DEFAULT_ENGINE and clients == 16:
                targets.append(f"tok/s target >= {DEFAULT_TOK_16}x: {verdict(tok, DEFAULT_TOK_16)}")
            if quantized and clients == 16:
                targets.append(f"tok/s target >= {QUANT_TOK_16}x: {verdict(tok, QUANT_TOK_16)}")
            print(
                f"{label:<28}{clients:>3} clients: tok/s {tok:5.2f}x  TTFT {ttft:5.2f}x  latency {lat:5.2f}x"
                + (f"   {'; '.join(targets)}" if targets else "")
            )
        if 16 not in args.clients:
            print(f"{label:<28}(16-client targets not measured; largest here: {top})")

    print("\nsingle stream (1 client) against the machine's bound (read every weight once per token):")
    for name, model, label in engines + ([(BASELINE, model_dir, BASELINE)] if not args.no_baseline else []):
        s = table.get((label, 1))
        folder = model if Path(model).is_dir() else model_dir
        if name == "openvino":  # what the engine reads: its export (made on first use, found in the cache now)
            from finetune_phi.modeling.export import cached_export

            folder = str(cached_export(folder, progress=log))
        if s is None or not weight_bytes(folder):
            continue
        bound = bandwidth * 1e9 / weight_bytes(folder)
        print(
            f"{label:<28} {s['tok_s']:6.1f} tok/s of a bound of {bound:6.1f} ({weight_bytes(folder) / 1e6:.0f} MB "
            f"of weights): {s['tok_s'] / bound:.0%}"
        )

    json_label = f"engine {DEFAULT_ENGINE}"
    if any(key[0] == json_label + " json" for key in table):
        print(
            f"\nconstrained decoding on the {DEFAULT_ENGINE} engine: response_format json_object (xgrammar) vs free, "
            "the same questions; tok/s x, TTFT x, latency p50 x"
        )
        for clients in args.clients:
            s, b = table.get((json_label + " json", clients)), table.get((json_label, clients))
            same = next(
                (key[0] for key in table if key[0].startswith(json_label + " free=") and key[1] == clients), None
            )
            if s and b and b["tok_s"]:
                ratio = s["tok_s"] / b["tok_s"]
                print(
                    f"{json_label + ' json':<28}{clients:>3} clients: tok/s {ratio:5.2f}x  TTFT {s['ttft'] / b['ttft']:5.2f}x  "
                    f"latency {s['p50'] / b['p50']:5.2f}x   vs free answers of {args.max_new_tokens} tokens"
                )
            if s and same and table[same, clients]["tok_s"]:
                f = table[same, clients]
                ratio = s["tok_s"] / f["tok_s"]
                print(
                    f"{'':<28}{clients:>3} clients: tok/s {ratio:5.2f}x  TTFT {s['ttft'] / f['ttft']:5.2f}x  "
                    f"latency {s['p50'] / f['p50']:5.2f}x   vs free answers cut to the JSON answers' mean length "
                    f"({same.split('=')[1]} tokens): the grammar's own cost; target >= {JSON_MIN}x: {verdict(ratio, JSON_MIN)}"
                )

    if pf is None:
        return
    print()
    if "failed" in pf:
        print(f"pf flow serve: failed: {pf['failed']}")
        return
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    added, vs_score = pf["pf"] - pf["v1"], pf["pf"] - pf["score"]
    tool = pf["stub_chat"] - pf["stub_trivial"] - pf["stub_direct"]
    paced_added = pf["stub_chat_paced"] - pf["stub_direct_paced"]
    print(
        f"pf flow serve (flows/chat, fastapi engine, {pf['n']} requests; the flow samples (temperature 0.7) up to "
        f"{args.max_new_tokens} tokens: p50 {pf['tokens_score']:.0f} /score, {pf['tokens_direct']:.0f} /v1 stream, "
        f"{pf['tokens_pf']:.0f} via pf, re-tokenized)"
    )
    print(
        f"  {DEFAULT_ENGINE} engine, p50: direct /score {ms(pf['score'])}, /v1 whole {ms(pf['v1_whole'])}, /v1 stream "
        f"(the tool's own request) {ms(pf['v1'])} (TTFT {ms(pf['v1_ttft'])}); via pf {ms(pf['pf'])} "
        f"(SSE first byte {ms(pf['pf_ttfb'])})"
    )
    print(
        f"  pf adds {ms(added)} p50 over the same request (target <= {PF_MAX_MS:.0f} ms: "
        f"{verdict(added * 1000, PF_MAX_MS, True)}), {ms(vs_score)} over direct /score (last time: 81 ms p50)"
    )
    print(
        f"  where it goes (an endpoint stub, no model): pf's own request handling {ms(pf['stub_trivial'])} (a one-node "
        f"echo flow); the chat tool + connection {ms(tool)} (flows/chat {ms(pf['stub_chat'])} JSON, "
        f"{ms(pf['stub_chat_sse'])} SSE, the tool's client alone {ms(pf['stub_direct'])}); streamed pieces: pf adds "
        f"{ms(paced_added)} to {pf['pieces']} pieces {PACE_S * 1000:.0f} ms apart, "
        f"{ms(pf['stub_chat'] - pf['stub_direct'])} to one"
    )
    if pf.get("has_cpu"):
        model_cpu = f", {pf['cpu_model'] * 1000:.0f} ms with the model" if pf.get("cpu_model") is not None else ""
        print(
            f"  pf's process CPU per request: {pf['cpu_chat'] * 1000:.0f} ms for one piece, {pf['cpu_paced'] * 1000:.0f} "
            f"ms for {pf['pieces']} paced pieces{model_cpu}: time that {os.cpu_count()} CPUs take from the model"
        )
    print(
        f"  not pf: the tool streams /v1 where the old comparison called /score: /v1 vs /score "
        f"{ms(pf['v1_whole'] - pf['score'])}, streamed vs whole {ms(pf['v1'] - pf['v1_whole'])} (the endpoint, p50)"
    )
    if pf["errors"]:
        print(f"  errors: {len(pf['errors'])}, e.g. {sorted(set(map(str, pf['errors'])))[:3]}")


if __name__ == "__main__":
    main()
