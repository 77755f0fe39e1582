"""What the tests share besides fixtures: paths, free ports, waiting for an event with a deadline,
HTTP without exceptions, and the processes they start (`finetune-phi serve`, `pf flow serve`, ...).

Waiting is always for an event (a URL that answers, a file that appears, a line in a log), polled
until a deadline that only bounds a failure: a test never sleeps for a guessed time and then looks.
Standard library only: conftest sets the environment before anything imports transformers or mlflow.
"""

from __future__ import annotations

import http.client as httpclient
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from finetune_phi.serving.client import sse_events  # noqa: F401 - the tests' too
from finetune_phi.serving.local import free_port, wait_ready  # free_port: the tests' too


REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
PHI3_TOKENIZER = SHARED_ASSETS / "phi-3-mini-tokenizer"
ULTRACHAT40 = SHARED_ASSETS / "ultrachat-sample" / "ultrachat40.jsonl"
BIN = Path(sys.executable).parent

T = TypeVar("T")

# Answers with known scores for the eval flow (and its Agent Framework twin): a perfect one, a partial
# one, an empty answer (scored 0), a line without a reference (failed, counted) and a non-ASCII one.
EVAL_ROWS = [
    {"question": "q1", "ground_truth": "The capital of Peru is Lima.", "answer": "The capital of Peru is Lima."},
    {"question": "q2", "ground_truth": "Paris is the capital of France", "answer": "Paris"},
    {"question": "q3", "ground_truth": "A cow says moo.", "answer": ""},
    {"question": "q4", "ground_truth": "", "answer": "no reference to score against"},
    {"question": "q5", "ground_truth": "東京 は 首都 です", "answer": "東京 は 首都"},
]


def log_tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n--- last of {log} ---\n{log.read_text(errors='replace')[-chars:]}"


def wait_for(
    condition: Callable[[], T],
    what: str,
    timeout: float = 60,
    *,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    interval: float = 0.05,
) -> T:
    """condition()'s first truthy value, polled until `timeout` seconds have passed.

    Fails with a message naming `what` was awaited (and the tail of `log`): at the deadline, or as soon
    as `proc` has exited, since a dead process will never make it true. OSError from condition() counts
    as "not yet" (a server that does not listen yet refuses the connection).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the process exited with {proc.returncode}{log_tail(log)}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"waiting for {what}: not within {timeout:g} s{log_tail(log)}")
        time.sleep(interval)


def wait_for_url(
    url: str,
    timeout: float = 120,
    *,
    headers: dict | None = None,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Until GET url answers 200 (the package's own wait, as the demo uses it)."""
    wait_ready(url, headers=headers, proc=proc, log=log, timeout=timeout)


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 60):
    """(status, headers, decoded JSON or text) without raising on 4xx/5xx."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def stream_request(url: str, key: str, body: dict):
    """POST a streamed chat completion; (connection, response) with the response's head read, its body not."""
    host, port = url.removeprefix("http://").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "stream": True}),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    return conn, conn.getresponse()


def has_content(event: dict) -> bool:
    return any(c.get("delta", {}).get("content") for c in event.get("choices", []))


class Process:
    """A process of the test's, output to `log`; stop() ends it (terminate, then kill) and waits."""

    def __init__(self, cmd: list, log: Path, **popen):
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, **popen)

    def wait_for_url(self, url: str, timeout: float = 120, headers: dict | None = None) -> None:
        wait_for_url(url, timeout, headers=headers, proc=self.proc, log=self.log)

    def stop(self, timeout: float = 30):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PfFlowServe(Process):
    """`pf flow serve` of a flow on a free port of 127.0.0.1, healthy once constructed."""

    def __init__(self, flow: Path, log: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                BIN / "pf",
                "flow",
                "serve",
                "--source",
                flow,
                "--host",
                "127.0.0.1",
                "--port",
                self.port,
                "--skip-open-browser",
                *args,
            ],
            log,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        try:
            self.wait_for_url(self.url + "/health", timeout=120)
        except BaseException:
            self.stop()
            raise


class Server(Process):
    """A real `finetune-phi serve` process on 127.0.0.1, ready (models loaded) once constructed."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [BIN / "finetune-phi", "serve", *args, "--port", str(self.port)], log, env={**os.environ, **(env or {})}
        )
        from finetune_phi.serving.keys import get_or_create_key

        self.key = (env or {}).get("FINETUNE_PHI_API_KEY") or get_or_create_key()[0]
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def auth(self, **extra) -> dict:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **extra}

    def wait_ready(self, timeout: float = 180):
        self.wait_for_url(self.url + "/ready", timeout, headers=self.auth())

    def log_since(self, start: int) -> str:
        return self.log.read_text()[start:]

    def log_size(self) -> int:
        return len(self.log.read_text())


def run_cli(capsys, *args) -> subprocess.CompletedProcess:
    """`finetune-phi ARGS` in this process, as its console script runs it (exit code, stdout, stderr),
    without paying the start-up of Python, torch and azure-ai-ml again: for refusals and dry runs. The
    tests that need a real process (kill, relaunch, the console script itself) start one."""
    from finetune_phi.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors exit
        rc = e.code
    said = capsys.readouterr()
    return subprocess.CompletedProcess(["finetune-phi", *map(str, args)], rc, said.out, said.err)


def exporter_or_skip():
    """The OpenVINO exporter (its own venv: `make openvino-export`), or skip the test saying how to get it."""
    import importlib.util

    import pytest

    from finetune_phi.modeling.export import ExportError, openvino_exporter

    if importlib.util.find_spec("openvino_genai") is None:
        pytest.skip("openvino-genai is not installed (pip install 'finetune-phi[openvino]')")
    try:
        return openvino_exporter()
    except ExportError as e:
        pytest.skip(f"no OpenVINO export venv (`make openvino-export`): {str(e)[:200]}")


def compare_command(tmp_path: Path, *args: str) -> list[str]:
    """`finetune-phi compare` with its reports under tmp_path/reports and both sides on the `standin` connection
    (a stand-in endpoint the test connected under that name); args add the rest."""
    return [
        str(BIN / "finetune-phi"),
        "compare",
        "--reports",
        str(tmp_path / "reports"),
        "--base-connection",
        "standin",
        "--candidate-connection",
        "standin",
        *args,
    ]


def compare_summary(tmp_path: Path, name: str) -> dict:
    """The summary.json of the comparison `name` that compare_command wrote."""
    return json.loads((tmp_path / "reports" / name / "summary.json").read_text())
