"""The chat flow through the real `pf` CLI, a real connection and the real endpoint."""

import json
import os
import subprocess

import pytest
from support import BIN, REPO, PfFlowServe, free_port, http


pytestmark = pytest.mark.slow  # every test here trains, serves or runs pf

FLOW = REPO / "flows" / "chat"
QUESTION = "What is the capital of Peru?"


def finetune_phi(*args, env=None):
    return subprocess.run(
        [str(BIN / "finetune-phi"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def pf_test(*inputs, env=None):
    return subprocess.run(
        [str(BIN / "pf"), "flow", "test", "--flow", str(FLOW), "--inputs", *inputs],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def answer_of(done) -> str:
    out = done.stdout
    return json.loads(out[out.rindex("{", 0, out.rindex('"answer"')) : out.rindex("}") + 1])["answer"]


def test_connection_keeps_the_key_secret(connected, pf_home):
    shown = subprocess.run(
        [str(BIN / "pf"), "connection", "show", "--name", "finetune_phi_endpoint"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    conn = json.loads(shown.stdout[shown.stdout.index("{") :])
    assert conn["configs"]["endpoint_url"] == connected.url + "/score"
    assert conn["type"] == "custom" and connected.key not in shown.stdout
    for path in FLOW.rglob("*"):  # nothing pf wrote next to the flow holds the key
        if path.is_file():
            assert connected.key not in path.read_text(errors="ignore"), path


def test_pf_flow_test_answers_from_the_pinned_deployment(connected):
    done = pf_test(f"question={QUESTION}", "deployment=ft")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert answer_of(done).startswith("The capital of")


def test_chat_history_reaches_the_model(connected):
    # a history too long for the model's context is refused by the endpoint with both token counts,
    # which shows the flow sent it; the same question without it is answered
    history = [
        {"inputs": {"question": "word " * 3000}, "outputs": {"answer": "ok"}},
        {"inputs": {"question": "more " * 3000}, "outputs": {"answer": "ok"}},
    ]
    done = pf_test(f"question={QUESTION}", f"chat_history={json.dumps(history)}")
    assert done.returncode != 0
    assert (
        "HTTP 400" in done.stdout + done.stderr
        and "exceeds the model's context of 4096 tokens" in done.stdout + done.stderr
    )


def test_pf_flow_serve_chats_with_history(connected, test_root):
    server = PfFlowServe(FLOW, test_root / "pf-serve.log")
    try:
        url = server.url
        history = [
            {
                "inputs": {"question": "Hi, my name is Olga."},
                "outputs": {"answer": "Hello Olga! How can I help you today?"},
            }
        ]
        status, _, body = http(
            "POST",
            url + "/score",
            {"question": QUESTION, "chat_history": history, "deployment": "ft"},
            {"Content-Type": "application/json"},
        )
        assert status == 200, body
        assert body["answer"].startswith("The capital of")
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["endpoint down", "wrong key"])
def test_endpoint_failures_are_named_clearly(connected, tmp_path, case):
    env = {"PF_HOME_DIRECTORY": str(tmp_path / "pf"), "FINETUNE_PHI_API_KEY": "wrong-key-wrong-key-wrong"}
    url = f"http://127.0.0.1:{free_port()}/score" if case == "endpoint down" else connected.url + "/score"
    assert finetune_phi("connect", "--endpoint-url", url, env=env).returncode == 0
    done = pf_test(f"question={QUESTION}", env=env)
    summary = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("pf.flow.test failed")]
    # names the endpoint (host, port, path called) and what went wrong
    assert done.returncode != 0 and len(summary) == 1 and url.removesuffix("/score") + "/" in summary[0]
    assert ("Connection refused" if case == "endpoint down" else "HTTP 401") in summary[0]
