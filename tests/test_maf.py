"""Microsoft Agent Framework twins (flows/chat-maf, flows/eval-maf) and `compare --runner maf`.

The twins live in .venv-maf (`make maf`; agent-framework needs OpenTelemetry >= 1.39, promptflow 1.18.5
breaks above 1.38), so they run here as that venv's python, against the suite's real endpoint.
The parity check is the two commands a user types (`finetune-phi compare` with each runner, default
flags: greedy, transient failures retried) against the suite's endpoint itself. The twins' own tests go
through `Greedy`, a pass-through on 127.0.0.1 that sets temperature 0 on every request, forwards one
request at a time and records the bodies, to compare their answers with the client's own call.
"""

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import BIN, REPO, Process, free_port, http, wait_for

from finetune_phi.data.read import read_jsonl
from finetune_phi.evaluation.maf_runner import read_rows, scores_of
from finetune_phi.evaluation.metrics import METRICS
from finetune_phi.serving.client import chat_stream, history_to_messages


MAF_PYTHON = Path(os.environ.get("FINETUNE_PHI_MAF_PYTHON") or REPO / ".venv-maf" / "bin" / "python")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not MAF_PYTHON.exists() and not os.environ.get("CI"),
        reason="no .venv-maf: `make maf` creates it (`make test` does)",
    ),
]


