"""Endpoint throughput and latency: batching on vs off vs bare `model.generate`, and `pf flow serve` overhead.

    python bench/serve.py [--clients 1 16] [--seconds 10] [--max-new-tokens 32]

Starts the real endpoint (tiny model) as a subprocess per configuration, drives it with N
concurrent clients for T seconds on /score (chat shape) and /v1/chat/completions, and prints
req/s, generated tokens/s and latency p50/p95/p99. The floor is `model.generate` on the same
requests in this process, one at a time. The last table is the latency that `pf flow serve` adds
over calling the endpoint directly. Figures are for this machine only; compare ratios.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
QUESTIONS = ["What is the capital of France?", "Say hello to Maya.", "What is 12 plus 30?",
             "What sound does a cow make?", "What is the opposite of hot?", "Tell me the capital city of Peru."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, key: str, timeout: float = 120) -> tuple[int, dict, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read() or b"null")
    conn.close()
    return response.status, data, time.perf_counter() - t


def wait_ready(port: int, key: str, proc, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready", headers={"Authorization": f"Bearer {key}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("server not ready")


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if len(latencies) < 2:
        return (latencies[0],) * 3 if latencies else (float("nan"),) * 3
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49], q[94], q[98]


def drive(port: int, key: str, route: str, clients: int, seconds: float, max_new_tokens: int) -> dict:
    """N client threads sending requests back to back for `seconds`."""
    latencies, tokens, errors = [], [0], [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int):
        n = i
        while time.perf_counter() < stop:
            q = QUESTIONS[n % len(QUESTIONS)]
            n += clients
            if route == "/score":
                body = {"input_data": {"input_string": [{"role": "user", "content": q}],
                                       "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0}}}
            else:
                body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_new_tokens, "temperature": 0}
            status, data, seconds_taken = post(port, route, body, key)
            with lock:
                if status != 200:
                    errors[0] += 1
                    continue
                latencies.append(seconds_taken)
                tokens[0] += data["usage"]["completion_tokens"] if route != "/score" else 0

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p95, p99 = percentiles(latencies)
    return {"req_s": len(latencies) / wall, "tok_s": tokens[0] / wall if route != "/score" else None,
            "p50": p50, "p95": p95, "p99": p99, "n": len(latencies), "errors": errors[0]}


def bare_generate(model_dir: str, seconds: float, max_new_tokens: int) -> dict:
    """The floor: HF generate on the same prompts, one at a time, in this process."""
    import torch

    from finetune_phi import models

    model, tok = models.load(model_dir)
    latencies, tokens = [], 0
    stop = time.perf_counter() + seconds
    i = 0
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        latencies.append(time.perf_counter() - t)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        i += 1
    wall = time.perf_counter() - t0
    p50, p95, p99 = percentiles(latencies)
    return {"req_s": len(latencies) / wall, "tok_s": tokens / wall, "p50": p50, "p95": p95, "p99": p99,
            "n": len(latencies), "errors": 0}


def start_server(model_dir: str, key: str, batch: int, log: Path):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "finetune-phi"), "serve", "--deployment", f"tiny={model_dir}", "--port", str(port),
                             "--max-batch-size", str(batch), "--max-concurrent-requests", "256"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "FINETUNE_PHI_API_KEY": key})
    wait_ready(port, key, proc)
    return proc, port


def pf_overhead(model_dir: str, key: str, requests: int, work: Path) -> dict:
    """p50 of the same chat turn through `pf flow serve` and directly against the endpoint."""
    from finetune_phi.connection import connect

    os.environ["PF_HOME_DIRECTORY"] = str(work / "pf")
    subprocess.run([str(BIN / "pf"), "config", "set", "telemetry.enabled=false", "trace.destination=none"],
                   check=True, capture_output=True)
    server, port = start_server(model_dir, key, 16, work / "serve-pf.log")
    pf_port = free_port()
    flow = None
    try:
        connect(f"http://127.0.0.1:{port}/score", key)
        flow = subprocess.Popen([str(BIN / "pf"), "flow", "serve", "--source", str(REPO / "flows" / "chat"), "--host",
                                 "127.0.0.1", "--port", str(pf_port), "--skip-open-browser"],
                                stdout=(work / "pf-serve.log").open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", pf_port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        direct, via_pf = [], []
        body = {"input_data": {"input_string": [{"role": "user", "content": QUESTIONS[0]}], "parameters": {}}}
        for _ in range(requests):
            direct.append(post(port, "/score", body, key)[2])
            status, data, took = post(pf_port, "/score", {"question": QUESTIONS[0], "chat_history": []}, key)
            if status == 200:
                via_pf.append(took)
        return {"direct_p50": statistics.median(direct), "pf_p50": statistics.median(via_pf), "n": len(via_pf)}
    finally:
        if flow:
            flow.terminate()
        server.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--pf-requests", type=int, default=30)
    args = ap.parse_args()
    for var, value in (("HF_HUB_OFFLINE", "1"), ("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "true"),
                       ("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "true")):
        os.environ.setdefault(var, value)  # offline: no hub, no telemetry retries in pf's processes
    from finetune_phi.models import tiny_path

    model_dir = str(tiny_path())
    key = "bench-key"
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    rows = []
    floor = bare_generate(model_dir, args.seconds, args.max_new_tokens)
    rows.append(("bare model.generate", "-", 1, floor))
    for label, batch in (("batching on", 16), ("batching off", 1)):
        proc, port = start_server(model_dir, key, batch, work / f"serve-{batch}.log")
        try:
            for route in ("/score", "/v1/chat/completions"):
                for clients in args.clients:
                    rows.append((label, route, clients, drive(port, key, route, clients, args.seconds, args.max_new_tokens)))
        finally:
            proc.terminate()
            proc.wait()
    print(f"\ntiny Phi-3, {args.max_new_tokens} new tokens per request (greedy), {args.seconds:.0f} s per row, {os.cpu_count()} CPUs")
    print(f"{'config':<20}{'route':<23}{'clients':>7}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'n':>6}{'err':>5}")
    for label, route, clients, r in rows:
        tok = f"{r['tok_s']:.0f}" if r["tok_s"] is not None else "-"
        print(f"{label:<20}{route:<23}{clients:>7}{r['req_s']:>9.1f}{tok:>9}{r['p50'] * 1000:>9.0f}"
              f"{r['p95'] * 1000:>9.0f}{r['p99'] * 1000:>9.0f}{r['n']:>6}{r['errors']:>5}")

    def find(label, route, clients):
        return next(r for lb, rt, c, r in rows if (lb, rt, c) == (label, route, clients))

    top = max(args.clients)
    for route in ("/score", "/v1/chat/completions"):
        on, off = find("batching on", route, top), find("batching off", route, top)
        print(f"{route}: batching on / off throughput at {top} clients: {on['req_s'] / off['req_s']:.2f}x (target >= 4x)")
    if 1 in args.clients:
        one = find("batching on", "/score", 1)
        print(f"/score p50 at 1 client / bare generate p50: {one['p50'] / floor['p50']:.2f}x (target <= 1.2x)")
    pf = pf_overhead(model_dir, key, args.pf_requests, work)
    print(f"pf flow serve: p50 {pf['pf_p50'] * 1000:.0f} ms vs direct {pf['direct_p50'] * 1000:.0f} ms -> "
          f"adds {(pf['pf_p50'] - pf['direct_p50']) * 1000:.0f} ms (target <= 30 ms; {pf['n']} requests)")


if __name__ == "__main__":
    main()