def maf(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """python -m finetune_phi.evaluation.maf_runner ARGS in .venv-maf."""
    return subprocess.run(
        [str(MAF_PYTHON), "-m", "finetune_phi.evaluation.maf_runner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


class Greedy:
    """A pass-through to the endpoint that makes every generation greedy (temperature 0) and records bodies."""

    def __init__(self, target: str):
        proxy = self
        self.bodies: list[dict] = []
        one_at_a_time = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, data: bytes | None):
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("authorization", "content-type", "azureml-model-deployment", "accept")
                }
                request = urllib.request.Request(target + self.path, data=data, headers=headers, method=self.command)
                with one_at_a_time:
                    try:
                        with urllib.request.urlopen(request, timeout=120) as r:
                            status, ctype, raw = r.status, r.headers.get("Content-Type"), r.read()
                    except urllib.error.HTTPError as e:
                        status, ctype, raw = e.code, e.headers.get("Content-Type"), e.read()
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.startswith("/v1/chat/completions"):
                    body["temperature"] = 0
                elif isinstance(body.get("input_data"), dict):
                    body["input_data"].setdefault("parameters", {})["temperature"] = 0
                proxy.bodies.append(body)
                self._forward(json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def greedy(connected):
    """The greedy pass-through and a Prompt flow connection `greedy_endpoint` to it (the endpoint's key)."""
    from finetune_phi.serving.connection import connect

    proxy = Greedy(connected.url)
    connect(proxy.url + "/score", connected.key, name="greedy_endpoint")
    yield proxy
    proxy.server.shutdown()


@pytest.fixture(scope="module")
def greedy_env(greedy, connected) -> dict:
    return {"FINETUNE_PHI_ENDPOINT_URL": greedy.url + "/score", "FINETUNE_PHI_API_KEY": connected.key}


def test_chat_twin_answers_with_history_and_streams(greedy, greedy_env, connected):
    history = [{"inputs": {"question": "What is the capital of France?"}, "outputs": {"answer": "Paris."}}]
    question = "What is the opposite of hot?"
    script = f"""
import asyncio, json, os
from finetune_phi import project
from finetune_phi.twins import endpoint, load
flow = load(project.flow("chat-maf"))
url, key = endpoint()
chat_input = flow.ChatInput({question!r}, {history!r}, "ft")
answer = asyncio.run(flow.create_workflow(url, key).run(chat_input)).get_outputs()
async def stream():
    return [e.data async for e in flow.create_workflow(url, key, stream=True).run(chat_input, stream=True) if e.type == "output"]
print(json.dumps({{"answer": answer, "pieces": asyncio.run(stream())}}))
"""
    done = subprocess.run(
        [str(MAF_PYTHON), "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, **greedy_env}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert greedy.bodies[-1]["messages"] == history_to_messages(history, question)  # the history reached the endpoint
    assert greedy.bodies[-1]["model"] == "ft"
    expected = "".join(chat_stream(greedy.url + "/score", connected.key, question, history, "ft"))
    assert expected.strip() and got["answer"] == [expected]  # what the Prompt flow tool's call answers, greedy
    assert len(got["pieces"]) > 1 and "".join(got["pieces"]) == expected  # streamed piece by piece


def test_chat_twin_reads_the_prompt_flow_connection_and_reports_endpoint_errors(connected, greedy_env):
    # no env vars: the connection `finetune-phi connect` made, read through the main venv's promptflow
    done = maf("test", "--question", "What is the capital of France?", "--deployment", "ft")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["answer"].strip()
    bad = maf("test", "--question", "hi", env={**greedy_env, "FINETUNE_PHI_API_KEY": "x" * 32})
    assert bad.returncode == 2 and "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr
    assert "x" * 32 not in bad.stderr
    # a main venv somewhere else (make VENV=...): the error names the setting that points at it
    lost = maf(
        "test", "--question", "hi", env={"FINETUNE_PHI_PF_PYTHON": str(REPO / "no-such-venv" / "bin" / "python")}
    )
    assert lost.returncode == 2 and "point FINETUNE_PHI_PF_PYTHON at the main venv's python" in lost.stderr


def test_eval_twin_aggregates_equal_the_prompt_flow_eval_run(eval_flow_run, tmp_path):
    from promptflow.client import PFClient

    name, data = eval_flow_run
    pf = PFClient()
    logged = pf.get_metrics(name)
    runs = tmp_path / "runs"
    done = maf("run", "--flow", "flows/eval-maf", "--data", str(data), "--name", "eval_maf", "--runs-dir", str(runs))
    assert done.returncode == 0, done.stderr[-3000:]
    shown = maf("show-metrics", "--name", "eval_maf", "--runs-dir", str(runs))
    metrics = json.loads(shown.stdout)
    assert metrics["lines_scored"] == 4 and metrics["lines_failed"] == 1
    assert set(metrics) == set(logged) and all(metrics[k] == logged[k] for k in logged), (metrics, logged)
    details = pf.get_details(name)
    twin = [scores_of(row) for row in read_rows(runs, "eval_maf")]  # evaluate()'s own rows
    for (_, row), line in zip(details.iterrows(), twin, strict=True):
        # pf.get_details reads outputs with pandas' read_json, whose float parser keeps ~10 digits (0.33333333330000003)
        assert all(row[f"outputs.{m}"] == pytest.approx(line[m], rel=0, abs=1e-9) for m in METRICS)
        assert row["outputs.failed"] == line["failed"]


def test_parity_both_runners_give_the_same_answers_metrics_and_table(
    connected, trained, sample_data, tmp_path, record_property
):
    """Both runners over the same rows, as a user types them (README): one row fails (longer than the model's
    context: the endpoint says 400): the same answers, scores and table, the failed line counted and left out."""
    rows = read_jsonl(sample_data / "eval.jsonl")[:6]
    rows[2] = dict(rows[2], question="word " * 5000)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conns = ["--max-failed", "20%"]  # the planted failure is 1 of 6 lines
    test_file = tmp_path / "test.jsonl"  # held-out loss, once: on 16 conversations
    test_file.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(sample_data / "test.jsonl")[:16]))
    losses = {
        "promptflow": ["--base-model", "tiny", "--candidate-model", str(trained.out), "--test-file", str(test_file)],
        "maf": [],
    }
    seconds, summaries = {}, {}
    for runner in ("promptflow", "maf"):
        t = time.time()
        done = subprocess.run(
            [
                str(BIN / "finetune-phi"),
                "compare",
                "--runner",
                runner,
                "--base",
                "base",
                "--candidate",
                "ft",
                "--data",
                str(data),
                "--name",
                f"parity_{runner}",
                "--reports",
                str(tmp_path / runner),
                *conns,
                *losses[runner],
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds[runner] = time.time() - t
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summaries[runner] = json.loads((tmp_path / runner / f"parity_{runner}" / "summary.json").read_text())
    import numpy as np
    import pandas as pd

    answers = ["answer_base", "answer_ft"]
    metric_cols = [f"{m}_{side}" for m in METRICS for side in ("base", "ft")]
    pf_lines, maf_lines = (
        pd.read_csv(
            tmp_path / r / f"parity_{r}" / "lines.csv",
            keep_default_na=False,
            na_values={c: [""] for c in metric_cols},
            dtype=dict.fromkeys(answers, str),
        )
        .sort_values("line")
        .reset_index(drop=True)
        for r in ("promptflow", "maf")
    )  # lines.csv puts worst regressions first: back in line order
    same_answers = int((pf_lines[answers] == maf_lines[answers]).all(axis=1).sum())
    # the pf runner reads scores through pf.get_details, i.e. pandas' read_json: ~10 digits (0.33333333330000003)
    same_scores = int(
        np.isclose(pf_lines[metric_cols], maf_lines[metric_cols], rtol=0, atol=1e-9, equal_nan=True).all(axis=1).sum()
    )  # the failed line: no score on either runner
    exact_scores = int((pf_lines[metric_cols].fillna(-1) == maf_lines[metric_cols].fillna(-1)).all(axis=1).sum())
    record_property(
        "figure",
        f"parity on {len(rows)} rows x 2 deployments: {same_answers}/{len(rows)} rows with identical "
        f"answers, {same_scores}/{len(rows)} with equal scores (to 1e-9; {exact_scores} to the last bit); compare "
        f"took promptflow {seconds['promptflow']:.1f} s, maf {seconds['maf']:.1f} s (chat runs: pf "
        f"{[round(r['seconds'], 1) for r in summaries['promptflow']['runs'].values()]} s, maf "
        f"{[round(r['seconds'], 1) for r in summaries['maf']['runs'].values()]} s)",
    )
    answered = pf_lines[pf_lines["line"] != 2][answers].to_numpy().ravel()
    assert all(a.strip() for a in answered)  # every other row answered on both sides
    assert same_answers == len(rows) and same_scores == len(rows)
    for summary in summaries.values():  # the failed line is counted, left out, and the comparison goes on
        assert summary["lines"] == {"total": 6, "paired": 5, "failed": {"base": 1, "ft": 1}}
        assert summary["runs"]["base"]["failed"] == 1 and summary["runs"]["ft"]["failed"] == 1
        f1 = next(r for r in summary["rows"] if r["metric"] == "f1_score")
        assert f1["candidate"] > f1["base"]
    assert summaries["promptflow"]["losses"]["candidate"] < summaries["promptflow"]["losses"]["base"]
    for pf_row, maf_row in zip(
        summaries["promptflow"]["rows"], summaries["maf"]["rows"], strict=True
    ):  # the same table
        assert pf_row["metric"] == maf_row["metric"]
        assert all(pf_row[k] == pytest.approx(maf_row[k], rel=0, abs=1e-9) for k in pf_row if k != "metric")
    report = (tmp_path / "maf" / "parity_maf" / "compare.md").read_text()
    assert "f1_score" in report and "maf-runs" in report and "pf run show-details" not in report


def test_serve_twin_answers_and_streams_like_pf_flow_serve(greedy, greedy_env, connected, tmp_path):
    port = free_port()
    proc = Process(
        [MAF_PYTHON, "-m", "finetune_phi.evaluation.maf_runner", "serve", "--port", port],
        tmp_path / "serve.log",
        env={**os.environ, **greedy_env},
        cwd=REPO,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_for_url(url + "/health", timeout=60)
        body = {"question": "What is the opposite of hot?", "chat_history": [], "deployment": "ft"}
        status, _, answer = http("POST", url + "/score", body, {"Content-Type": "application/json"})
        assert status == 200 and answer["answer"].strip()
        assert answer["answer"] == "".join(
            chat_stream(greedy.url + "/score", connected.key, body["question"], [], "ft")
        )
        req = urllib.request.Request(
            url + "/score",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            pieces = [
                json.loads(line[6:])["answer"] for line in r.read().decode().splitlines() if line.startswith("data: ")
            ]
        assert len(pieces) > 1 and "".join(pieces) == answer["answer"]
        assert http("POST", url + "/score", {"chat_history": []}, {"Content-Type": "application/json"})[0] == 400
    finally:
        proc.stop()


def _serve_twins(tmp_path, endpoint_url: str, key: str, tag: str):
    """`pf flow serve` of flows/chat and the maf twin's serve, both to endpoint_url, transient failures not retried."""
    from support import PfFlowServe

    env = {
        "PF_HOME_DIRECTORY": str(tmp_path / f"pf-{tag}"),
        "FINETUNE_PHI_API_KEY": key,
        "FINETUNE_PHI_RETRY_ATTEMPTS": "1",
    }
    done = subprocess.run(
        [str(BIN / "finetune-phi"), "connect", "--endpoint-url", endpoint_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    pf = PfFlowServe(REPO / "flows" / "chat", tmp_path / f"pf-serve-{tag}.log", env=env)
    port = free_port()
    twin = Process(
        [MAF_PYTHON, "-m", "finetune_phi.evaluation.maf_runner", "serve", "--port", port],
        tmp_path / f"maf-serve-{tag}.log",
        env={**os.environ, **env, "FINETUNE_PHI_ENDPOINT_URL": endpoint_url},
        cwd=REPO,
    )
    twin.url = f"http://127.0.0.1:{port}"
    twin.wait_for_url(twin.url + "/health", timeout=60)
    return pf, twin


def test_both_served_chat_flows_pass_on_the_endpoints_message_4xx_for_the_request_5xx_for_the_endpoint(
    connected, tmp_path
):
    """What the endpoint refused in the request (too long for the context, no such deployment, a body over its
    limit) is the caller's 400 with the endpoint's own words; an endpoint that is down is a 5xx (pf flow
    serve can only say 500; the twin says 502, bad gateway), never a 400 and never a traceback."""
    json_headers = {"Content-Type": "application/json"}
    pf, twin = _serve_twins(tmp_path, connected.url + "/score", connected.key, "up")
    try:
        for url in (pf.url, twin.url):
            status, _, body = http(
                "POST",
                url + "/score",
                {"question": "What is the capital of Peru?", "deployment": "ft", "temperature": 0},
                json_headers,
            )
            assert status == 200 and body["answer"].startswith("The capital of"), (url, body)  # not streamed: joined
            status, _, body = http(
                "POST", url + "/score", {"question": "word " * 5000, "deployment": "ft"}, json_headers
            )
            assert status == 400 and "exceeds the model's context" in body["error"]["message"], (url, body)
            status, _, body = http("POST", url + "/score", {"question": "Hi", "deployment": "nope"}, json_headers)
            assert status == 400 and "no deployment named 'nope'" in body["error"]["message"], (url, body)
        status, _, body = http(
            "POST", pf.url + "/score", {"question": "word " * 300_000, "deployment": "ft"}, json_headers
        )
        assert status == 400 and "HTTP 413" in body["error"]["message"], body  # the endpoint's body limit, its words

        # the twin's own door: a question that is not a string, a body over the limit, a length that is not one
        status, _, body = http("POST", twin.url + "/score", {"question": None}, json_headers)
        assert status == 400 and "question must be a non-empty string" in body["error"]["message"], body
        import socket

        for length, answer in ((b"1000001", b"HTTP/1.0 413"), (b"-1", b"HTTP/1.0 411")):
            with socket.create_connection(("127.0.0.1", int(twin.url.rsplit(":", 1)[1])), timeout=10) as s:
                s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
                assert s.recv(200).startswith(answer)  # at once: the body is never waited for
    finally:
        pf.stop()
        twin.stop()

    down = f"http://127.0.0.1:{free_port()}/score"
    pf, twin = _serve_twins(tmp_path, down, connected.key, "down")
    try:
        for url, expected in ((pf.url, 500), (twin.url, 502)):
            status, _, body = http("POST", url + "/score", {"question": "Hi"}, json_headers)
            assert status == expected and "cannot reach endpoint" in body["error"]["message"], (url, body)
    finally:
        pf.stop()
        twin.stop()


@pytest.mark.slow
def test_devui_chat_page_answers_and_sends_the_history(greedy, greedy_env, connected, browser, tmp_path):
    """The twin of pf flow serve's chat page: Agent Framework's DevUI serving flows/chat-maf (`maf_runner devui`),
    in a real browser, two turns against the real endpoint (greedy, through the recording pass-through): each
    answer shown is the endpoint's, and the second turn reaches the endpoint with the first turn as its history."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    first, follow_up = "What is the capital of France?", "And which language do people speak there?"
    port = free_port()
    page = Process(
        [MAF_PYTHON, "-m", "finetune_phi.evaluation.maf_runner", "devui", "--port", port, "--deployment", "ft"],
        tmp_path / "devui.log",
        cwd=REPO,
        env={**os.environ, **greedy_env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        page.wait_for_url(url + "/v1/entities", timeout=120)
        browser.get(url + "/")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "textarea"), "DevUI's message box", 60, interval=0.3)
        answers = []
        letters = lambda text: re.sub(r"[\W_]+", "", text)  # noqa: E731 - the page renders answers as markdown
        for turn, question in enumerate((first, follow_up), start=1):
            asked = len(greedy.bodies)
            box = browser.find_element(By.CSS_SELECTOR, "textarea")
            box.send_keys(question)
            box.send_keys(Keys.ENTER)
            wait_for(lambda n=asked: len(greedy.bodies) > n, f"turn {turn} at the endpoint", 180, interval=0.3)
            history = [{"inputs": {"question": first}, "outputs": {"answer": answers[0]}}] if answers else []
            sent = greedy.bodies[asked]
            assert sent["messages"] == history_to_messages(history, question) and sent["model"] == "ft"  # all of it
            # what the endpoint answers that conversation, greedy (straight to it, not through the pass-through)
            answer = "".join(
                chat_stream(connected.url + "/score", connected.key, question, history, "ft", {"temperature": 0})
            )
            wait_for(
                lambda a=answer: letters(a)[:40] in letters(browser.find_element(By.TAG_NAME, "body").text),
                f"turn {turn}'s answer on the page",
                180,
                interval=0.3,
            )
            answers.append(answer)
    finally:
        browser.save_screenshot(str(tmp_path / "devui.png"))  # what the page showed, pass or fail
        page.stop()
